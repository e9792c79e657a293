"""Vocabulary trimming: a GGUF whose token embedding keeps only the tokens its user needs.

Gemma 3's 262,144-token vocabulary is 168M of the 268M weights of the embedded model, and the
tied output layer multiplies every generated token by all of it: most of the file and most of
the decode time go to tokens (scripts, languages, markup) a user's English chat never meets.
Trimming keeps the ``top`` most frequent ordinary tokens (a SentencePiece vocabulary is
ordered by score), every token of the user's own data, the byte tokens (so any text can still
be written), the special tokens, and every token that is a piece of a kept one.

That last rule keeps the tokenizer consistent: llama.cpp's SentencePiece tokenizer builds a
token from its pieces, merging the best-scored adjacent pair whose concatenation is a token, so
every intermediate of a kept token is a kept token too, and any text made only of kept tokens
is split exactly as the full vocabulary splits it (the trimmed run makes the same choice at
every step: the pair it chose is still there, and no pair that is new can appear). Text that
needs a dropped token is split into smaller kept ones (down to bytes): it still round-trips.

Rows of the embedding (and of an untied output layer) are cut from the GGUF as stored, so a
quantized file is trimmed without requantizing (a quantization block never spans two rows).
The kept ids of the full vocabulary are written into the file (``TRIMMED_KEY``), so whatever
measures it can map token ids of the full vocabulary onto it (:func:`translate`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milton.evolve.export import add_field, gguf_fields
from milton.models.convert import ConversionError, check_gguf
from milton.train.formatting import IGNORE, Example

#: The kept ids of the full vocabulary, in order: token ``i`` of the trimmed file is token
#: ``kept[i]`` of the full one.
TRIMMED_KEY = "milton.vocab.kept_ids"
#: The tokenizer model trimming supports: llama.cpp's SentencePiece ("llama"; Gemma, Llama 2).
SPM = "llama"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: Placeholder control tokens (Gemma has ~6,000) that no text or template ever produces.
UNUSED_NAME = re.compile(r"<unused\d+>")
#: Tensors with one row per token.
VOCAB_TENSORS = ("token_embd.weight", "output.weight")
ID_KEYS = re.compile(r"tokenizer\.ggml\.\w+_token_id")


@dataclass(frozen=True)
class Vocab:
    """A GGUF's tokenizer table."""

    model: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    kept: list[int] | None  # set when the file is itself trimmed

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (SentencePiece: ``▁`` is a space, ``<0x0A>`` a byte)."""
        text = self.tokens[token]
        if self.types[token] == BYTE:
            return bytes([int(text[3:-1], 16)])
        return text.replace("\u2581", " ").encode("utf-8")


def read_vocab(path: Path) -> Vocab:
    import gguf

    fields = gguf.GGUFReader(path).fields

    def values(name: str) -> list[Any]:
        field = fields.get(name)
        return list(field.contents()) if field is not None else []

    model = fields.get("tokenizer.ggml.model")
    kept = fields.get(TRIMMED_KEY)
    return Vocab(model=str(model.contents()) if model is not None else "",
                 tokens=[str(t) for t in values("tokenizer.ggml.tokens")],
                 scores=[float(s) for s in values("tokenizer.ggml.scores")],
                 types=[int(t) for t in values("tokenizer.ggml.token_type")],
                 kept=[int(i) for i in kept.contents()] if kept is not None else None)


def kept_ids(path: Path) -> list[int] | None:
    """The full vocabulary's ids a trimmed GGUF keeps; None for an untrimmed one.

    Reading a GGUF's keys parses its whole tokenizer table (~5 s for Gemma's 262k tokens), and
    one evolve run asks this of each file four times; files are only ever written whole and
    renamed in, so the answer is cached by path, size and modification time.
    """
    stat = Path(path).stat()
    kept = _kept_ids(str(path), stat.st_size, stat.st_mtime_ns)
    return list(kept) if kept is not None else None


@functools.lru_cache(maxsize=64)
def _kept_ids(path: str, size: int, mtime_ns: int) -> tuple[int, ...] | None:
    import gguf

    field = gguf.GGUFReader(path).fields.get(TRIMMED_KEY)
    return tuple(int(i) for i in field.contents()) if field is not None else None


def unsupported(vocab: Vocab) -> str | None:
    """Why this vocabulary cannot be trimmed, or None."""
    if vocab.model != SPM:
        return f"tokenizer model {vocab.model or '(none)'!r}: only SentencePiece ({SPM!r}) is trimmed"
    if vocab.kept is not None:
        return "already trimmed"
    if not (len(vocab.tokens) == len(vocab.scores) == len(vocab.types)):
        return "tokens, scores and token types differ in length"
    return None


def keep_ids(vocab: Vocab, top: int, data: Iterable[Sequence[int]] = ()) -> list[int]:
    """The ids a trimmed vocabulary keeps, ascending (see the module docstring for the rule).

    ``top`` counts the best-scored ordinary tokens written only in the user's scripts: ASCII
    and every other character that occurs in ``data`` (ids of the user's own text).
    """
    types, tokens = vocab.types, vocab.tokens
    keep = {i for i, t in enumerate(types)
            if t in (UNKNOWN, USER_DEFINED, BYTE) or (t == CONTROL and not UNUSED_NAME.fullmatch(tokens[i]))}
    for ids in data:
        keep.update(i for i in ids if 0 <= i < len(tokens))
    chars = {c for i in keep if types[i] == NORMAL for c in tokens[i]}
    normal = sorted((i for i, t in enumerate(types) if t == NORMAL), key=lambda i: (-vocab.scores[i], i))
    written = [i for i in normal if all(c < "\x7f" or c in chars or c == "\u2581" for c in tokens[i])]
    keep.update(written[:max(0, top)])
    # Single characters last in score (Gemma puts digits there) but first in need: spelt as
    # byte tokens the model has never read "2026" or "3+5".
    keep.update(i for i in written if len(tokens[i]) == 1)
    index = {tokens[i]: i for i in normal}
    for i in [i for i in keep if types[i] == NORMAL]:
        text = tokens[i]
        for start in range(len(text)):
            for end in range(start + 1, len(text) + 1):
                j = index.get(text[start:end])
                if j is not None:
                    keep.add(j)
    return sorted(keep)


def trim_gguf(source: Path, out: Path, kept: Sequence[int]) -> Path:
    """``source`` with only the ``kept`` tokens (ids of its vocabulary, ascending), written to
    ``out`` atomically; tensors other than the embedding/output rows are copied unchanged."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    kept = list(kept)
    if not kept or kept != sorted(set(kept)) or kept[-1] >= n_vocab:
        raise ConversionError(f"{source.name}: kept token ids must be ascending ids below {n_vocab}")
    new_id = {old: new for new, old in enumerate(kept)}
    rows = np.asarray(kept, dtype=np.int64)
    arch = str(reader.fields["general.architecture"].contents())
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.unlink(missing_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    try:
        for field in gguf_fields(reader):
            name, value = field.name, field.contents()
            if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                value = [value[i] for i in kept]
            elif name == "tokenizer.ggml.merges":
                raise ConversionError(f"{source.name}: a BPE vocabulary (merges) is not trimmed")
            elif ID_KEYS.fullmatch(name):
                if int(value) not in new_id:
                    continue  # a special id the trimmed vocabulary dropped (e.g. an unused one)
                value = new_id[int(value)]
            add_field(writer, field, value)
        writer.add_array(TRIMMED_KEY, kept)
        tensors = []
        for tensor in reader.tensors:
            data = tensor.data
            if tensor.name in VOCAB_TENSORS:
                if data.shape[0] != n_vocab:
                    raise ConversionError(f"{source.name}: {tensor.name} has {data.shape[0]} rows, "
                                          f"the vocabulary {n_vocab} tokens")
                data = np.ascontiguousarray(data[rows])
            tensors.append((tensor, data))
            writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _tensor, data in tensors:
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        check_gguf(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_vocab_only(source: Path, out: Path) -> Path:
    """Every key of ``source`` and no tensors: its full tokenizer, kept beside a trimmed base so
    that next month's stages (converted from the full-vocabulary model) keep the same table."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    try:
        for field in gguf_fields(reader):
            add_field(writer, field, field.contents())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def spell(text: str, pieces: dict[str, int], byte_ids: dict[int, int]) -> list[int]:
    """``text`` (SentencePiece form, ``▁`` for spaces) in the fewest of ``pieces`` (string ->
    id), falling back to byte tokens (byte -> id) for characters no piece covers."""
    longest = max((len(p) for p in pieces), default=1)
    best: list[tuple[int, list[int]] | None] = [(0, [])] + [None] * len(text)
    for end in range(1, len(text) + 1):
        for start in range(max(0, end - longest), end):
            prev = best[start]
            if prev is None:
                continue
            token = pieces.get(text[start:end])
            if token is not None:
                ids = [token]
            elif end - start == 1:
                ids = [byte_ids[b] for b in text[start].encode("utf-8")]
            else:
                continue
            if best[end] is None or prev[0] + len(ids) < best[end][0]:  # type: ignore[index]
                best[end] = (prev[0] + len(ids), prev[1] + ids)
    done = best[-1]
    assert done is not None  # every character can be spelt in bytes
    return done[1]


def translate(examples: Sequence[Example], full: Vocab, kept: Sequence[int]) -> list[Example]:
    """``examples`` (ids of the full vocabulary) as ids of the vocabulary trimmed to ``kept``.

    A kept token is renumbered; a dropped one is spelt in the fewest kept tokens (bytes at
    worst), every piece labelled as it was. The text and what is scored stay the same, so a
    perplexity over the *original* token count (total NLL / the originals' labelled count)
    compares with the full model's.
    """
    new_id = {old: new for new, old in enumerate(kept)}
    pieces = {full.tokens[old]: new for new, old in enumerate(kept) if full.types[old] == NORMAL}
    byte_ids = {full.piece(old)[0]: new for new, old in enumerate(kept) if full.types[old] == BYTE}
    spelled: dict[int, list[int]] = {}
    out = []
    for ex in examples:
        ids: list[int] = []
        labels: list[int] = []
        for token, label in zip(ex.input_ids, ex.labels, strict=True):
            if token in new_id:
                parts = [new_id[token]]
            else:
                if token not in spelled:
                    spelled[token] = spell(full.tokens[token], pieces, byte_ids)
                parts = spelled[token]
            ids.extend(parts)
            labels.extend(parts if label != IGNORE else [IGNORE] * len(parts))
        out.append(Example(input_ids=ids, labels=labels, format=ex.format))
    return out
