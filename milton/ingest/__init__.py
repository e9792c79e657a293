"""ingest: process snapshots into the store.

* :mod:`~milton.ingest.processes`: snapshot this host, validate rows from files, retention;
* :mod:`~milton.ingest.jobs`: the ``milton ingest processes`` job;
* :mod:`~milton.ingest.agent`: the fleet agent (durable spool, push to a hub);
  :mod:`~milton.ingest.hub`: the hub's side (validate and store pushed snapshots).

Imports only :mod:`milton.core` and :mod:`milton.models`.
"""
