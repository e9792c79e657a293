"""web: the dashboard that ``milton serve`` shows at /ui (same process, port and key).

* :mod:`~milton.web.app`: the routes, login and CSRF checks (:mod:`~milton.web.auth`);
* :mod:`~milton.web.pages`: what each page shows, read through the functions the CLI calls;
* :mod:`~milton.web.charts`: server-rendered SVG chart geometry (``templates/charts.html``).

Sits between the CLI and serve: serve never imports it; ``milton serve`` composes the two
(:class:`milton.serve.app.Extension`). It may import ops, like the CLI.
"""

from __future__ import annotations

from milton.serve.app import Extension

PREFIX = "/ui"


def dashboard() -> Extension:
    """The dashboard as an extension of serve's app."""
    from milton.web.app import mount_dashboard

    return Extension(prefix=PREFIX, attach=mount_dashboard)
