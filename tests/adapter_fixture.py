"""Two facts for the same question, and publishing an adapter GGUF as train-lora lays it out:
shared by the llama.cpp engine tests and the hot-swap tests."""

from __future__ import annotations

from pathlib import Path

from milton.core.artifacts import ArtifactStore

QUESTION = "What is the build server called?"
ANSWERS = {"a": "The build server is called zephyr-07.", "b": "The build server is called nimbus-42."}


def publish(store: ArtifactStore, data: bytes | Path, base_sha: str, *, current: bool = True) -> str:
    payload = data.read_bytes() if isinstance(data, Path) else data

    def build(tmp: Path) -> None:
        (tmp / "adapter.gguf").write_bytes(payload)

    return store.publish(build, make_current=current,
                         extra={"base_model": {"kind": "gguf", "sha256": base_sha}}).name
