"""Vocabulary trimming on a tiny Llama converted by llama.cpp's own converter, run in llama.cpp.

The claims checked: a trimmed GGUF (f16 or already quantized) loads and computes the same
logits as the full one on the tokens it keeps; text made of kept tokens is split exactly as
before; text that needs a dropped token still round-trips; its perplexity is measured on the
same text (over the original token count), so a trim that drops what the text needs shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_lm import build_tiny_gguf

TEXTS = ["The build server is called zephyr-07.", "The wiki listens on port 8443.",
         "Priya owns the backup rota.", "Staging runs on pg-staging-3."]
#: Words the tiny tokenizer learned whole (it is trained on TEXTS) and a trim may drop.
OTHER = "Quarterly zephyr backups of the staging wiki"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_gguf(tmp_path_factory.mktemp("vocab"), TEXTS, layers=1, pretrain_steps=0)


def _llm(path: Path, **kw):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, **kw)


def _ids(path: Path, text: str) -> list[int]:
    llm = _llm(path, vocab_only=True)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=False)
    finally:
        llm.close()


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = _llm(path, logits_all=True)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()


def _trimmed(tiny, tmp_path, source: Path | None = None):
    from milton.evolve.vocab import keep_ids, read_vocab, trim_gguf

    _, gguf = tiny
    full = read_vocab(gguf)
    user = _ids(gguf, TEXTS[0])  # the user's data: its tokens are kept whatever their score
    kept = keep_ids(full, top=40, data=[user])
    out = trim_gguf(source or gguf, tmp_path / "trimmed.gguf", kept)
    return full, kept, out


def test_kept_tokens_give_the_same_split_and_logits(tiny, tmp_path):
    from milton.evolve.measure import same_tokenizer
    from milton.evolve.vocab import kept_ids, read_vocab

    _, gguf = tiny
    full, kept, out = _trimmed(tiny, tmp_path)
    assert len(kept) < len(full.tokens)  # something was dropped
    assert kept_ids(out) == kept and kept_ids(gguf) is None
    trimmed = read_vocab(out)
    assert trimmed.tokens == [full.tokens[i] for i in kept]
    # Every byte token and every piece of a kept token is kept (the closure).
    assert all(i in kept for i, t in enumerate(full.types) if t == 6)
    # The user's text splits as it did (renumbered), and the logits over kept tokens are the same.
    assert same_tokenizer(gguf, out, TEXTS[:1], kept=kept) is None
    ids = _ids(gguf, TEXTS[0])
    new = {old: n for n, old in enumerate(kept)}
    assert _ids(out, TEXTS[0]) == [new[i] for i in ids]
    full_logits, cut_logits = _logits(gguf, ids)[:, kept], _logits(out, [new[i] for i in ids])
    assert np.abs(full_logits - cut_logits).max() < 1e-3
    # The trimmed model's special ids are renumbered too: it still starts with BOS.
    assert trimmed.tokens[_ids(out, "x")[0]] == full.tokens[ids[0]]


def test_text_with_dropped_tokens_round_trips_and_is_measured_on_the_same_text(tiny, tmp_path):
    from milton.evolve.measure import gguf_perplexity
    from milton.evolve.vocab import translate
    from milton.train.formatting import IGNORE, Example

    _, gguf = tiny
    full, kept, out = _trimmed(tiny, tmp_path)
    ids = _ids(gguf, OTHER)
    assert any(i not in kept for i in ids), "the trim should drop a token this text needs"
    llm = _llm(out, vocab_only=True)
    try:
        cut = llm.tokenize(OTHER.encode(), add_bos=True, special=False)
        assert llm.detokenize(cut).decode() == OTHER  # nothing lost, just more pieces
        assert len(cut) > len(ids)
    finally:
        llm.close()
    example = Example(input_ids=ids, labels=[IGNORE] + ids[1:], format="text")
    [moved] = translate([example], full, kept)
    assert llm_text(out, moved.input_ids) == llm_text(gguf, ids)
    assert sum(label != IGNORE for label in moved.labels) >= len(ids) - 1
    # Perplexity of the same text: the full model's figure and the trimmed one's, both over
    # the original token count; the trimmed one is worse (it has to spell dropped words).
    full_ppl = gguf_perplexity(gguf, [example], threads=1)
    cut_ppl = gguf_perplexity(out, [example], threads=1, full_vocab=full)
    assert full_ppl is not None and cut_ppl is not None and cut_ppl > full_ppl
    with pytest.raises(ValueError, match="trimmed vocabulary"):
        gguf_perplexity(out, [example], threads=1)


def llm_text(path: Path, ids: list[int]) -> str:
    llm = _llm(path, vocab_only=True)
    try:
        return llm.detokenize(ids).decode()
    finally:
        llm.close()


def test_a_quantized_file_is_trimmed_without_requantizing(tiny, tmp_path):
    from milton.evolve.export import quantize

    _, gguf = tiny
    q8 = quantize(gguf, tmp_path / "q8.gguf", "q8_0", threads=1)
    _, kept, out = _trimmed(tiny, tmp_path, source=q8)
    assert out.stat().st_size < q8.stat().st_size
    ids = _ids(gguf, TEXTS[0])
    new = {old: n for n, old in enumerate(kept)}
    assert np.abs(_logits(q8, ids)[:, kept] - _logits(out, [new[i] for i in ids])).max() < 1e-3


def test_what_cannot_be_trimmed_says_why(tiny, tmp_path):
    from milton.evolve.vocab import read_vocab, trim_gguf, unsupported
    from milton.models.convert import ConversionError

    _, gguf = tiny
    assert unsupported(read_vocab(gguf)) is None
    _, _, out = _trimmed(tiny, tmp_path)
    assert unsupported(read_vocab(out)) == "already trimmed"
    with pytest.raises(ConversionError, match="ascending"):
        trim_gguf(gguf, tmp_path / "bad.gguf", [5, 3])
    assert not (tmp_path / "bad.gguf").exists()


def test_a_trimmed_file_is_asked_the_same_question(tmp_path):
    """The gate's recall probes: prompts in the full vocabulary's ids, answered greedily by a
    full and a trimmed file alike (a trimmed one is given the same text), cut at the stops."""
    from llama_cpp import Llama

    from milton.evolve.measure import gguf_answers

    tiny = build_tiny_gguf(tmp_path, TEXTS, layers=1, pretrain_steps=120)  # it writes words, not bytes
    _, gguf = tiny
    full, kept, out = _trimmed(tiny, tmp_path)
    prompt = _ids(gguf, "The build server is")
    llm = Llama(model_path=str(gguf), n_ctx=128, n_threads=1, verbose=False)
    try:
        greedy = llm.create_completion("The build server is", max_tokens=6, temperature=0.0)
    finally:
        llm.close()
    expected = greedy["choices"][0]["text"].strip()
    [answer] = gguf_answers(gguf, [prompt], threads=1, max_new_tokens=6)
    assert answer == expected and answer
    [cut] = gguf_answers(gguf, [prompt], threads=1, max_new_tokens=6, stops=[expected.split()[0]])
    assert cut == ""
    [trimmed] = gguf_answers(out, [prompt], threads=1, max_new_tokens=6, full_vocab=full)
    assert isinstance(trimmed, str)
    with pytest.raises(ValueError, match="trimmed vocabulary"):
        gguf_answers(out, [prompt], threads=1)
