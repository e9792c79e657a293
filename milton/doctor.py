"""``milton doctor``: is this machine able to run Milton? One table of checks with fixes.

Each check is ok, warning or failed, with one line of detail and, when not ok, one line that
says what to do. Nothing here changes Milton's state: the store is opened read-only and the
generation test runs in a child process (a llama.cpp build that crashes this CPU kills the
child, and doctor reports the signal). ``milton doctor`` exits 1 when any check failed.
"""

from __future__ import annotations

import platform
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from milton.core.config import Settings

OK, WARNING, FAILED = "ok", "warning", "failed"
GIB = 1024 ** 3
LIBRARIES = ("llama-cpp-python", "torch", "transformers", "peft", "sentence-transformers",
             "numpy", "scikit-learn", "fastapi", "sqlite-utils")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info < (3, 11):
        return Check("python", FAILED, f"Python {version}", "Milton needs Python >= 3.11")
    return Check("python", OK, f"Python {version} ({sys.prefix})")


def check_libraries() -> Check:
    import sqlite3

    found, missing = [], []
    for name in LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    found.append(f"SQLite {sqlite3.sqlite_version}")
    if missing:
        return Check("libraries", FAILED, f"missing: {', '.join(missing)}", "run `make install`")
    return Check("libraries", OK, ", ".join(found))


def llama_features(info: str) -> dict[str, bool]:
    """``"CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 0 | ..."`` -> {"SSE3": True, "AVX2": True, ...}."""
    return {name: value == "1" for name, value in re.findall(r"([A-Z][A-Z0-9_]*) = (\d)", info)}


def check_llama_build() -> Check:
    from milton.models.smoke import build_record, cpu_summary, system_info

    try:
        info = system_info()
    except Exception as exc:  # noqa: BLE001 - a missing or broken library is the finding
        return Check("llama.cpp build", FAILED, f"cannot load llama.cpp: {_first_line(exc)}",
                     "run `make install`")
    features = llama_features(info)
    used = [name for name, on in features.items() if on]
    record = build_record()
    build = (f"{record.get('tier')} build (GGML_NATIVE=OFF)" if record
             else "build flags unknown (not built by `make install`)")
    detail = f"{build}; uses {' '.join(used) or 'no SIMD'}; CPU {cpu_summary()}"
    if any(on for name, on in features.items() if name.startswith("AMX")):
        return Check("llama.cpp build", FAILED, detail + "; AMX compiled in",
                     "AMX crashes llama.cpp on some CPUs: `rm -f .venv/llama-build.json && make install`")
    if not record:
        return Check("llama.cpp build", WARNING, detail + "; AMX off",
                     "`make install` rebuilds it portably (no -march=native, no AMX)")
    return Check("llama.cpp build", OK, detail + "; AMX off")


def check_base(settings: Settings) -> tuple[Check, Any]:
    from milton.models.refs import resolve_base

    try:
        ref = resolve_base(settings)
    except Exception as exc:  # noqa: BLE001 - any failure is this check's result
        return Check("model.base", FAILED, _first_line(exc),
                     "set model.base to a readable .gguf or Hugging Face directory"), None
    size = sum(p.stat().st_size for p in ([ref.path] if ref.path.is_file()
                                          else ref.path.rglob("*") if ref.path.is_dir() else [])
               if p.is_file())
    what = "packaged Gemma 3 270M" if ref.embedded else ref.kind
    return Check("model.base", OK, f"{ref.path} ({what}, {size / 2**20:.0f} MiB, "
                 f"sha256 {ref.sha256[:16]}...)"), ref


def check_generation(settings: Settings, ref: Any) -> Check:
    from milton.models.llamacpp import gpu_layers
    from milton.models.smoke import EXPECT, PROMPT, failure_line, run_smoke

    if ref is None:
        return Check("generation", FAILED, "no usable model.base", "see the model.base check")
    if ref.kind != "gguf":
        return Check("generation", WARNING, f"{ref.path} is served by transformers; "
                     "the llama.cpp smoke test needs a GGUF", "")
    result = run_smoke(ref.path, expect=EXPECT if ref.embedded else None,
                       gpu_layers=gpu_layers(settings.model.device))
    if not result.ok:
        return Check("generation", FAILED, failure_line(result),
                     "see README, Troubleshooting: the model crashes at the first token")
    return Check("generation", OK, f"answered {PROMPT!r} with {result.text.strip()!r} "
                 f"in {result.seconds:.1f} s (child process)")


def check_embedding(settings: Settings) -> Check:
    try:
        from milton.memory.embed import embedder_for

        embedder = embedder_for(settings.memory)
        vector = embedder.encode_one("doctor check")
    except Exception as exc:  # noqa: BLE001 - any failure is this check's result
        return Check("embedding model", FAILED, _first_line(exc),
                     "check memory.embedding_model, or run `make install`")
    return Check("embedding model", OK, f"{settings.memory.embedding_model or 'packaged'}: "
                 f"{vector.shape[0]} dimensions")


