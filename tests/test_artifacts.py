"""Versioned artifacts: manifests, atomic current, retention, verify, rollback, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, assert_clean_error

from milton.core.artifacts import ArtifactStore, known_kinds
from milton.core.errors import ArtifactError


def builder(payload: bytes, extra: dict[str, bytes] | None = None):
    def build(tmp: Path) -> None:
        (tmp / "model.bin").write_bytes(payload)
        for rel, data in (extra or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
    return build


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "checkpoints", "demo", keep=3)


def test_publish_writes_manifest_with_hashes_libraries_metrics(store):
    v = store.publish(builder(b"weights-1", {"sub/vocab.txt": b"a b c"}),
                      metrics={"auc": 0.9}, data_window={"start": "x", "end": "y"})
    assert v.name == "v000001"
    manifest = json.loads((store.dir / "v000001" / "manifest.json").read_text())
    assert manifest["version"] == "v000001" and manifest["kind"] == "demo"
    assert manifest["files"] == {
        "model.bin": {"sha256": hashlib.sha256(b"weights-1").hexdigest(), "size": 9},
        "sub/vocab.txt": {"sha256": hashlib.sha256(b"a b c").hexdigest(), "size": 5},
    }
    assert manifest["metrics"] == {"auc": 0.9}
    assert manifest["data_window"] == {"start": "x", "end": "y"}
    assert manifest["libraries"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "numpy" in manifest["libraries"]
    assert manifest["parent"] is None and manifest["created"].endswith("Z")
    assert store.current_name() == "v000001"
    assert store.publish(builder(b"w2")).manifest["parent"] == "v000001"
    assert [e["event"] for e in store.history()] == ["publish", "publish", "publish", "publish"]


def test_current_is_a_symlink_switched_by_rename(store):
    store.publish(builder(b"1"))
    link = store.dir / "current"
    assert link.is_symlink() and os.readlink(link) == "v000001"
    store.publish(builder(b"2"))
    assert os.readlink(link) == "v000002"
    assert (link / "model.bin").read_bytes() == b"2"
    leftovers = [p.name for p in store.dir.iterdir() if p.name.startswith((".current-", ".tmp-"))]
    assert leftovers == []
    store.publish(builder(b"3"), make_current=False)
    assert store.current_name() == "v000002"  # published but not promoted
    store.set_current("v000003")
    assert store.current_name() == "v000003"


def test_empty_build_is_rejected_and_leaves_nothing(store):
    store.publish(builder(b"1"))
    with pytest.raises(ArtifactError, match="no files"):
        store.publish(lambda tmp: None)
    with pytest.raises(RuntimeError):
        def boom(tmp):
            (tmp / "half").write_bytes(b"x")
            raise RuntimeError("build failed")
        store.publish(boom)
    assert store.version_names() == ["v000001"]
    assert store.current_name() == "v000001"
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".tmp-")]


def test_retention_keeps_n_and_never_current_or_pinned(store):
    for i in range(1, 4):
        store.publish(builder(str(i).encode()))
    store.pin("v000001")
    store.set_current("v000002", reason="promote")
    for i in range(4, 8):
        store.publish(builder(str(i).encode()), make_current=False)
    # keep=3 newest (5, 6, 7) + pinned 1 + current 2
    assert store.version_names() == ["v000001", "v000002", "v000005", "v000006", "v000007"]
    assert store.current_name() == "v000002"
    assert store.pins() == {"v000001"}
    store.pin("v000001", pinned=False)
    store.publish(builder(b"8"))  # becomes current; v000002 is no longer protected
    assert store.version_names() == ["v000006", "v000007", "v000008"]
    assert store.current_name() == "v000008"
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".tmp-del-")]


def test_version_numbers_never_reused_after_prune(store):
    for i in range(6):
        store.publish(builder(bytes([i])))
    assert store.version_names() == ["v000004", "v000005", "v000006"]
    assert store.publish(builder(b"z")).name == "v000007"


def test_verify_detects_tampered_and_missing_files(store):
    store.publish(builder(b"good", {"extra.txt": b"e"}))
    assert store.verify("v000001").name == "v000001"
    (store.dir / "v000001" / "extra.txt").write_bytes(b"E")
    with pytest.raises(ArtifactError, match=r"demo/v000001: checksum mismatch in extra\.txt"):
        store.verify("v000001")
    (store.dir / "v000001" / "extra.txt").unlink()
    with pytest.raises(ArtifactError, match=r"missing file extra\.txt"):
        store.verify("current")
    (store.dir / "v000001" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        store.verify("v000001")
    with pytest.raises(ArtifactError, match="no version"):
        store.get("v000099")
    with pytest.raises(ArtifactError, match="no version"):
        store.get("../etc")


def test_rollback_goes_to_previous_valid_version(store):
    for i in range(1, 4):
        store.publish(builder(str(i).encode()))
    (store.dir / "v000002" / "model.bin").write_bytes(b"tampered")
    v = store.rollback()
    assert v.name == "v000001"  # v000002 fails its checksum and is skipped
    assert store.current_name() == "v000001"
    with pytest.raises(ArtifactError, match="no earlier valid version"):
        store.rollback()
    assert store.current_name() == "v000001"
    assert store.rollback("v000003").name == "v000003"
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        store.rollback("v000002")
    assert store.current_name() == "v000003"
    events = [(e["event"], e.get("version"), e.get("previous")) for e in store.history()]
    assert ("rollback", "v000001", "v000003") in events
    assert ("rollback", "v000003", "v000001") in events


KILLED_PUBLISHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from milton.core.artifacts import ArtifactStore
    store = ArtifactStore(Path(sys.argv[1]), "demo", keep=3)
    def build(tmp):
        with open(tmp / "model.bin", "wb") as f:
            f.write(b"x" * 100000)
            f.flush()
            print("building", flush=True)
            time.sleep(60)
    store.publish(build)
""")


