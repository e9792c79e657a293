"""llama.cpp's converters: PEFT adapters and Hugging Face models to GGUF.

The adapter served by llama.cpp must be converted by the converter of the *same* llama.cpp
version that llama-cpp-python was built from; the only place both ship together is that
sdist (``vendor/llama.cpp/``). ``make install`` runs ``python -m milton.models.convert`` once,
which takes the sdist the wheel was built from (or downloads the installed version's from the
package registry; pip's cache usually has it) and extracts the scripts into the virtualenv.
Nothing is fetched at run time.

The converters run as a child process, with the sibling ``gguf-py`` of the same llama.cpp
version on their path, so they never mix with whatever ``gguf`` package is installed and a
crash in them cannot take the training job down. Offline: no hub lookups.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from importlib import metadata
from pathlib import Path

from milton.core.config import Settings
from milton.core.errors import ConfigError, MiltonError
from milton.models.layout import ADAPTER_CONFIG
from milton.models.refs import gguf_error

# -- installing the converters --------------------------------------------------------------
#: What the converters need from ``vendor/llama.cpp/``: the scripts, their sibling
#: ``conversion`` package and the matching ``gguf-py``.
MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
LORA_SCRIPT = "convert_lora_to_gguf.py"
HF_SCRIPT = "convert_hf_to_gguf.py"


def default_tools_dir() -> Path:
    return Path(sys.prefix) / "share" / "milton" / "llama.cpp"


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise MiltonError("llama-cpp-python is not installed: run `make install`") from None


def extract_tools(sdist: Path, dest: Path) -> Path:
    """Unpack the converter files from ``sdist`` into ``dest`` (replaced whole, atomically)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
    try:
        with tarfile.open(sdist) as tar:
            found = 0
            for member in tar.getmembers():
                parts = member.name.split("/", 3)
                # <name>-<version>/vendor/llama.cpp/<path>
                if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                    continue
                rel = parts[3]
                if not any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in MEMBERS):
                    continue
                if not (member.isfile() or member.isdir()) or ".." in Path(rel).parts:
                    continue
                member.name = rel
                tar.extract(member, tmp, filter="data")
                found += member.isfile()
        if not (tmp / LORA_SCRIPT).is_file() or not (tmp / "gguf-py" / "gguf").is_dir():
            raise MiltonError(f"{sdist}: no vendor/llama.cpp converters in this sdist")
        (tmp / "VERSION").write_text(sdist.name + "\n")
        if dest.exists():
            old = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.old"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except (OSError, tarfile.TarError) as exc:
        raise MiltonError(f"{sdist}: cannot extract llama.cpp converters: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_tools(dest: Path | None = None) -> Path:
    """pip-download the installed llama-cpp-python's sdist and extract its converters."""
    version = llama_cpp_version()
    dest = Path(dest) if dest else default_tools_dir()
    marker = dest / "VERSION"
    if marker.is_file() and f"-{version}." in marker.read_text():
        return dest
    from milton.models.smoke import build_record

    kept = Path(build_record().get("sdist") or "/nonexistent")
    if kept.is_file() and kept.name == f"llama_cpp_python-{version}.tar.gz":
        return extract_tools(kept, dest)  # the sdist the wheel was built from
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", work]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise MiltonError(f"cannot download the llama-cpp-python {version} sdist: {last}")
        sdists = sorted(Path(work).glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise MiltonError(f"pip downloaded no llama-cpp-python {version} sdist")
        return extract_tools(sdists[0], dest)


# -- converting ---------------------------------------------------------------------------------
class ConversionError(MiltonError):
    """llama.cpp's converter refused the model or adapter."""


def tools_dir(settings: Settings) -> Path:
    """Where the converters are; a one-line error saying how to get them if they aren't."""
    configured = settings.model.llama_cpp_dir
    directory = Path(configured).expanduser() if configured else default_tools_dir()
    if not (directory / LORA_SCRIPT).is_file():
        where = "model.llama_cpp_dir" if configured else "the virtualenv"
        raise ConfigError(f"{where}: no llama.cpp converters in {directory} "
                          "(`make install` extracts them from the llama-cpp-python sdist)")
    return directory


def _run(script: Path, args: list[str], timeout_s: float) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(script.parent / "gguf-py"), str(script.parent)])}
    env.pop("NO_LOCAL_GGUF", None)
    try:
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              env=env, timeout=timeout_s, cwd=script.parent)
    except subprocess.TimeoutExpired:
        raise ConversionError(f"{script.name} took longer than {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise ConversionError(f"{script.name} failed: {lines[-1] if lines else proc.returncode}")


def check_gguf(path: Path) -> None:
    """A :class:`ConversionError` unless ``path`` is a GGUF file."""
    error = gguf_error(path)
    if error is not None:
        raise ConversionError(error)


def lora_to_gguf(settings: Settings, adapter_dir: Path, base_config_dir: Path, out_file: Path,
                 *, outtype: str = "f32", timeout_s: float = 1800) -> Path:
    """PEFT adapter directory -> one GGUF LoRA file that llama.cpp applies to the base.

    ``base_config_dir`` needs only the base's ``config.json`` (and tokenizer files when the
    converter asks), not its weights.
    """
    _check_adapter_config(adapter_dir)
    script = tools_dir(settings) / LORA_SCRIPT
    _run(script, ["--base", str(base_config_dir), "--outfile", str(out_file), "--outtype", outtype,
                  str(adapter_dir)], timeout_s)
    check_gguf(out_file)
    return out_file


def hf_to_gguf(settings: Settings, model_dir: Path, out_file: Path, *, outtype: str = "f32",
               timeout_s: float = 3600) -> Path:
    """A Hugging Face model directory -> a GGUF model file (tests' tiny bases; evolve)."""
    script = tools_dir(settings) / HF_SCRIPT
    _run(script, ["--outfile", str(out_file), "--outtype", outtype, str(model_dir)], timeout_s)
    check_gguf(out_file)
    return out_file


def _check_adapter_config(adapter_dir: Path) -> None:
    """Fail early and clearly on what the converter would reject deep inside."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: cannot read adapter config: {exc}") from None
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in targets if any(x in t for x in ("embed_tokens", "lm_head"))]
    if bad or config.get("modules_to_save"):
        raise ConversionError(f"{path}: adapters on {', '.join(bad) or 'modules_to_save'} "
                              "cannot be exported to GGUF")


def main() -> None:
    try:
        path = fetch_tools(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    except MiltonError as exc:
        print(f"milton: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"llama.cpp converters in {path}")


if __name__ == "__main__":
    main()
