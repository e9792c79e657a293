"""llama.cpp's conversion scripts, taken from the llama-cpp-python sdist at install time.

The adapter served by llama.cpp must be converted by the converter of the *same* llama.cpp
version that llama-cpp-python was built from; the only place both ship together is that
sdist (``vendor/llama.cpp/``). ``make install`` runs ``python -m milton.train.tools`` once,
which downloads the sdist of the installed version from the package registry (pip's cache
usually has it from the build) and extracts the scripts into the virtualenv. Nothing is
fetched at run time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from importlib import metadata
from pathlib import Path

from milton.core.errors import MiltonError

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


def main() -> None:
    try:
        path = fetch_tools(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    except MiltonError as exc:
        print(f"milton: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"llama.cpp converters in {path}")


if __name__ == "__main__":
    main()