def test_kill_9_mid_build_leaves_current_valid_and_next_publish_cleans(store):
    store.publish(builder(b"old"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISHER, str(store.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"building\n", proc.stderr.read()
        stale = [p for p in store.dir.iterdir() if p.name.startswith(".tmp-")]
        assert len(stale) == 1 and (stale[0] / "model.bin").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert store.current_name() == "v000001"
    assert store.verify("current").name == "v000001"
    assert store.version_names() == ["v000001"]
    assert (store.dir / "current" / "model.bin").read_bytes() == b"old"

    v = store.publish(builder(b"new"))
    assert v.name == "v000002" and store.current_name() == "v000002"
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".tmp-")]


def test_bad_kind_rejected(tmp_path):
    with pytest.raises(ValueError):
        ArtifactStore(tmp_path, "../evil")
    assert known_kinds(tmp_path / "nothing") == []


# -- CLI -----------------------------------------------------------------------------------
@pytest.fixture
def published(settings):
    store = ArtifactStore(settings.paths.checkpoints_dir, "demo", keep=settings.artifacts.keep)
    for i in range(1, 4):
        store.publish(builder(f"model {i}".encode()), metrics={"records": i * 10})
    return store


def test_cli_models_list(cli, published):
    rc, out, err = cli("models", "list", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [(r["kind"], r["version"], r["current"], r["pinned"]) for r in rows] == [
        ("demo", "v000001", False, False), ("demo", "v000002", False, False),
        ("demo", "v000003", True, False)]
    assert rows[0]["metrics"] == {"records": 10}
    rc, out, err = cli("models", "list")
    assert rc == 0 and "v000003" in out and "records=30" in out


def test_cli_models_list_empty(cli):
    rc, out, err = cli("models", "list")
    assert rc == 0 and "No model versions yet" in out
    rc, out, err = cli("models", "list", "--json")
    assert rc == 0 and json.loads(out) == []


def test_cli_models_show(cli, published):
    rc, out, err = cli("models", "show", "demo")
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["version"] == "v000003" and shown["current"] is True
    assert shown["files"]["model.bin"]["sha256"] == hashlib.sha256(b"model 3").hexdigest()
    rc, out, err = cli("models", "show", "demo", "v000001")
    assert rc == 0 and json.loads(out)["metrics"] == {"records": 10}
    rc, out, err = cli("models", "show", "demo", "v000042")
    assert rc == 1
    assert_clean_error(err, "v000042")
    rc, out, err = cli("models", "show", "nosuchkind")
    assert rc == 1
    assert_clean_error(err, "nosuchkind")


def test_cli_models_rollback_promote_pin(cli, published):
    rc, out, err = cli("models", "rollback", "demo")
    assert rc == 0, err
    assert "current is now v000002" in out
    assert published.current_name() == "v000002"
    rc, out, err = cli("models", "rollback", "demo", "--to", "v000003")
    assert rc == 0 and published.current_name() == "v000003"
    rc, out, err = cli("models", "promote", "demo", "v000001")
    assert rc == 0 and published.current_name() == "v000001"

    rc, out, err = cli("models", "pin", "demo", "v000002")
    assert rc == 0 and "pinned" in out
    assert published.pins() == {"v000002"}
    rc, out, err = cli("models", "list", "--json")
    assert [r["pinned"] for r in json.loads(out)] == [False, True, False]
    rc, out, err = cli("models", "pin", "demo", "v000002", "--unpin")
    assert rc == 0 and published.pins() == set()

    (published.dir / "v000003" / "model.bin").write_bytes(b"evil")
    rc, out, err = cli("models", "promote", "demo", "v000003")
    assert rc == 1
    assert_clean_error(err, "checksum mismatch", "model.bin")
    assert published.current_name() == "v000001"
    rc, out, err = cli("models", "rollback", "demo")
    assert rc == 1
    assert_clean_error(err, "no earlier valid version")
