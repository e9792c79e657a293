"""A tiny Llama-style language model built inside a test: no hub, seconds on a CPU.

``build_tiny_llama(directory, texts)`` trains a byte-fallback BPE tokenizer on ``texts`` with
the ``tokenizers`` library, laid out like a Hugging Face Llama ``tokenizer.json`` (Metaspace
"▁" pre-tokenizer, ``<unk>``/``<s>``/``</s>`` specials, ``<0xNN>`` byte tokens, a
ByteFallback decoder sequence), so llama.cpp's ``convert_hf_to_gguf.py`` takes its llama path
(gguf's ``LlamaHfVocab``); and a randomly initialised (seeded) 2-layer ``LlamaForCausalLM``.
Both are saved with ``save_pretrained`` into ``directory``, a complete local HF model directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

#: A small chat template: plain-text role markers, each turn closed by ``</s>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SPECIALS = ("<unk>", "<s>", "</s>")

#: Ordinary English the base is pre-trained on, so it is a (very) small language model rather
#: than noise: LoRA then has something to keep (regression) and something to add (facts).
GENERAL_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The meeting is on Tuesday at ten in the morning.",
    "Please remember to back up the database before the upgrade.",
    "The sun rises in the east and sets in the west.",
    "A week has seven days and a year has twelve months.",
    "The cat is sleeping on the warm windowsill.",
    "We went to the market to buy apples, bread and cheese.",
    "The train to the city leaves every hour from platform two.",
    "She wrote a long letter to her friend in another country.",
    "The server restarted after the update was installed.",
    "It is raining today, so take an umbrella with you.",
    "The children played football in the park after school.",
    "He drinks a cup of coffee every morning before work.",
    "The library is open from nine in the morning until six in the evening.",
    "Our team released a new version of the application last week.",
    "The river flows through the valley to the sea.",
    "Please close the door when you leave the room.",
    "The museum has a large collection of old paintings.",
    "My phone battery is almost empty, I need to charge it.",
    "You are a helpful assistant.",
]

#: Questions and answers the base is pre-trained on, in both the plain and the template
#: format, so "things the model already knows" can be measured (a broken run forgets them).
KNOWN_QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is the sky on a clear day?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "A week has seven days."),
]


def pretraining_texts() -> list[str]:
    """The base's whole pre-training corpus (BOS is added when tokenised)."""
    plain = [f"User: {q}\nAssistant: {a}</s>" for q, a in KNOWN_QA]
    templated = [f"<|user|>\n{q}</s>\n<|assistant|>\n{a}</s>\n" for q, a in KNOWN_QA]
    return [*GENERAL_TEXT, *plain, *templated]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, chat_template: bool = True):
    """A llama-like ``PreTrainedTokenizerFast`` trained on ``texts`` (not saved).

    Laid out as Llama's: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the 256 byte tokens ``<0x00>``..
    ``<0xFF>`` as ordinary vocabulary entries (3-258), then the learnt pieces and merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    # split=True keeps merges inside words, as SentencePiece's training does.
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  min_frequency=2, show_progress=False, max_token_length=16)
    learner.train_from_iterator([*pretraining_texts(), *texts], trainer=trainer)
    learnt = json.loads(learner.to_str())["model"]

    vocab: dict[str, int] = {name: i for i, name in enumerate(SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                            special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        padding_side="right",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(directory: Path | str, texts: Iterable[str] = (), *, vocab_size: int = 512,
                     hidden_size: int = 64, layers: int = 2, heads: int = 4,
                     intermediate_size: int = 256, max_positions: int = 512, seed: int = 0,
                     init_std: float = 0.1, lm_head_std: float | None = None,
                     chat_template: bool = True, pretrain_steps: int = 60) -> Path:
    """Write a tiny HF Llama model directory (tokenizer + weights) and return it.

    Weights are randomly initialised (seeded), then trained on :func:`pretraining_texts` for
    ``pretrain_steps`` full-model steps (0 = leave them random); ``texts`` only shape the
    tokenizer's vocabulary, so facts in them stay unknown to the model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts, vocab_size, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if lm_head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, lm_head_std)
    if pretrain_steps:
        _pretrain(model, tokenizer, pretraining_texts(), pretrain_steps)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)
    return directory


def _pretrain(model, tokenizer, texts: list[str], steps: int, lr: float = 3e-3) -> None:
    """Plain full-model next-token training on ``texts`` (one padded batch, AdamW)."""
    import torch

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only fight over a busy CPU
    model.train()
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
    finally:
        model.eval()
        torch.set_num_threads(threads)
