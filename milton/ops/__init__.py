"""ops: running Milton on a machine.

* :mod:`~milton.ops.backup`: backups and restore;
* :mod:`~milton.ops.status`: ``milton status`` (and ``--check``); :mod:`~milton.ops.fleet_status`:
  hosts and open alerts, read from the tables;
* :mod:`~milton.ops.briefing`: the twice-daily briefing, read from the tables;
* :mod:`~milton.ops.schedule`, :mod:`~milton.ops.calendar`: the timers' schedule without
  systemd;
* :mod:`~milton.ops.systemd`: rendering and installing the units.

Imports only :mod:`milton.core`; it reads the tables the pillars write, read-only, and never
their code. Only the CLI imports it.
"""
