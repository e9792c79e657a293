"""The OpenAI-compatible /v1 API.

* :mod:`~milton.serve.api.openai`: ``OpenAIService`` and ``mount_openai`` (routes, queue,
  generation, streaming, shutdown); :mod:`~milton.serve.api.context`: memories in, the session
  log out; :mod:`~milton.serve.api.embeddings`;
* :mod:`~milton.serve.api.schema` (wire format), :mod:`~milton.serve.api.errors`,
  :mod:`~milton.serve.api.auth`, :mod:`~milton.serve.api.queue`,
  :mod:`~milton.serve.api.metrics`, :mod:`~milton.serve.api.worker`, :mod:`~milton.serve.api.job`.
"""
