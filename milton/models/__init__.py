"""models: which base model is in use and everything about it that several pillars share.

* :mod:`~milton.models.refs`: ``resolve_base`` (evolved base, ``model.base`` or the packaged
  Gemma) as a ``BaseModelRef`` with its fingerprint; the GGUF magic check;
* :mod:`~milton.models.layout`: the artifact kinds, the file names inside a version, and how
  many versions each kind keeps (``artifact_store``);
* :mod:`~milton.models.prompt`: the plain prompt format and stop-string scanning;
* :mod:`~milton.models.hf`: loading a base with transformers (device, dtype, GGUF dequantised);
* :mod:`~milton.models.llamacpp`: llama-cpp-python and its log;
* :mod:`~milton.models.convert`: llama.cpp's converters (installed by ``make install``);
* :mod:`~milton.models.smoke`: the generation smoke test in a child process.

Imports only :mod:`milton.core`.
"""
