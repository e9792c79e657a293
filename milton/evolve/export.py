"""Hugging Face model -> GGUF (llama.cpp's converter) -> quantized GGUFs (llama_model_quantize).

The converter is the one extracted from the installed llama-cpp-python's sdist, so the file
format always matches the runtime that serves it; quantization is llama.cpp's own C code,
called through llama-cpp-python. Every file is written beside its final name and renamed in.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from milton.core.config import Settings
from milton.core.errors import ConfigError
from milton.models.convert import ConversionError, check_gguf, hf_to_gguf

#: GGUF types evolve can make, by the names llama.cpp's quantize tool uses.
FTYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
UNQUANTIZED = "f16"
#: Tensor types the token embedding (and a tied output layer) can be given: ``q4_k_m+q6_k`` is
#: q4_k_m with the embedding in q6_k. On Gemma 3 270M the 262k-token embedding is 168M of 268M
#: weights, so its type decides most of the file's size and the output layer's decode time.
TENSOR_TYPES = {"f16": 1, "q8_0": 8, "q6_k": 14, "q5_k": 13, "q5_0": 6, "q4_k": 12, "q4_0": 2,
                "q3_k": 11}


def split_type(kind: str) -> tuple[str, str | None]:
    """``"q4_k_m+q6_k"`` -> ``("q4_k_m", "q6_k")``; ``"q8_0"`` -> ``("q8_0", None)``."""
    ftype, _, embedding = kind.partition("+")
    return ftype, embedding or None


def check_types(settings: Settings) -> list[str]:
    """evolve.quantizations and evolve.promote_type, validated: one-line errors naming the key."""
    types = [t.lower() for t in settings.evolve.quantizations]
    for i, name in enumerate(types):
        ftype, embedding = split_type(name)
        if ftype not in FTYPES:
            raise ConfigError(f"evolve.quantizations[{i}]: unknown GGUF type {ftype!r} "
                              f"(one of {', '.join(sorted(FTYPES))})")
        if embedding is not None and embedding not in TENSOR_TYPES:
            raise ConfigError(f"evolve.quantizations[{i}]: unknown embedding type {embedding!r} "
                              f"after '+' (one of {', '.join(TENSOR_TYPES)})")
    promote = settings.evolve.promote_type.lower()
    if promote and promote not in {UNQUANTIZED, *types}:
        raise ConfigError(f"evolve.promote_type: {promote!r} is not made by this run "
                          f"(evolve.quantizations = {types}; f16 is always made)")
    return [t for t in dict.fromkeys(types) if t != UNQUANTIZED]


def file_type(gguf_path: Path) -> str | None:
    """The evolve type name (``q4_k_m``...) of a GGUF's ``general.file_type``, if it is one."""
    import gguf
    import llama_cpp

    field = gguf.GGUFReader(gguf_path).fields.get("general.file_type")
    value = int(field.contents()) if field is not None else None
    return next((name for name, const in FTYPES.items() if getattr(llama_cpp, const) == value), None)


def gguf_name(kind: str) -> str:
    return f"model-{kind}.gguf"


