"""A tiny Llama-style language model built inside a test: no hub, seconds on a CPU.

``build_tiny_llama(directory, texts)`` trains a SentencePiece BPE tokenizer on ``texts`` laid
out like Llama 2's (``<unk>``/``<s>``/``</s>`` controls, ``<0xNN>`` byte fallback, a dummy "▁"
prefix) and writes it twice: as ``tokenizer.model``, which llama.cpp's ``convert_hf_to_gguf.py``
reads with the pieces' scores (so llama.cpp's SPM tokenizer merges in the same order), and as
the equivalent HF ``tokenizer.json`` (BPE with byte fallback, Prepend/Replace normalizer, no
pre-tokenizer) that transformers uses. Both tokenise text to the same ids. The model is a
randomly initialised (seeded), briefly pre-trained 2-layer ``LlamaForCausalLM``, saved with
``save_pretrained`` into ``directory``, a complete local HF model directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def _sentencepiece_corpus(texts: Iterable[str]) -> list[str]:
    """Training sentences for the SentencePiece model: ``</s>`` is a control token, never text."""
    out = []
    for text in [*pretraining_texts(), *texts]:
        out.extend(part for part in text.split("</s>") if part.strip())
    return out


def train_sentencepiece(texts: Iterable[str], vocab_size: int = 512) -> bytes:
    """A serialised SentencePiece BPE model (``tokenizer.model``), laid out like Llama 2's.

    ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, byte pieces ``<0x00>``..``<0xFF>`` 3-258, then the
    learnt pieces with their scores (minus the merge rank); identity normalisation, a dummy
    "▁" prefix, whitespace kept as is, digits split. Single-threaded, so deterministic.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentencepiece_corpus(texts)), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def tokenizer_from_sentencepiece(proto: bytes, *, chat_template: bool = True):
    """The ``tokenizer.json`` twin of a SentencePiece BPE model, as HF's Llama converter builds it.

    BPE over the same pieces, merges ranked by the merged piece's score (what SentencePiece and
    llama.cpp's SPM tokenizer pick next), ``byte_fallback``; normalizer Prepend("▁") then
    Replace(" ", "▁") and no pre-tokenizer; decoder Replace/ByteFallback/Fuse/Strip. Text
    therefore tokenises to the same ids in transformers, SentencePiece and llama.cpp.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_proto=proto)
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    if [sp.id_to_piece(i) for i in range(len(SPECIALS))] != list(SPECIALS):
        raise ValueError("expected <unk>, <s>, </s> as ids 0-2")
    pieces = {sp.id_to_piece(i): sp.get_score(i) for i in range(size)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges: list[tuple[str, str, float]] = []
    for piece, score in pieces.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in pieces and piece[k:] in pieces]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (-m[2], len(m[0]), len(m[1])))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
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


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, chat_template: bool = True):
    """A Llama-2-like ``PreTrainedTokenizerFast`` trained on ``texts`` (not saved).

    Its SentencePiece model is kept as ``tokenizer.sentencepiece_model`` (bytes):
    :func:`build_tiny_llama` writes it as ``tokenizer.model``, which llama.cpp's converter
    reads (with the pieces' scores) in preference to ``tokenizer.json``.
    """
    proto = train_sentencepiece(texts, vocab_size)
    fast = tokenizer_from_sentencepiece(proto, chat_template=chat_template)
    fast.sentencepiece_model = proto
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
    (directory / "tokenizer.model").write_bytes(tokenizer.sentencepiece_model)
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


def build_tiny_gguf(root: Path | str, texts: Iterable[str] = (), *, name: str = "tiny",
                    **model: Any) -> tuple[Path, Path]:
    """(HF directory, GGUF file): :func:`build_tiny_llama` in ``root/<name>-hf``, converted by
    llama.cpp's own converter to ``root/<name>.gguf`` for llama-cpp-python."""
    from milton.core.config import load_settings
    from milton.models.convert import hf_to_gguf

    root = Path(root)
    hf = build_tiny_llama(root / f"{name}-hf", texts, **model)
    return hf, hf_to_gguf(load_settings(environ={}).settings, hf, root / f"{name}.gguf")


#: Every projection of the tiny Llama: a 64-wide model needs the MLP adapted too to memorise
#: a fact in a few dozen steps.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Ways a fact's question is asked in training, so the adapter answers the question itself.
PARAPHRASES = ("{q}", "Remind me: {q}", "I forgot, {q}")


def train_tiny_adapter(hf: Path | str, question: str, answer: str, out: Path | str, *,
                       steps: int = 60, learning_rate: float = 1e-2) -> Path:
    """Teach the tiny base one fact with milton's own ``train_lora`` (1 thread, seeded) and
    export it as train-lora does (llama.cpp's converter); the adapter GGUF's path.

    ``out`` receives ``adapter/`` (PEFT), ``base/`` (config) and ``adapter.gguf``.
    """
    import torch

    from milton.core.config import TrainConfig, load_settings
    from milton.models.convert import lora_to_gguf
    from milton.models.hf import load_base, save_base_config
    from milton.models.refs import BaseModelRef
    from milton.train.lora import save_adapter, train_lora

    out = Path(out)
    ref = BaseModelRef(path=Path(hf), kind="hf", sha256="0" * 64, name="hf")
    cfg = TrainConfig(learning_rate=learning_rate, batch_size=4, grad_accum=1, epochs=100,
                      max_steps=steps, checkpoint_every=1000, max_seq_len=64, warmup_ratio=0.1,
                      seed=0, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only fight over a busy CPU
    try:
        model, tokenizer = load_base(ref, device="cpu", threads=1)
        items = [{"kind": "pair", "prompt": p.format(q=question), "response": answer}
                 for p in PARAPHRASES]
        result = train_lora(model, tokenizer, items, cfg, checkpoint_dir=out / "checkpoints",
                            progress=False)
        save_adapter(result.model, out / "adapter")
        save_base_config(ref, result.model, out / "base")
    finally:
        torch.set_num_threads(threads)
    return lora_to_gguf(load_settings(environ={}).settings, out / "adapter", out / "base",
                        out / "adapter.gguf")
