"""Training items -> token ids + labels, with the loss on the assistant's tokens only.

An item is anything with ``kind`` ('pair' | 'text'), ``prompt``, ``response`` and optionally
``system`` (the ``TrainingItem`` dataclass, or a dict with those keys).

``model.chat_format``:

* ``template``: the tokenizer's chat template, prompt as the user turn and response as the
  assistant turn. The prompt part is the conversation rendered without the assistant turn and
  with ``add_generation_prompt=True``; an item whose rendering does not start with that
  prefix falls back to ``plain``. If the prompt's tokens are not a prefix of the whole text's
  tokens (a merge across the boundary), the prompt and the answer are tokenised apart, so
  training sees the prompt exactly as generation will.
* ``plain``: ``"User: {prompt}\\nAssistant: {response}"`` + EOS, for base models (the prompt
  part is :func:`milton.models.prompt.plain_prompt`'s, exactly what serve renders).
* ``few-shot``: trained as ``plain`` (serve puts a short few-shot frame before the same turns,
  :func:`milton.models.prompt.few_shot_prompt`).
* ``auto``: ``template`` when the tokenizer has a chat template that passes that check on a
  probe exchange, else ``plain``.

A ``text`` item (a document chunk) is trained on every token. Labels are ``-100`` on prompt
tokens (and padding), the token id elsewhere. Sequences longer than ``train.max_seq_len`` lose
prompt tokens from the left (the BOS stays), then response tokens from the right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from milton.models.prompt import plain_prompt

IGNORE = -100
_PROBE = ("Hello, who are you?", "I am an assistant.")


@dataclass
class Example:
    """One tokenised training item: ``labels[i]`` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    format: str  # 'template' | 'plain' | 'text'

    @property
    def n_labelled(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def item_field(item: Any, name: str, default: Any = "") -> Any:
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)


def item_text(item: Any) -> str:
    """The text of a ``text`` item: its prompt and/or response, whichever are set."""
    parts = (item_field(item, "prompt") or "", item_field(item, "response") or "")
    return "\n".join(part for part in parts if part)


def _messages(item: Any, with_response: bool) -> list[dict[str, str]]:
    messages = []
    system = item_field(item, "system", None)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": item_field(item, "prompt") or ""})
    if with_response:
        messages.append({"role": "assistant", "content": item_field(item, "response") or ""})
    return messages