def quantize(source: Path, target: Path, kind: str, *, threads: int = 0) -> Path:
    """``source`` (an f16/f32 GGUF) quantized to ``kind`` by llama.cpp, written atomically."""
    import llama_cpp

    ftype, embedding = split_type(kind)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.nthread = threads
    if embedding is not None:
        params.token_embedding_type = TENSOR_TYPES[embedding]
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(),
                                            ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise ConversionError(f"llama_model_quantize {source.name} -> {kind} failed (code {rc})")
        check_gguf(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def hf_metadata(hf_dir: Path, arch: str) -> dict[str, Any]:
    """GGUF keys the converter leaves out but llama.cpp needs to run ``hf_dir`` exactly.

    * ``{arch}.attention.sliding_window_pattern``: Gemma 3's per-layer sliding/full attention,
      from ``layer_types``. Without it llama.cpp assumes every 6th layer is full, which a
      student made of a subset of the teacher's layers breaks (its full layers move).
    * ``{arch}.context_length``: ``max_position_embeddings`` when the converter wrote none or 0.
    """
    try:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    config = config.get("text_config") or config
    out: dict[str, Any] = {}
    types = config.get("layer_types")
    if isinstance(types, list) and types and arch.startswith("gemma3"):
        out[f"{arch}.attention.sliding_window_pattern"] = [t == "sliding_attention" for t in types]
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and context > 0:
        out[f"{arch}.context_length"] = context
    return out


def gguf_fields(reader: Any) -> list[Any]:
    """A GGUFReader's key/value fields that a GGUFWriter does not write by itself."""
    return [f for f in reader.fields.values()
            if f.name != "general.architecture" and not f.name.startswith("GGUF.")]


def add_field(writer: Any, field: Any, value: Any) -> None:
    """``field`` (read from a GGUF) written to ``writer`` with ``value``, in the field's type."""
    import gguf

    vtype = field.types[0]
    writer.add_key_value(field.name, value, vtype,
                         sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)


def rewrite_gguf(target: Path, out: Path, *, vocab_from: Path | None = None,
                 keys: dict[str, Any] | None = None) -> Path:
    """``target`` rewritten to ``out`` with the tokenizer (``tokenizer.*`` keys) of
    ``vocab_from`` and with ``keys`` set (see :func:`hf_metadata`); tensors unchanged.

    A model loaded from a GGUF comes with a tokenizer transformers rebuilt from it; converted
    back, its merge scores are not the original ones, so llama.cpp would split some words
    differently from the model serve runs today (and from the ids every stage was trained and
    measured on). The student shares the teacher's vocabulary, so the original table is
    copied over verbatim; tensors and all other keys are copied unchanged.
    """
    import gguf

    src = gguf.GGUFReader(target)
    ref = gguf.GGUFReader(vocab_from) if vocab_from is not None else src
    ref_vocab = ref.fields.get("tokenizer.ggml.tokens")
    src_vocab = src.fields.get("tokenizer.ggml.tokens")
    if ref_vocab is None or src_vocab is None or len(ref_vocab.data) != len(src_vocab.data):
        raise ConversionError(f"{target.name}: its vocabulary does not match "
                              f"{Path(vocab_from or target).name}'s")
    arch = str(src.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=src.endianess)
    keys = dict(keys or {})

    def copy(reader: Any, keep: Callable[[str], bool]) -> None:
        for field in gguf_fields(reader):
            if keep(field.name):
                add_field(writer, field, field.contents())

    context = src.fields.get(f"{arch}.context_length")
    if context is not None and int(context.contents() or 0) > 0:
        keys.pop(f"{arch}.context_length", None)  # the converter's own value stands
    copy(src, lambda name: not name.startswith("tokenizer.") and name not in keys)
    copy(ref, lambda name: name.startswith("tokenizer."))
    for name, value in keys.items():
        if isinstance(value, list):
            writer.add_array(name, value)
        elif isinstance(value, bool):
            writer.add_bool(name, value)
        else:
            writer.add_uint32(name, int(value))
    for tensor in src.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in src.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=src.endianess)
    writer.close()
    check_gguf(out)
    return out


def export_ggufs(settings: Settings, hf_dir: Path, out_dir: Path, types: Sequence[str], *,
                 threads: int = 0, vocab_from: Path | None = None) -> dict[str, Path]:
    """``{"f16": ..., "q8_0": ..., ...}`` for the model in ``hf_dir``, made in ``out_dir``;
    with ``vocab_from`` (a GGUF), its tokenizer replaces the converted one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / gguf_name(UNQUANTIZED)
    if not f16.is_file():
        tmp = out_dir / f".{f16.name}.tmp"
        tmp.unlink(missing_ok=True)
        hf_to_gguf(settings, hf_dir, tmp, outtype="f16")
        import gguf

        arch = str(gguf.GGUFReader(tmp).fields["general.architecture"].contents())
        keys = hf_metadata(hf_dir, arch)
        if vocab_from is not None or keys:
            fixed = out_dir / f".{f16.name}.fixed.tmp"
            try:
                rewrite_gguf(tmp, fixed, vocab_from=vocab_from, keys=keys)
                os.replace(fixed, tmp)
            finally:
                fixed.unlink(missing_ok=True)
        os.replace(tmp, f16)
    out = {UNQUANTIZED: f16}
    for kind in types:
        target = out_dir / gguf_name(kind)
        out[kind] = target if target.is_file() else quantize(f16, target, kind, threads=threads)
    return out
