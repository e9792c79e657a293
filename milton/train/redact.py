"""The secret filter train-lora's data passes, kept importable from here: it lives in
:mod:`milton.core.secrets` so memory (a lower layer than train) guards prompts with it too."""

from __future__ import annotations

from milton.core.secrets import (
    Finding,
    SecretFilter,
    random_base64_bits,
    shannon_entropy,
)

__all__ = ["Finding", "SecretFilter", "random_base64_bits", "shannon_entropy"]