def check_converters() -> Check:
    from milton.models.convert import LORA_SCRIPT, default_tools_dir, llama_cpp_version

    tools = default_tools_dir()
    try:
        version = llama_cpp_version()
    except Exception as exc:  # noqa: BLE001 - any failure is this check's result
        return Check("llama.cpp converters", FAILED, _first_line(exc), "run `make install`")
    marker = tools / "VERSION"
    if not (tools / LORA_SCRIPT).is_file() or not marker.is_file():
        return Check("llama.cpp converters", FAILED, f"not in {tools}",
                     "run `make install` (python -m milton.models.convert)")
    if f"-{version}." not in marker.read_text():
        return Check("llama.cpp converters", FAILED, f"{tools} is from {marker.read_text().strip()}, "
                     f"llama-cpp-python is {version}", "run `python -m milton.models.convert`")
    return Check("llama.cpp converters", OK, f"{tools} (llama-cpp-python {version})")


def check_systemd() -> Check:
    path = shutil.which("systemd-analyze")
    if path is None:
        return Check("systemd-analyze", WARNING, "not found: units cannot be verified",
                     "install systemd, or use `milton schedule` instead of the timers")
    return Check("systemd-analyze", OK, path)


def check_store(settings: Settings) -> Check:
    from milton.core.store import connect_readonly

    path = settings.db_path
    if not path.exists():
        return Check("store", OK, f"{path} not created yet (made on first use)")
    try:
        conn = connect_readonly(path)
        try:
            result = [row[0] for row in conn.execute("pragma quick_check").fetchall()]
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - any failure is this check's result
        return Check("store", FAILED, f"{path}: {_first_line(exc)}",
                     "restore the latest backup: `milton restore latest`")
    if result != ["ok"]:
        return Check("store", FAILED, f"{path}: integrity check: {'; '.join(result[:3])}",
                     "restore the latest backup: `milton restore latest`")
    return Check("store", OK, f"{path}: integrity ok ({path.stat().st_size / 2**20:.1f} MiB)")


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_resources(settings: Settings, ref: Any) -> Check:
    model_bytes = ref.path.stat().st_size if ref is not None and ref.path.is_file() else 0
    data_dir = settings.paths.data_dir
    probe = data_dir if data_dir.exists() else settings.paths.home
    usage = shutil.disk_usage(probe)
    # train-lora keeps a dequantised copy and checkpoints; evolve writes several GGUFs.
    need_disk = max(2 * GIB, 8 * model_bytes)
    need_mem = max(2 * GIB, 6 * model_bytes)
    mem = _mem_available()
    detail = (f"{usage.free / GIB:.1f} GiB free at {probe}; "
              + (f"{mem / GIB:.1f} GiB memory available" if mem is not None else "memory unknown"))
    problems = []
    if usage.free < need_disk:
        problems.append(f"less than {need_disk / GIB:.1f} GiB of disk")
    if mem is not None and mem < need_mem:
        problems.append(f"less than {need_mem / GIB:.1f} GiB of memory")
    if problems:
        return Check("disk and memory", WARNING, f"{detail}: {', '.join(problems)} for this model",
                     "free space, or use a smaller model.base")
    return Check("disk and memory", OK, detail)


def check_gpu() -> Check:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any failure is this check's result
        return Check("GPU", FAILED, _first_line(exc), "run `make install`")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("GPU", OK, f"CUDA {torch.version.cuda}: {names}")
    return Check("GPU", OK, f"none seen by torch {torch.__version__}: training and serving run on the CPU")


def check_serve(settings: Settings) -> Check:
    from milton.core.serve_state import read_serve_state

    state = read_serve_state(settings.paths.data_dir)
    if not state or not state.get("running"):
        return Check("serve", OK, "not running")
    if state.get("health") == "degraded":
        return Check("serve", WARNING, f"running (pid {state.get('pid')}) degraded: "
                     f"{'; '.join(r for r in state.get('reasons', []) if r) or state.get('chat_error')}",
                     "fix the failed check above, then restart serve")
    return Check("serve", OK, f"running (pid {state.get('pid')}), chat {state.get('chat')}")


def run_checks(settings: Settings, *, progress: Callable[[str], None] | None = None) -> list[Check]:
    """Every check, in order; ``progress`` is told each check's name before it runs."""
    def step(name: str, fn: Callable[[], Check]) -> Check:
        if progress:
            progress(name)
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            return Check(name, FAILED, f"the check itself failed: {_first_line(exc)}")

    checks = [step("python", check_python), step("libraries", check_libraries),
              step("llama.cpp build", check_llama_build)]
    if progress:
        progress("model.base")
    base, ref = check_base(settings)
    checks += [base,
               step("generation", lambda: check_generation(settings, ref)),
               step("embedding model", lambda: check_embedding(settings)),
               step("llama.cpp converters", check_converters),
               step("systemd-analyze", check_systemd),
               step("store", lambda: check_store(settings)),
               step("disk and memory", lambda: check_resources(settings, ref)),
               step("GPU", check_gpu),
               step("serve", lambda: check_serve(settings))]
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAILED for c in checks) else 0
