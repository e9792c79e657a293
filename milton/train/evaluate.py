"""How good is a model on held-out items: perplexity, greedy answers, ROUGE-L.

Works the same on the bare base model, a base with a saved adapter loaded
(``PeftModel.from_pretrained``) and a freshly trained candidate; :func:`adapter_disabled`
scores a PeftModel's base without unloading anything. Items are formatted exactly as for
training, so perplexity is over the same (assistant) tokens the adapter was trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from typing import Any

from milton.core.config import TrainConfig
from milton.models.prompt import few_shot_prompt, serve_format
from milton.train.formatting import format_items, item_field, prompt_ids, resolve_format
from milton.train.loop import batch_nll, collate

#: Where a base model's answer ends: it goes on to write the next user turn itself.
PLAIN_STOPS = ("\nUser:", "\nuser:", "\n\nUser")


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[Any]:
    """The model with its LoRA adapter switched off (a no-op for a plain model)."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def perplexity(model: Any, tokenizer: Any, items: list[Any], cfg: TrainConfig, *,
               chat_format: str = "auto") -> float | None:
    """exp(token-weighted mean NLL) over the labelled tokens of ``items``; None if none."""
    import torch

    examples = format_items(list(items), tokenizer, chat_format, cfg.max_seq_len)
    if not examples:
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total_nll, total_count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), cfg.batch_size):
                batch = [examples[i] for i in order[start:start + cfg.batch_size]]
                ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
                nll, count = batch_nll(model, ids, mask, labels)
                total_nll += float(nll)
                total_count += count
    finally:
        model.train(was_training)
    if total_count == 0:
        return None
    mean = total_nll / total_count
    return math.exp(mean) if mean < 700 else float("inf")


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of lowercased whitespace tokens."""
    cand = candidate.lower().split()
    ref = reference.lower().split()
    if not cand or not ref:
        return 1.0 if not cand and not ref else 0.0
    previous = [0] * (len(ref) + 1)
    for token in cand:
        current = [0] * (len(ref) + 1)
        for j, other in enumerate(ref, start=1):
            current[j] = previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1])
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def served_prompt_ids(item: Any, tokenizer: Any, chat_format: str = "auto") -> list[int]:
    """Token ids of ``item``'s prompt as serve asks it: training's prompt, inside serve's
    few-shot frame when serve gives the model one (a base model without a chat template)."""
    resolved = resolve_format(tokenizer, chat_format)
    if resolved == "plain" and serve_format(chat_format, False) == "few-shot":
        framed = few_shot_prompt([{"role": "user", "content": item_field(item, "prompt", "")}])
        return list(tokenizer(framed, add_special_tokens=True)["input_ids"])
    return prompt_ids(item, tokenizer, resolved)


def generate(model: Any, tokenizer: Any, item: Any, max_new_tokens: int = 64, *,
             chat_format: str = "auto", as_served: bool = False) -> str:
    """The model's greedy answer to ``item``'s prompt, formatted as in training, or with
    ``as_served`` as serve asks it (a base model gets serve's few-shot frame around the same
    turns), so a probe measures what the user will see."""
    import torch

    resolved = chat_format if chat_format in ("template", "plain") else resolve_format(tokenizer, chat_format)
    ids = served_prompt_ids(item, tokenizer, chat_format) if as_served else prompt_ids(item, tokenizer, resolved)
    device = _device(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
    finally:
        model.train(was_training)
    text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    if resolved == "plain":  # a base model goes on to write the next turn itself
        for stop in PLAIN_STOPS:
            text = text.split(stop, 1)[0]
    return text.strip()


def rouge_sample(items: list[Any], n: int) -> list[Any]:
    """A deterministic sample of up to ``n`` pair items (ordered by a hash of their prompt)."""
    pairs = [it for it in items
             if item_field(it, "kind", "pair") == "pair" and item_field(it, "response")]

    def key(it: Any) -> str:
        text = f"{item_field(it, 'id', '')}\0{item_field(it, 'prompt')}"
        return hashlib.sha256(text.encode()).hexdigest()

    return sorted(pairs, key=key)[:n]


def evaluate(model: Any, tokenizer: Any, eval_items: list[Any], regression_items: list[Any],
             cfg: TrainConfig, rouge_samples: int | None = None, *, chat_format: str = "auto",
             max_new_tokens: int = 48) -> dict[str, Any]:
    """eval_ppl, regression_ppl, rouge_l (mean over a deterministic sample), n_eval, n_regression.

    A perplexity or ROUGE-L that cannot be computed (no items) is None.
    """
    samples = cfg.rouge_samples if rouge_samples is None else rouge_samples
    chosen = rouge_sample(list(eval_items), samples) if samples > 0 else []
    scores = [rouge_l(generate(model, tokenizer, it, max_new_tokens, chat_format=chat_format),
                      item_field(it, "response")) for it in chosen]
    return {
        "eval_ppl": perplexity(model, tokenizer, eval_items, cfg, chat_format=chat_format),
        "regression_ppl": perplexity(model, tokenizer, regression_items, cfg,
                                     chat_format=chat_format),
        "rouge_l": sum(scores) / len(scores) if scores else None,
        "rouge_n": len(scores),
        "n_eval": len(eval_items),
        "n_regression": len(regression_items),
    }
