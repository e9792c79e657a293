"""serve: the long-running ``milton serve`` process.

* :mod:`~milton.serve.app`: ``create_app`` and ``run_server``, the wiring;
* :mod:`~milton.serve.engines`: the chat backends (llama.cpp, transformers) behind one
  ``ChatEngine`` interface; :mod:`~milton.serve.lifecycle`: opening and closing the engine;
  :mod:`~milton.serve.watch`: hot reload of every model kind;
* :mod:`~milton.serve.api`: the OpenAI-compatible /v1 API;
* :mod:`~milton.serve.anomaly`: anomaly scoring, live snapshots, ``GET /anomaly/alerts`` and
  the fleet agents' ``POST /ingest/processes``;
  :mod:`~milton.serve.metrics`: the Prometheus registry;
* :mod:`~milton.serve.chat`: the terminal chat client; :mod:`~milton.serve.process`: a real
  server in a child process (tests, benchmarks).

May import every layer below it; only the CLI imports it.
"""
