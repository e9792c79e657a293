"""Errors that map to Milton's documented exit codes.

0 ok (also "skipped: not enough data"), 1 failed, 2 usage/config/input error,
75 busy: another copy of the job holds its lock (EX_TEMPFAIL, so systemd can treat it as success).
"""

from __future__ import annotations

import errno

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 75


class MiltonError(Exception):
    """An error with a one-line message for the user and an exit code."""

    exit_code = EXIT_FAILED


class ConfigError(MiltonError):
    exit_code = EXIT_USAGE


class InputError(MiltonError):
    """Bad user input (file, argument). Nothing was written."""

    exit_code = EXIT_USAGE


class BusyError(MiltonError):
    exit_code = EXIT_BUSY


class ArtifactError(MiltonError):
    """A model artifact is missing, corrupt or fails its checksum."""

    exit_code = EXIT_FAILED


class DiskFullError(MiltonError):
    """The disk (or a quota, or a file-size limit) ran out; the run's writes were undone."""

    exit_code = EXIT_FAILED


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EFBIG/EDQUOT from the OS, or SQLite's ``database or disk is full``."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL_ERRNOS
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR_WRITE")
