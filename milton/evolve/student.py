"""The student that evolve distils into: a shallower copy of the teacher, or a given model.

A derived student keeps the teacher's embeddings, final norm, lm_head and an evenly spaced
subset of its decoder layers (always the first and the last). Starting from the teacher's own
weights rather than random ones means distillation only has to repair the gaps left by the
dropped layers, which a few hundred steps on a CPU can do; a random student could not.

The student is built from a fresh config of the same class (``num_hidden_layers`` and every
per-layer list such as Gemma 3's ``layer_types`` cut down consistently), so each module is
constructed with its new ``layer_idx`` and layer type, and ``save_pretrained`` output loads back
with ``AutoModelForCausalLM``. Weights are copied, never shared with the teacher.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

from milton.core.config import EvolveConfig
from milton.core.errors import ConfigError

#: List-valued config fields that are never per-layer, whatever their length. Any other list
#: as long as the layer count (``layer_types``, SmolLM3's ``no_rope_layers``...) is per-layer.
_NOT_PER_LAYER = re.compile(r"(_token_ids?|^architectures)$")


# -- layer choice -------------------------------------------------------------------------------
def _n_layers(config: Any) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if n is None and hasattr(config, "get_text_config"):
        n = getattr(config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError("the teacher's config has no num_hidden_layers")
    return n


def _half_up(x: float) -> int:
    """Round half up: Python's round() is banker's, which can repeat a layer index."""
    return math.floor(x + 0.5)


def default_student_layers(teacher_config: Any) -> int:
    """Two thirds of the teacher's layers, rounded, at least 1 and fewer than the teacher's."""
    n = _n_layers(teacher_config)
    chosen = max(1, _half_up(2 * n / 3))
    return min(chosen, n - 1) if n >= 2 else 1


def choose_layers(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` evenly spaced teacher layer indices, first and last included."""
    if not 1 <= n_student <= n_teacher:
        raise ConfigError(f"evolve.student_layers: {n_student} is not between 1 and the "
                          f"teacher's {n_teacher} layers")
    if n_student == 1:
        return [0]
    step = (n_teacher - 1) / (n_student - 1)
    return [_half_up(i * step) for i in range(n_student)]


# -- deriving -----------------------------------------------------------------------------------
def _decoder_layers(model: Any, n: int) -> str:
    """Dotted name of the ModuleList holding the ``n`` decoder layers (``model.layers``)."""
    import torch

    found = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == n
             and name.split(".")[-1] in ("layers", "h", "blocks", "layer")]
    if len(found) != 1:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} "
                         f"(candidates: {found})")
    return found[0]


def student_config(config: Any, chosen: list[int]) -> Any:
    """The teacher's config with ``len(chosen)`` layers and per-layer lists subset to match."""
    n = _n_layers(config)
    data = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        data.pop(key, None)
    for key, value in list(data.items()):
        if isinstance(value, (list, tuple)) and len(value) == n and not _NOT_PER_LAYER.search(key):
            data[key] = [value[i] for i in chosen]
    data["num_hidden_layers"] = len(chosen)
    new = type(config).from_dict(data)
    attn = getattr(config, "_attn_implementation", None)
    if attn:
        new._attn_implementation = attn
    return new


def derive_student(teacher: Any, n_layers: int) -> Any:
    """A new model of the teacher's class with ``n_layers`` of its layers (see module doc)."""
    import torch

    if hasattr(teacher, "peft_config"):
        raise ValueError("merge the LoRA adapter into the teacher before deriving a student")
    n_teacher = _n_layers(teacher.config)
    chosen = choose_layers(n_teacher, n_layers)
    prefix = _decoder_layers(teacher, n_teacher)
    config = student_config(teacher.config, chosen)
    param = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's RNG
        student = type(teacher)._from_config(config, dtype=param.dtype)
    source = {new: old for new, old in enumerate(chosen)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    teacher_state = teacher.state_dict()
    mapped: dict[str, Any] = {}
    for key in student.state_dict():
        match = pattern.match(key)
        src = f"{prefix}.{source[int(match.group(1))]}.{match.group(2)}" if match else key
        if src not in teacher_state:
            raise ValueError(f"derive_student: the teacher has no weight {src} for {key}")
        mapped[key] = teacher_state[src]
    student.load_state_dict(mapped, strict=True)  # copies: nothing is shared with the teacher
    _fix_layer_idx(student, prefix)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.to(param.device)
    student.train(teacher.training)
    return student


def _fix_layer_idx(model: Any, prefix: str) -> None:
    """Every module of decoder layer ``j`` that keeps a ``layer_idx`` says ``j`` (KV cache slot)."""
    layers = model.get_submodule(prefix)
    for j, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j


# -- loading ------------------------------------------------------------------------------------
def _output_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def load_student(evolve_cfg: EvolveConfig, teacher: Any, *, home: Path | None = None,
                 tokenizer: Any = None) -> Any:
    """``evolve.student`` (a local HF directory) or a student derived from ``teacher``.

    A relative ``evolve.student`` is taken from ``home`` (Milton's home) when given. With the
    teacher's ``tokenizer``, a student shipping its own tokenizer must have the same vocabulary
    (the same token -> id map), not just the same size: KD compares distributions id by id.
    """
    if not evolve_cfg.student.strip():
        n = evolve_cfg.student_layers or default_student_layers(teacher.config)
        return derive_student(teacher, n)
    path = _student_path(evolve_cfg.student, home)
    student = _load_hf(path, teacher)
    theirs, ours = _output_size(student), _output_size(teacher)
    if theirs != ours:
        raise ConfigError(f"evolve.student: {path} has a vocabulary of {theirs} tokens, the "
                          f"teacher's has {ours}; distillation needs the same token ids")
    if tokenizer is not None:
        _check_tokenizer(path, tokenizer)
    return student


def _student_path(configured: str, home: Path | None) -> Path:
    path = Path(configured.strip()).expanduser()
    if not path.is_absolute() and home is not None:
        path = Path(home) / path
    path = path.resolve()
    if not (path / "config.json").is_file():
        raise ConfigError(f"evolve.student: {path} is not a Hugging Face model directory "
                          "(no config.json)")
    return path


def _load_hf(path: Path, teacher: Any) -> Any:
    from milton.models.hf import error_line, offline

    offline()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    param = next(teacher.parameters())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=param.dtype,
                                                     local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the user's setting
        raise ConfigError(f"evolve.student: cannot load {path}: {error_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(param.device)
    model.eval()
    return model


def _check_tokenizer(path: Path, tokenizer: Any) -> None:
    """Same token -> id map as the teacher's tokenizer, when the student ships a tokenizer."""
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model",
                                                     "vocab.json", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no usable tokenizer: the weights' size was checked
        return
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"evolve.student: {path} has a different tokenizer vocabulary from "
                          "the teacher's; distillation needs the same token ids")
