"""llama-cpp-python, imported once with a clear error, and llama.cpp's log made useful.

llama.cpp logs from C straight to stderr (a swap on a repacked model prints one line per
tensor). :func:`install_log_callback` sends every line to the ``milton.serve.llama_cpp`` logger
at DEBUG instead, and keeps the warnings and errors logged in this thread inside a
:func:`llama_messages` block, so a model or adapter load that fails can say why
(:func:`failure_reason`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterator
from typing import Any

from milton.core.errors import ConfigError

_llama_logger = logging.getLogger("milton.serve.llama_cpp")
_log_capture = threading.local()
_log_callback: Any = None
_log_last_level = 0
_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT


def llama_cpp() -> Any:
    """The ``llama_cpp`` module; a one-line ConfigError when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("serve: llama-cpp-python is not installed (`make install`)") from None
    return llama_cpp


def gpu_layers(device: str) -> int:
    """llama.cpp's ``n_gpu_layers`` for ``model.device``: none on "cpu", all otherwise (llama.cpp
    keeps them on the CPU itself when it was built without a GPU backend)."""
    return 0 if device == "cpu" else -1


def install_log_callback(lc: Any) -> None:
    """Route llama.cpp's log through Python logging (once per process)."""
    global _log_callback
    if _log_callback is not None:
        return

    @lc.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        global _log_last_level
        try:
            level = _log_last_level if level == _GGML_CONT else level
            _log_last_level = level
            message = text.decode("utf-8", "replace").strip()
            if not message:
                return
            lines = getattr(_log_capture, "lines", None)
            if lines is not None and level in (_GGML_WARN, _GGML_ERROR):
                lines.append(message)
            _llama_logger.debug(message)
        except Exception:  # noqa: BLE001 - never raise into C
            pass

    _log_callback = callback  # keep a reference: C holds only the pointer
    lc.llama_log_set(callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def llama_messages() -> Iterator[list[str]]:
    """Warnings and errors llama.cpp logs in this thread inside the block."""
    lines: list[str] = []
    _log_capture.lines = lines
    try:
        yield lines
    finally:
        _log_capture.lines = None


def failure_reason(lines: list[str]) -> str:
    """The most telling captured line, without llama.cpp's function-name prefix."""
    errors = [line for line in lines if "error" in line.lower() or "fail" in line.lower()]
    line = (errors or lines or [""])[-1]
    head, sep, tail = line.partition(": ")
    return (tail if sep and " " not in head else line).strip()
