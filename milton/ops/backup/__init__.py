"""Backups: one versioned archive of the store, the current and pinned models and the config,
and restoring one.

* :mod:`~milton.ops.backup.archive`: the archive format (names, manifest, writing, verifying)
  and the staging directories work happens in;
* :mod:`~milton.ops.backup.create`: :func:`~milton.ops.backup.create.create_backup`;
* :mod:`~milton.ops.backup.restore`: :func:`~milton.ops.backup.restore.restore_backup`, which
  verifies an archive and swaps it in atomically;
* :mod:`~milton.ops.backup.retention`: listing archives and deciding which to keep.

Like the rest of ``ops``, it imports only :mod:`milton.core` and reads the store's tables as
files, never through the pillars that write them.
"""
