"""``python -m milton``: the ``milton`` command (:func:`milton.cli.main`)."""

from milton.cli import main

main()
