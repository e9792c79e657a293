"""memory: conversations, documents and what is remembered from them.

* :mod:`~milton.memory.memories`: the memories table (add, list, delete, tasks, counters);
* :mod:`~milton.memory.embed`, :mod:`~milton.memory.search`, :mod:`~milton.memory.context`:
  vectors, hybrid search, and the memory block a prompt gets;
* :mod:`~milton.memory.sessions`: live sessions (``SessionTracker``) and processing them into
  memory; :mod:`~milton.memory.topics`: topics and preferences; :mod:`~milton.memory.export`;
* :mod:`~milton.memory.conversations`, :mod:`~milton.memory.documents`: importing them;
* :mod:`~milton.memory.summarize`, :mod:`~milton.memory.compress`: the weekly compression;
* :mod:`~milton.memory.jobs`: the jobs behind the CLI.

Imports only :mod:`milton.core` and :mod:`milton.models`.
"""
