"""The chat backends: :mod:`~milton.serve.engines.base` (the ``ChatEngine`` interface and the
``Engine`` both backends build on: swaps, bookkeeping, token loop),
:mod:`~milton.serve.engines.llama` (llama.cpp), :mod:`~milton.serve.engines.hf` (transformers +
PEFT) and :mod:`~milton.serve.engines.select` (which one serves ``model.base``)."""
