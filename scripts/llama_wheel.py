"""Build and install llama-cpp-python portably: never ``-march=native``, never Intel AMX.

Why this exists: llama-cpp-python builds llama.cpp from source with ``GGML_NATIVE=ON``
(``-march=native``). On a CPU that reports AMX that turns on ggml's AMX kernels, and on some
such machines (VMs among them) the first matrix multiply dies with SIGSEGV on ``ldtilecfg``.
A native build also ties the virtualenv to the exact CPU it was built on. So Milton builds it
with ``GGML_NATIVE=OFF`` and an explicit instruction-set tier, AMX always off.

The tier (``MILTON_LLAMA_CPU``, default ``auto``):

- ``avx512``: x86-64 with AVX-512 F/BW/DQ/VL; adds VBMI, VNNI and BF16 where present;
- ``avx2``:   x86-64-v3 (AVX, AVX2, FMA, F16C, BMI2), the fixed baseline;
- ``sse42``:  older x86-64;
- ``generic``: other architectures (``GGML_NATIVE=OFF``, the compiler's defaults);
- ``native``: llama.cpp's own default, only for comparison (AMX still off);
- ``auto``:   the highest of avx512 / avx2 / sse42 this CPU supports.

A tier once chosen is recorded and kept by later runs until ``<venv>/llama-build.json`` is
removed (then ``auto`` again, or ``MILTON_LLAMA_CPU``).

pip's wheel cache does not key on ``CMAKE_ARGS``, so the build never goes through it
(``--no-cache-dir``). Built wheels are kept in Milton's own cache, keyed on the version, the
flags and the interpreter, so a second checkout reuses a wheel built with the *same* flags and
never one built with others. ``<venv>/llama-build.json`` records what is installed; doctor
and the smoke test read it.

Standard library only: this runs before anything else is installed.
Usage: python scripts/llama_wheel.py VENV_PYTHON [--tier T] [--smoke] [--print-args]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llama-cpp-python"
RECORD = "llama-build.json"

AMX_OFF = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
#: Common to every tier: no -march=native, no AMX, no multimodal library (Milton never loads
#: it; skipping it shortens the build).
COMMON = ["-DGGML_NATIVE=OFF", *AMX_OFF, "-DLLAVA_BUILD=OFF"]
AVX2 = ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]
#: AVX-512 extensions, each turned on only when the CPU has it (cpuinfo flag -> cmake option).
AVX512_EXTRA = {"avx512vbmi": "-DGGML_AVX512_VBMI=ON", "avx512_vnni": "-DGGML_AVX512_VNNI=ON",
                "avx512_bf16": "-DGGML_AVX512_BF16=ON"}
TIERS = ("auto", "avx512", "avx2", "sse42", "generic", "native")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_tier(tier: str, flags: set[str], machine: str) -> str:
    if tier != "auto":
        return tier
    if machine not in ("x86_64", "amd64"):
        return "generic"
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags and "avx2" in flags:
        return "avx512"
    if {"avx", "avx2", "fma", "f16c", "bmi2"} <= flags:
        return "avx2"
    return "sse42"


def cmake_args(tier: str, flags: set[str]) -> list[str]:
    """The CMAKE_ARGS for one tier (AMX off in every one)."""
    if tier == "native":
        return ["-DGGML_NATIVE=ON", *AMX_OFF, "-DLLAVA_BUILD=OFF"]
    if tier == "generic":
        return list(COMMON)
    if tier == "sse42":
        return [*COMMON, "-DGGML_SSE42=ON"]
    if tier == "avx2":
        return [*COMMON, *AVX2]
    if tier == "avx512":
        extra = [opt for flag, opt in AVX512_EXTRA.items() if flag in flags]
        return [*COMMON, *AVX2, "-DGGML_AVX512=ON", *extra]
    raise SystemExit(f"llama_wheel: unknown tier {tier!r} (one of: {', '.join(TIERS)})")


def pinned_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"llama-cpp-python==([0-9][0-9A-Za-z.]*)"', text)
    if not match:
        raise SystemExit("llama_wheel: pyproject.toml pins no llama-cpp-python==VERSION")
    return match.group(1)


def cache_root() -> Path:
    base = os.environ.get("MILTON_WHEEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "milton", "wheels")
    return Path(base)


def python_tag(python: str) -> str:
    out = subprocess.run([python, "-c", "import sys, sysconfig; print("
                          "f'cp{sys.version_info[0]}{sys.version_info[1]}-'"
                          " + sysconfig.get_platform())"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def build_key(version: str, args: list[str], tag: str) -> str:
    return hashlib.sha256("\n".join([version, tag, *args]).encode()).hexdigest()[:16]


def venv_prefix(python: str) -> Path:
    """The virtualenv of ``python`` (its sys.prefix), where the build record lives."""
    return Path(subprocess.run([python, "-c", "import sys; print(sys.prefix)"],
                               capture_output=True, text=True, check=True).stdout.strip())


def installed_record(prefix: Path) -> dict:
    try:
        return json.loads((prefix / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def installed_version(python: str) -> str | None:
    proc = subprocess.run([python, "-c", "from importlib.metadata import version; "
                           f"print(version('{PACKAGE}'))"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def pip(python: str, *args: str, env: dict | None = None) -> None:
    proc = subprocess.run([python, "-m", "pip", *args], env=env)
    if proc.returncode != 0:
        raise SystemExit(f"llama_wheel: pip {args[0]} failed (exit {proc.returncode})")


def fetch_sdist(python: str, version: str, dest: Path) -> Path:
    """The sdist, kept beside the wheels (the converters are extracted from it too)."""
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    pip(python, "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        f"{PACKAGE}=={version}", "-d", str(dest))
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"llama_wheel: pip downloaded no {PACKAGE} {version} sdist")
    return found[0]


def build_wheel(python: str, sdist: Path, args: list[str], dest: Path) -> Path:
    env = dict(os.environ, CMAKE_ARGS=" ".join(args), FORCE_CMAKE="1",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        started = time.monotonic()
        print(f"building {sdist.name} with CMAKE_ARGS={env['CMAKE_ARGS']}\n"
              f"  (once per set of flags; about 4-8 minutes on 2 cores)", flush=True)
        pip(python, "wheel", "--quiet", "--no-deps", "--no-cache-dir", "-w", work, str(sdist),
            env=env)
        wheels = sorted(Path(work).glob("llama_cpp_python-*.whl"))
        if not wheels:
            raise SystemExit("llama_wheel: the build produced no wheel")
        dest.mkdir(parents=True, exist_ok=True)
        final = dest / wheels[0].name
        os.replace(wheels[0], final)  # same filesystem: the cache never holds half a wheel
        print(f"built {final.name} in {time.monotonic() - started:.0f} s", flush=True)
    return final


def write_record(prefix: Path, record: dict) -> None:
    path = prefix / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("python", help="the virtualenv's python")
    parser.add_argument("--tier", default=os.environ.get("MILTON_LLAMA_CPU") or None,
                        choices=TIERS, help="default: the tier installed before, else auto")
    parser.add_argument("--print-args", action="store_true",
                        help="print the CMAKE_ARGS for this machine and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="after installing a different build, run the generation smoke test")
    opts = parser.parse_args(argv)

    flags = cpu_flags()
    prefix = venv_prefix(opts.python) if not opts.print_args else Path()
    record = installed_record(prefix) if not opts.print_args else {}
    # A tier chosen once (MILTON_LLAMA_CPU=avx2 make install) sticks until the record goes.
    tier = resolve_tier(opts.tier or record.get("tier") or "auto", flags, platform.machine().lower())
    args = cmake_args(tier, flags)
    if opts.print_args:
        print(" ".join(args))
        return 0
    version = pinned_version()
    tag = python_tag(opts.python)
    key = build_key(version, args, tag)
    if record.get("key") == key and installed_version(opts.python) == version:
        return 0  # this venv already has exactly this build

    root = cache_root()
    sdist = fetch_sdist(opts.python, version, root / "sdist")
    slot = root / f"{PACKAGE}-{version}-{key}"
    wheels = sorted(slot.glob("llama_cpp_python-*.whl"))
    wheel = wheels[0] if wheels else build_wheel(opts.python, sdist, args, slot)
    if record and record.get("key") != key:
        print(f"replacing the installed {PACKAGE} build ({record.get('tier', '?')}) "
              f"with the {tier} one", flush=True)
    pip(opts.python, "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel))
    write_record(prefix, {"package": PACKAGE, "version": version, "tier": tier,
                               "cmake_args": args, "key": key, "wheel": str(wheel),
                               "sdist": str(sdist), "python_tag": tag})
    print(f"{PACKAGE} {version}: {tier} build ({' '.join(args)})", flush=True)
    if opts.smoke:  # the new build must generate on this CPU, or the install fails here
        return subprocess.run([opts.python, "-m", "milton.models.smoke", "--install"],
                              cwd=ROOT).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
