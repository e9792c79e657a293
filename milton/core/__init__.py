"""core: what every other package stands on; it imports nothing of Milton's.

* :mod:`~milton.core.config`: ``Settings`` (every section), ``load_settings`` and where each
  value came from;
* :mod:`~milton.core.errors`: ``MiltonError`` and friends, with their exit codes;
* :mod:`~milton.core.log`, :mod:`~milton.core.timeutil`: logging, ``--now`` and ISO times;
* :mod:`~milton.core.store`, :mod:`~milton.core.migrations`: the SQLite store and its schema;
* :mod:`~milton.core.jobs`: the job runner (locks, ``job_runs``, the master log) and resumable
  runs;
* :mod:`~milton.core.artifacts`: versioned artifacts with manifests and an atomic ``current``;
* :mod:`~milton.core.fsio`: atomic writes and fsync; :mod:`~milton.core.inputs`: reading user
  files safely;
* :mod:`~milton.core.text`: printing outside text literally (no markup, visible control
  characters);
* :mod:`~milton.core.notify`: push notifications; :mod:`~milton.core.serve_state`: what the
  running server says about itself.
"""
