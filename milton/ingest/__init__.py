"""ingest: process snapshots into the store.

* :mod:`~milton.ingest.processes`: snapshot this host, validate rows from files, retention;
* :mod:`~milton.ingest.jobs`: the ``milton ingest processes`` job.

Imports only :mod:`milton.core` and :mod:`milton.models`.
"""
