"""Convert PEFT adapters (and HF models) to GGUF with llama.cpp's own converters.

The converters run as a child process, with the sibling ``gguf-py`` of the same llama.cpp
version on their path, so they never mix with whatever ``gguf`` package is installed and a
crash in them cannot take the training job down. Offline: no hub lookups.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from milton.core.config import Settings
from milton.core.errors import ConfigError, MiltonError
from milton.train.tools import HF_SCRIPT, LORA_SCRIPT, default_tools_dir

GGUF_MAGIC = b"GGUF"


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
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ConversionError(f"{path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ConversionError(f"{path}: not a GGUF file")


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
    path = Path(adapter_dir) / "adapter_config.json"
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
