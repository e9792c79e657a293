"""The rare-process detector: a per-host familiarity profile plus an IsolationForest.

The profile counts, over the training window, how often each (host, process) was seen, in how
many distinct hours, since when, under which users and executables and at which hours of day.
Each observation becomes a feature vector of those counts plus its own resources, so a process
this host has never (or hardly ever) run is isolated quickly, and one that became routine is not.

Lineage: the profile also counts (host, parent name, child name) edges, the parent's name
resolved from ``ppid`` within the same snapshot. ``sh`` run by the usual user from the usual
path but started by ``soffice.bin`` (the macro dropper) or by a web server is a known process
with an unseen parent: the ``log_edge`` feature (how often this parent started this child) and
an explicit rule flag it, with a reason. Edges age out of the window like the rest.

On disk: ``forest.skops`` (skops, loaded with an explicit trusted-type list: no pickle code
execution), ``profile.json`` and ``meta.json``; the artifact manifest's sha256 sums are checked
before anything is parsed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import IsolationForest

from milton.core.artifacts import ArtifactStore, Version
from milton.core.errors import ArtifactError
from milton.models.layout import ANOMALY_KIND

FEATURES = (
    "log_snapshots",   # log1p(snapshots in the window that contained this exact process)
    "log_hours",       # log1p(distinct hours it was seen in)
    "presence",        # fraction of this host's snapshots that contained it
    "log_gap_h",       # log1p(hours since it was last seen before; the window if never)
    "hour_share",      # log1p(24 * share of the name's sightings at this hour of day): 0 = never
    "log_rss_mb",
    "log_cpu",
    "log_edge",        # log1p(snapshots with this parent -> child edge); log_snapshots if unknown
)
# Models trained before lineage used the first seven; they still load and score.
FEATURES_V1 = FEATURES[:7]
# A process's identity is (host, name, user, exe): sshd from /dev/shm, or bash as root on a
# box where only alice runs bash, is a process this host has never seen.
# Types skops may instantiate when loading forest.skops; anything else is refused.
TRUSTED_TYPES = [
    "sklearn.ensemble._iforest.IsolationForest",
    "sklearn.tree._classes.ExtraTreeRegressor",
    "sklearn.tree._tree.Tree",
    "numpy.random.mtrand.RandomState",
    "numpy.random._mt19937.MT19937",
    "collections.OrderedDict",
]
MODEL_FILE, PROFILE_FILE, META_FILE = "forest.skops", "profile.json", "meta.json"

# Row columns used for scoring (a subset of milton.ingest.processes.COLUMNS, by name).
ROW_FIELDS = ("host", "name", "username", "exe", "ts", "cpu", "rss", "parent")
# An unseen edge is flagged only when the parent's name was seen at least this often on the
# host in the window: a parent that is itself new is flagged on its own.
MIN_PARENT_SIGHTINGS = 3


Identity = tuple[str, str, str, str]  # host, name, user ('' if unknown), exe ('' if unknown)


@dataclass
class Profile:
    """Counts over the training window, keyed for O(1) lookups while scoring."""

    window_start: float
    window_end: float
    host_snapshots: dict[str, int]
    procs: dict[Identity, tuple[int, int, float, float]]  # n_snap, n_hours, first, last
    hours: dict[tuple[str, str, int], int]  # (host, name, hour of day) -> sightings
    # (host, parent name, child name) -> snapshots with that edge; empty for pre-lineage models.
    edges: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "window_start": self.window_start,
            "window_end": self.window_end,
            "host_snapshots": self.host_snapshots,
            "procs": [[*k, *v] for k, v in self.procs.items()],
            "hours": [[h, n, hr, c] for (h, n, hr), c in self.hours.items()],
            "edges": [[h, p, c, n] for (h, p, c), n in self.edges.items()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        return cls(
            window_start=float(data["window_start"]),
            window_end=float(data["window_end"]),
            host_snapshots={str(k): int(v) for k, v in data["host_snapshots"].items()},
            procs={(h, n, u, e): (int(a), int(b), float(c), float(d))
                   for h, n, u, e, a, b, c, d in data["procs"]},
            hours={(h, n, int(hr)): int(c) for h, n, hr, c in data["hours"]},
            edges={(h, p, c): int(n) for h, p, c, n in data.get("edges", ())},
        )

    def child_edges(self) -> dict[tuple[str, str], int]:
        """Resolved-parent sightings per (host, child name), cached."""
        cached = getattr(self, "_child_edges", None)
        if cached is None:
            cached = {}
            for (host, _parent, child), count in self.edges.items():
                cached[(host, child)] = cached.get((host, child), 0) + count
            self._child_edges = cached
        return cached

    def usual_parents(self, host: str, child: str, limit: int = 2) -> list[str]:
        found = sorted(((n, p) for (h, p, c), n in self.edges.items() if h == host and c == child),
                       reverse=True)
        return [p for _n, p in found[:limit]]

    def name_counts(self) -> dict[tuple[str, str], int]:
        """Sightings per (host, name) summed over the hours table, cached."""
        cached = getattr(self, "_name_counts", None)
        if cached is None:
            cached = {}
            for (host, name, _hour), count in self.hours.items():
                cached[(host, name)] = cached.get((host, name), 0) + count
            self._name_counts = cached
        return cached

    def by_name(self, host: str, name: str) -> list[tuple[Identity, tuple[int, int, float, float]]]:
        return [(k, v) for k, v in self.procs.items() if k[0] == host and k[1] == name]


def build_features(profile: Profile, rows: Sequence[Sequence[Any]],
                   gaps: Sequence[float | None] | None = None) -> np.ndarray:
    """Feature matrix (all of ``FEATURES``) for rows in ``ROW_FIELDS`` order: (host, name,
    username, exe, ts, cpu, rss, parent name or None).

    ``gaps`` (hours since the previous sighting) is given for training rows; when scoring it is
    derived from the profile's last sighting.
    """
    n = len(rows)
    out = np.zeros((n, len(FEATURES)), dtype=np.float64)
    if n == 0:
        return out
    procs, hours, host_snaps = profile.procs, profile.hours, profile.host_snapshots
    names = profile.name_counts()
    edges, child_edges = profile.edges, profile.child_edges()
    window_h = max((profile.window_end - profile.window_start) / 3600.0, 1.0)
    none = (0, 0, 0.0, 0.0)
    n_snap = np.empty(n)
    n_hours = np.empty(n)
    total = np.empty(n)
    gap = np.empty(n)
    n_hour = np.empty(n)
    n_name = np.empty(n)
    rss = np.empty(n)
    cpu = np.empty(n)
    edge = np.empty(n)
    for i, (host, name, user, exe, ts, c, r, parent) in enumerate(rows):
        snap, hrs, _first, last = procs.get((host, name, user or "", exe or ""), none)
        n_snap[i] = snap
        n_hours[i] = hrs
        total[i] = host_snaps.get(host, 0)
        if gaps is not None:
            g = gaps[i]
            gap[i] = window_h if g is None else g
        else:
            gap[i] = window_h if not snap else max(0.0, (ts - last) / 3600.0)
        n_hour[i] = hours.get((host, name, int(ts // 3600) % 24), 0)
        n_name[i] = names.get((host, name), 0)
        rss[i] = r or 0
        cpu[i] = c or 0.0
        # Unknown parent (not in the snapshot) or a child never seen with one: as familiar as
        # the process itself, so only a known child with a stranger for a parent stands out.
        edge[i] = (edges.get((host, parent, name), 0)
                   if parent and child_edges.get((host, name), 0) else snap)
    out[:, 0] = np.log1p(n_snap)
    out[:, 1] = np.log1p(n_hours)
    out[:, 2] = np.divide(n_snap, total, out=np.zeros(n), where=total > 0)
    out[:, 3] = np.log1p(np.minimum(gap, window_h))
    out[:, 4] = np.log1p(24.0 * np.divide(n_hour, n_name, out=np.zeros(n), where=n_name > 0))
    out[:, 5] = np.log1p(rss / 1048576.0)
    out[:, 6] = np.log1p(cpu)
    out[:, 7] = np.log1p(edge)
    return out


def unseen_edge(profile: Profile, host: str, name: str, parent: str | None,
                min_parent: int = MIN_PARENT_SIGHTINGS) -> bool:
    """True if this child was seen with resolved parents here, but never with this one, and
    the parent itself is a familiar process on the host."""
    if not parent or not profile.edges:
        return False
    if profile.child_edges().get((host, name), 0) == 0:
        return False
    if profile.edges.get((host, parent, name), 0):
        return False
    return profile.name_counts().get((host, parent), 0) >= min_parent


@dataclass
class ScoreResult:
    scores: np.ndarray  # 0..1, higher is more anomalous
    flagged: np.ndarray  # bool
    threshold: float


class AnomalyModel:
    """A trained detector: everything needed to score rows, nothing that can run code."""

    def __init__(self, forest: IsolationForest, profile: Profile, meta: dict[str, Any],
                 version: str | None = None) -> None:
        self.forest = forest
        self.profile = profile
        self.meta = meta
        self.version = version
        self.threshold = float(meta["threshold"])
        self.flag_unseen = bool(meta.get("flag_unseen", True))
        self.flag_unseen_edge = bool(meta.get("flag_unseen_edge", False))
        self.min_parent = int(meta.get("lineage_min_parent", MIN_PARENT_SIGHTINGS))
        self.features = tuple(meta.get("features") or FEATURES_V1)
        self._columns = [FEATURES.index(f) for f in self.features]

    # -- scoring -------------------------------------------------------------------------
    def score(self, rows: Sequence[Sequence[Any]]) -> ScoreResult:
        X = build_features(self.profile, rows)  # noqa: N806 - the feature matrix, as scikit-learn names it
        if len(X) == 0:
            return ScoreResult(np.zeros(0), np.zeros(0, dtype=bool), self.threshold)
        scores = -self.forest.score_samples(X[:, self._columns])
        flagged = scores > self.threshold
        if self.flag_unseen:
            flagged |= X[:, 0] == 0.0
        if self.flag_unseen_edge:
            # Only rows whose parent is a stranger to this child are checked one by one.
            for i in np.flatnonzero((X[:, 7] == 0.0) & ~flagged):
                row = rows[i]
                if unseen_edge(self.profile, row[0], row[1], row[7], self.min_parent):
                    flagged[i] = True
        return ScoreResult(scores, flagged, self.threshold)

    def reasons(self, row: Sequence[Any]) -> list[str]:
        """Plain-language reasons a row looks odd, for alerts and `milton detect`."""
        host, name, user, exe, ts, _cpu, _rss, parent = row
        profile = self.profile
        if host not in profile.host_snapshots:
            return [f"no history for host {host!r} yet"]
        window_days = (profile.window_end - profile.window_start) / 86400
        same_name = profile.by_name(host, name)
        if not same_name:
            return [f"never seen on {host} in the last {window_days:.0f} days"]
        total = profile.host_snapshots[host]
        snap = profile.procs.get((host, name, user or "", exe or ""), (0,))[0]
        out = []
        if snap == 0:
            users = {k[2] for k, _ in same_name}
            exes = {k[3] for k, _ in same_name}
            if (user or "") not in users:
                usual = max(same_name, key=lambda kv: kv[1][0])[0][2]
                out.append(f"{name} never ran as {user!r} here (usually {usual!r})")
            if (exe or "") not in exes:
                out.append(f"{name} never ran from {exe!r} here")
            if not out:
                out.append(f"this user/executable combination of {name} is new")
        elif total and snap / total < 0.05:
            out.append(f"rare on {host}: seen in {snap} of {total} snapshots")
        if unseen_edge(profile, host, name, parent, self.min_parent):
            usual = profile.usual_parents(host, name)
            out.append(f"{name} never started from {parent} here"
                       + (f" (usually from {', '.join(usual)})" if usual else ""))
        if profile.hours.get((host, name, int(ts // 3600) % 24), 0) == 0:
            out.append(f"unusual hour ({int(ts // 3600) % 24:02d}:00 UTC)")
        return out or ["unusual resource use for this process"]

    # -- persistence ---------------------------------------------------------------------
    def write(self, directory: Path) -> None:
        import skops.io as sio

        sio.dump(self.forest, directory / MODEL_FILE)
        (directory / PROFILE_FILE).write_text(json.dumps(self.profile.to_json()))
        (directory / META_FILE).write_text(json.dumps(self.meta, indent=2))

    @classmethod
    def load(cls, version: Version) -> AnomalyModel:
        """Load a version whose checksums were already verified (see :func:`load_verified`)."""
        import skops.io as sio

        directory = version.path
        try:
            # Raises UntrustedTypesFoundException for any type outside the explicit list.
            forest = sio.load(directory / MODEL_FILE, trusted=TRUSTED_TYPES)
            profile = Profile.from_json(json.loads((directory / PROFILE_FILE).read_text()))
            meta = json.loads((directory / META_FILE).read_text())
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure means "unloadable"
            raise ArtifactError(f"{ANOMALY_KIND}/{version.name}: cannot load model: "
                                f"{type(exc).__name__}: {exc}") from None
        features = meta.get("features") or list(FEATURES_V1)
        if (not isinstance(features, list) or not set(features) <= set(FEATURES)
                or not isinstance(forest, IsolationForest)
                or forest.n_features_in_ != len(features)):
            raise ArtifactError(f"{ANOMALY_KIND}/{version.name}: not a compatible IsolationForest")
        if not math.isfinite(float(meta.get("threshold", float("nan")))):
            raise ArtifactError(f"{ANOMALY_KIND}/{version.name}: meta.json lacks a threshold")
        return cls(forest, profile, meta, version.name)


def load_verified(store: ArtifactStore, name: str = "current") -> AnomalyModel:
    """Checksum-verify, then load. Raises ArtifactError naming what is wrong."""
    version = store.verify(store.get(name).name)
    return AnomalyModel.load(version)


def scoring_rows(rows: Iterable[Sequence[Any]]) -> list[tuple]:
    """Full process rows (``COLUMNS`` order) to ``ROW_FIELDS`` order for :meth:`AnomalyModel.score`,
    each with its parent's name resolved from ``ppid`` within the same snapshot (None if absent)."""
    rows = rows if isinstance(rows, list) else list(rows)
    names = {(r[0], r[3]): r[5] for r in rows}
    get = names.get
    return [(r[1], r[5], r[7], r[6], r[2], r[8], r[9],
             None if r[4] is None or r[4] == r[3] else get((r[0], r[4]))) for r in rows]
