"""A generation smoke test in a child process: does llama.cpp generate on this machine?

Why a child: llama.cpp is native code. A build that executes an instruction this CPU (or its
hypervisor) refuses, AMX on some machines, kills the process that generates with SIGSEGV or
SIGILL at the first token, Python and everything else in it included. So install, doctor and
serve first let a throw-away process load the model and generate a few tokens greedily; if
that process dies, the caller learns the signal and can say why, and nothing of its own is
lost.

``python -m milton.models.smoke --install`` is the last step of ``make install``: the
packaged Gemma must generate and say what it should; on failure it prints one line with the
cause and the fix, and exits 1.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: A prompt every capable model, base or instruct, completes with Paris, greedily (the packaged
#: Gemma 3 270M base answers " The capital of France is Paris.").
PROMPT = "Q: What is the capital of France?\nA:"
EXPECT = "paris"
TOKENS = 8
RECORD = "llama-build.json"  # written by scripts/llama_wheel.py into the virtualenv


@dataclass
class SmokeResult:
    ok: bool
    text: str = ""
    seconds: float = 0.0
    signal: str | None = None       # e.g. "SIGSEGV" when the child was killed by one
    error: str | None = None        # one line: why it is not ok
    system_info: str = ""           # llama.cpp's own view of the CPU features it uses
    build: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_record() -> dict[str, Any]:
    """What ``make install`` recorded about the llama-cpp-python build ({} if nothing)."""
    try:
        return json.loads((Path(sys.prefix) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def cpu_summary() -> str:
    """The CPU features that matter for llama.cpp's kernels, as the kernel reports them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    flags: set[str] = set()
    model = "unknown CPU"
    for line in text.splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        elif line.startswith("model name") and model == "unknown CPU":
            model = line.split(":", 1)[1].strip()
    has = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"),
                                   ("VNNI", "avx512_vnni"), ("AMX", "amx_tile")) if flag in flags]
    return f"{model} ({', '.join(has) or 'no AVX2'})"


def build_summary(record: dict[str, Any] | None = None) -> str:
    record = build_record() if record is None else record
    if not record:
        return "llama-cpp-python not built by `make install` (flags unknown, maybe -march=native)"
    return f"{record.get('tier', '?')} build, CMAKE_ARGS {' '.join(record.get('cmake_args', []))}"


def system_info() -> str:
    """llama.cpp's feature line ("CPU : SSE3 = 1 | AVX2 = 1 | ..."); loads the library only."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def generate(model: str, *, tokens: int = TOKENS, threads: int = 0, gpu_layers: int = 0) -> dict[str, Any]:
    """Load ``model`` and complete :data:`PROMPT` greedily (run in the child)."""
    import llama_cpp

    from milton.models.hf import usable_cpus

    t0 = time.perf_counter()
    threads = threads or usable_cpus()
    llm = llama_cpp.Llama(model_path=model, n_ctx=128, n_batch=64, n_threads=threads,
                          n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=False)
    try:
        out = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, top_k=1,
                                    repeat_penalty=1.0)
    finally:
        llm.close()
    return {"text": out["choices"][0]["text"], "seconds": round(time.perf_counter() - t0, 3),
            "system_info": system_info()}


def run_smoke(model: Path | str, *, expect: str | None = None, timeout_s: float = 180.0,
              threads: int = 0, gpu_layers: int = 0, env: dict[str, str] | None = None) -> SmokeResult:
    """Generate from ``model`` in a child process; never raises for what the child does.

    ``expect``: a word the greedy completion of :data:`PROMPT` must contain (case-insensitive);
    leave it out for models that are not expected to know (tiny test models).
    """
    record = build_record()
    cmd = [sys.executable, "-m", "milton.models.smoke", "--child", str(model),
           "--threads", str(threads), "--gpu-layers", str(gpu_layers)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return SmokeResult(False, seconds=round(time.perf_counter() - t0, 3), build=record,
                           error=f"the generation did not finish within {timeout_s:.0f} s")
    seconds = round(time.perf_counter() - t0, 3)
    if proc.returncode < 0:
        name = _signal_name(-proc.returncode)
        return SmokeResult(False, seconds=seconds, signal=name, build=record,
                           error=f"the process generating from {model} died with {name}")
    payload: dict[str, Any] = {}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                payload = json.loads(line)
            except ValueError:
                continue
            break
    if proc.returncode != 0 or "text" not in payload:
        why = payload.get("error") or _last_line(proc.stderr) or f"exit status {proc.returncode}"
        return SmokeResult(False, seconds=seconds, build=record, error=f"cannot generate from {model}: {why}",
                           system_info=payload.get("system_info", ""))
    text = payload["text"]
    result = SmokeResult(True, text=text, seconds=seconds, build=record,
                         system_info=payload.get("system_info", ""))
    if not text.strip():
        result.ok, result.error = False, f"{model} generated nothing"
    elif expect and expect.lower() not in text.lower():
        result.ok = False
        result.error = (f"{model} completed {PROMPT!r} with {text!r}, not {expect!r}: "
                        "the build computes wrong results on this CPU")
    return result


def failure_line(result: SmokeResult) -> str:
    """One line for a user: what died, on which CPU and build, and what to do."""
    fix = ("rebuild it portably: `rm -f .venv/llama-build.json && make install` "
           "(or MILTON_LLAMA_CPU=avx2 make install for the fixed AVX2 baseline)")
    return (f"generation smoke test failed: {result.error}; CPU: {cpu_summary()}; "
            f"llama.cpp: {build_summary(result.build)}; {fix}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _child(argv: list[str]) -> int:
    model = argv[0]
    opts = dict(zip(argv[1::2], argv[2::2]))
    try:
        out = generate(model, threads=int(opts.get("--threads", 0)),
                       gpu_layers=int(opts.get("--gpu-layers", 0)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


def _install_check() -> int:
    """``make install``'s last step: the packaged model generates, and says Paris."""
    from milton.core.errors import MiltonError
    from milton.models.refs import embedded_gguf

    try:
        model = embedded_gguf()
    except MiltonError as exc:
        print(f"milton: error: generation smoke test: {exc}", file=sys.stderr)
        return 1
    result = run_smoke(model, expect=EXPECT)
    if not result.ok:
        print(f"milton: error: {failure_line(result)}", file=sys.stderr)
        return 1
    print(f"smoke test: the packaged model completed {PROMPT!r} with {result.text.strip()!r} "
          f"in {result.seconds:.1f} s ({build_summary(result.build).split(',')[0]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"] and len(argv) >= 2:
        return _child(argv[1:])
    if argv[:1] == ["--install"]:
        return _install_check()
    print("usage: python -m milton.models.smoke --install | --child MODEL", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
