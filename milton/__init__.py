"""Milton: a self-improving local AI toolkit.

Packages, lowest layer first (each imports only layers below it; checked by ``make lint``):
``core`` (config, store, jobs, artifacts, files), ``models`` (which model, where its files are,
how to load and prompt it), ``ingest`` and ``memory`` (data in), ``anomaly`` (on ingest),
``train`` (on memory), ``evolve`` (on train), ``serve`` and ``doctor`` (on everything below),
``ops`` (backup, status, schedule, systemd: on core only) and ``cli`` (on top; imported by
nothing). This module holds only ``__version__``, which any layer may read.
"""

__version__ = "0.1.0"