def _render_template(tokenizer: Any, item: Any) -> tuple[str, str] | None:
    """(prompt text, full text) from the chat template, or None if it can't be used."""
    try:
        prefix = tokenizer.apply_chat_template(_messages(item, False), tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(_messages(item, True), tokenize=False)
    except Exception:  # noqa: BLE001 - no template, a template rejecting a system turn...
        if item_field(item, "system", None):  # retry with the system text folded into the prompt
            prompt = f"{item_field(item, 'system')}\n\n{item_field(item, 'prompt')}"
            folded = {"kind": "pair", "prompt": prompt, "response": item_field(item, "response")}
            return _render_template(tokenizer, folded)
        return None
    if not isinstance(prefix, str) or not isinstance(full, str) or not full.startswith(prefix) \
            or len(full) == len(prefix):
        return None
    return prefix, full


def _plain_prompt(item: Any) -> str:
    return plain_prompt(_messages(item, False))


def has_usable_template(tokenizer: Any) -> bool:
    """The tokenizer has a chat template whose prompt rendering is a prefix of the full one."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = {"kind": "pair", "prompt": _PROBE[0], "response": _PROBE[1]}
    return _render_template(tokenizer, probe) is not None


def resolve_format(tokenizer: Any, chat_format: str) -> str:
    """'template' or 'plain' for ``model.chat_format`` (auto|template|few-shot|plain) and this
    tokenizer."""
    if chat_format in ("plain", "few-shot"):
        return "plain"
    usable = has_usable_template(tokenizer)
    if chat_format == "template" and not usable:
        return "plain"  # documented fallback: a tokenizer without a usable template
    return "template" if usable else "plain"


def _tokenize_split(tokenizer: Any, prefix: str, completion: str,
                    special: bool) -> tuple[list[int], int]:
    """Token ids of ``prefix + completion`` and how many of them are the prompt's.

    Normally the ids of ``prefix`` are a prefix of the ids of the whole text. When a merge
    crosses the boundary (a template whose last prompt piece is plain text, such as
    ``<|assistant|>\n``), the prompt's own ids are kept and the completion is tokenised
    on its own: at inference the model is given exactly those prompt ids and must continue
    from there, so that is what it has to learn.
    """
    full_ids = list(tokenizer(prefix + completion, add_special_tokens=special)["input_ids"])
    prefix_ids = list(tokenizer(prefix, add_special_tokens=special)["input_ids"])
    if full_ids[: len(prefix_ids)] == prefix_ids and len(full_ids) > len(prefix_ids):
        return full_ids, len(prefix_ids)
    completion_ids = list(tokenizer(completion.lstrip(" "), add_special_tokens=False)["input_ids"])
    return prefix_ids + completion_ids, len(prefix_ids)


def _eos(tokenizer: Any) -> int | None:
    eos = tokenizer.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos


def _truncate(ids: list[int], n_prompt: int, max_len: int,
              bos: int | None) -> tuple[list[int], int]:
    """Fit into ``max_len``: drop prompt tokens from the left (keeping BOS), then response tail."""
    if len(ids) <= max_len:
        return ids, n_prompt
    head = ids[:1] if bos is not None and ids and ids[0] == bos and n_prompt > 0 else []
    prompt = ids[len(head):n_prompt]
    response = ids[n_prompt:]
    room = max_len - len(head) - len(response)
    if room >= 0:
        kept = prompt[len(prompt) - room:] if room else []
        out = head + kept + response
        return out, len(head) + len(kept)
    response = response[: max_len - len(head)]
    return head + response, len(head)


def format_item(item: Any, tokenizer: Any, chat_format: str, max_seq_len: int) -> Example:
    """One item as an :class:`Example`. ``chat_format`` is 'template' or 'plain' (resolved)."""
    bos = tokenizer.bos_token_id
    kind = item_field(item, "kind", "pair")
    if kind == "text":
        ids = list(tokenizer(item_text(item), add_special_tokens=True)["input_ids"])
        eos = _eos(tokenizer)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        ids = ids[:max_seq_len]
        labels = [IGNORE if bos is not None and i == 0 and t == bos else t
                  for i, t in enumerate(ids)]
        return Example(ids, labels, "text")

    used = "plain"
    if chat_format == "template":
        rendered = _render_template(tokenizer, item)
        if rendered is not None:
            prefix, full = rendered
            ids, n_prompt = _tokenize_split(tokenizer, prefix, full[len(prefix):], special=False)
            used = "template"
    if used == "plain":
        prefix = _plain_prompt(item)
        ids, n_prompt = _tokenize_split(tokenizer, prefix, f" {item_field(item, 'response') or ''}",
                                        special=True)
        eos = _eos(tokenizer)
        if eos is not None:
            ids.append(eos)
    ids, n_prompt = _truncate(ids, n_prompt, max_seq_len, bos)
    labels = [IGNORE] * n_prompt + ids[n_prompt:]
    return Example(ids, labels, used)


def format_items(items: list[Any], tokenizer: Any, chat_format: str,
                 max_seq_len: int) -> list[Example]:
    """Every item (``chat_format`` may be 'auto'); items left with no labelled token are dropped."""
    resolved = resolve_format(tokenizer, chat_format)
    examples = [format_item(item, tokenizer, resolved, max_seq_len) for item in items]
    return [ex for ex in examples if ex.n_labelled > 0]


def prompt_text(item: Any, tokenizer: Any, chat_format: str) -> str:
    """The text a model is given to answer ``item`` at eval time (the training prompt part).

    Template text already carries its special tokens: tokenize it with
    ``add_special_tokens=False``; plain text needs them (see :func:`prompt_ids`).
    """
    resolved = chat_format if chat_format in ("template", "plain") else resolve_format(tokenizer, chat_format)
    if resolved == "template":
        rendered = _render_template(tokenizer, item)
        if rendered is not None:
            return rendered[0]
    return _plain_prompt(item)


def prompt_ids(item: Any, tokenizer: Any, chat_format: str) -> list[int]:
    """Token ids of :func:`prompt_text`, exactly as training tokenised the prompt."""
    resolved = chat_format if chat_format in ("template", "plain") else resolve_format(tokenizer, chat_format)
    if resolved == "template":
        rendered = _render_template(tokenizer, item)
        if rendered is not None:
            return list(tokenizer(rendered[0], add_special_tokens=False)["input_ids"])
    return list(tokenizer(_plain_prompt(item), add_special_tokens=True)["input_ids"])
