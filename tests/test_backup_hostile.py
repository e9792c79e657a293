"""Restore is all-or-nothing and crafted archives are refused (issue 19, defects 2-5 and 9).

Archives are crafted with tarfile exactly as an attacker or a damaged disk would leave them;
the store, the models and the restore code are the real ones.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
from pathlib import Path

import pytest
from helpers import assert_clean_error
from test_backup import archives, leftovers, publish, seed_store, sha

from milton.core.artifacts import ArtifactStore
from milton.core.store import open_store
from milton.ops.backup.archive import ArchiveError, BackupError, read_manifest, verify_archive
from milton.ops.backup.create import create_backup
from milton.ops.backup.restore import restore_backup
from milton.ops.backup.retention import list_backups


def craft(path: Path, manifest: dict, members: list[tuple[str, bytes]],
          sizes: dict[str, int] | None = None) -> Path:
    """A gzip'd tar with ``manifest`` first, then ``members`` as given (names unchecked).

    ``sizes`` overrides what the manifest declares for a member (default: the truth).
    """
    files = dict(manifest.get("files", {}))
    for member, data in members:
        files.setdefault(member, {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    for member, size in (sizes or {}).items():
        files[member] = {**files[member], "size": size}
    body = json.dumps({**manifest, "files": files}).encode()
    with gzip.open(path, "wb", compresslevel=1) as raw, \
            tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for member, data in [("manifest.json", body), *members]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def genuine_parts(settings) -> tuple[dict, list[tuple[str, bytes]]]:
    """The manifest and members of a real backup of the current state."""
    made = Path(create_backup(settings, prune=False)["path"])
    manifest = read_manifest(made)
    with tarfile.open(made) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()  # type: ignore[union-attr]
                   if m.name != "manifest.json"]
    made.unlink()
    return manifest, members


def change_store(settings) -> None:
    db = open_store(settings.db_path)
    with db.atomic():
        db.execute("delete from processes where rowid % 2 = 0")
    db.close()


def live_state(settings) -> tuple[str, str | None, int]:
    """(store sha256, current adapter, processes rows): what a failed restore must not change."""
    conn = sqlite3.connect(settings.db_path)
    rows = conn.execute("select count(*) from processes").fetchone()[0]
    conn.close()
    return sha(settings.db_path), ArtifactStore(settings.paths.checkpoints_dir, "adapter").current_name(), rows


# -- defect 2: validate the whole plan first; roll back after the first swap ----------------------
def test_a_model_that_cannot_be_restored_is_found_before_the_store_is_swapped(cli, settings):
    """The issue's case: a genuine archive whose model manifest was already corrupt."""
    seed_store(settings.db_path, snapshots=3)
    version = publish(settings, "adapter", b"adapter weights")
    store = ArtifactStore(settings.paths.checkpoints_dir, "adapter")
    (store.dir / version / "manifest.json").write_text("{ not json")
    rc, _, err = cli("backup")
    assert rc == 0, err
    [name] = archives(settings)
    change_store(settings)  # life goes on: the store differs from the archive
    (store.dir / version / "manifest.json").unlink()
    publish(settings, "adapter", b"a newer adapter")
    before = live_state(settings)

    rc, _, err = cli("restore", name, "--yes")
    assert rc == 1
    assert_clean_error(err, name, f"model adapter/{version} cannot be restored",
                       "nothing was changed")
    assert live_state(settings) == before
    assert archives(settings) == [name]  # failed before the pre-restore backup
    assert not leftovers(settings.paths.data_dir, settings.paths.checkpoints_dir)


def test_a_failure_after_the_first_swap_rolls_everything_back(milton_home, settings, tmp_path):
    config = milton_home / "config.toml"
    config.write_text("[backup]\nkeep_last = 5\n")
    seed_store(settings.db_path, snapshots=2)
    old = publish(settings, "adapter", b"archived adapter")
    archive = Path(create_backup(settings, config_file=config)["path"])
    change_store(settings)
    publish(settings, "adapter", b"newer adapter")
    before = live_state(settings)
    assert before[1] != old

    # The config target is a directory: the store and the models are swapped in before
    # writing it fails (a real failure, from the kernel).
    target = tmp_path / "config-dir"
    target.mkdir()
    with pytest.raises(BackupError) as caught:
        restore_backup(settings, archive, with_config=True, config_file=target)
    message = str(caught.value)
    assert "failed while restoring the config file" in message
    assert "rolled back: the store, models and config are as they were" in message
    assert "pre-restore" in message and "\n" not in message
    assert live_state(settings) == before
    conn = sqlite3.connect(settings.db_path)
    assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    assert conn.execute("select count(*) from job_runs where job = 'restore'").fetchone()[0] == 0
    conn.close()
    assert ArtifactStore(settings.paths.checkpoints_dir, "adapter").verify(before[1])
    assert not leftovers(settings.paths.data_dir, settings.paths.checkpoints_dir)
    assert not [p for p in (settings.paths.checkpoints_dir / "adapter").iterdir()
                if p.name.startswith(".tmp-")]
    # and the same archive restores fine to the real config path
    restore_backup(settings, archive, with_config=True, config_file=config)
    assert live_state(settings)[1] == old


# -- defect 3: a member is never read past its declared size --------------------------------------
def test_a_member_larger_than_declared_fails_before_it_is_written(settings, tmp_path):
    seed_store(settings.db_path, snapshots=1)
    manifest, members = genuine_parts(settings)
    big = b"\0" * (64 << 20)  # 64 MB of zeros: a ~64 kB archive
    members.append(("checkpoints/anomaly/v000001/model.skops", big))
    path = craft(tmp_path / "milton-20260101T000000Z.tar.gz", manifest, members,
                 sizes={"checkpoints/anomaly/v000001/model.skops": 10})
    assert path.stat().st_size < 1 << 20
    written: list[Path] = []

    def sink(member: str, _manifest: dict) -> Path:
        written.append(tmp_path / "out" / member)
        return written[-1]

    with pytest.raises(ArchiveError, match="holds 67108864 bytes, the manifest says 10"):
        verify_archive(path, extract=sink)
    big_out = tmp_path / "out" / "checkpoints/anomaly/v000001/model.skops"
    assert not big_out.exists()  # nothing of it was written (before: 64 MB, then a checksum error)
    assert sum(p.stat().st_size for p in written if p.exists()) <= sum(len(d) for _, d in members[:-1])

    before = sha(settings.db_path)
    with pytest.raises(ArchiveError, match="manifest says 10"):
        restore_backup(settings, path)
    assert sha(settings.db_path) == before
    assert not leftovers(settings.paths.data_dir, settings.paths.checkpoints_dir)


# -- defect 4: one file, two spellings ------------------------------------------------------------
@pytest.mark.parametrize("alias", [
    "checkpoints/./adapter/{v}/model.bin",
    "checkpoints//adapter/{v}/model.bin",
    "checkpoints/adapter/{v}/x/../model.bin",
    "checkpoints/adapter/{v}/model.bin/",
])
def test_aliased_member_names_are_refused(settings, tmp_path, alias):
    seed_store(settings.db_path, snapshots=1)
    version = publish(settings, "adapter", b"real adapter")
    manifest, members = genuine_parts(settings)
    evil = alias.format(v=version)
    members.append((evil, b"evil weights"))
    path = craft(tmp_path / "milton-20260101T000000Z.tar.gz", manifest, members)
    with pytest.raises(ArchiveError, match="not a plain relative path"):
        verify_archive(path)
    with pytest.raises(ArchiveError, match="not a plain relative path"):
        restore_backup(settings, path)
    store = ArtifactStore(settings.paths.checkpoints_dir, "adapter")
    assert (store.dir / version / "model.bin").read_bytes() == b"real adapter"


def test_a_manifest_with_a_duplicate_member_key_is_refused(settings, tmp_path):
    seed_store(settings.db_path, snapshots=1)
    manifest, members = genuine_parts(settings)
    path = tmp_path / "dup.tar"
    body = json.dumps(manifest).encode()
    db_entry = json.dumps(manifest["files"]["data/milton.db"])
    body = body.replace(b'"files": {', b'"files": {"data/milton.db": ' + db_entry.encode() + b", ", 1)
    with tarfile.open(path, "w") as tar:
        for member, data in [("manifest.json", body), *members]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="duplicate key 'data/milton.db'"):
        verify_archive(path)


# -- defect 5: the listing never vouches for bytes it did not read ---------------------------------
def test_list_says_not_re_verified_after_an_in_place_flip(cli, settings):
    seed_store(settings.db_path, snapshots=2)
    version = publish(settings, "adapter", b"A" * 5000)
    rc, _, err = cli("backup", env={"MILTON_BACKUP__COMPRESSION": "none"})
    assert rc == 0, err
    [info] = list_backups(settings)
    member = f"checkpoints/adapter/{version}/model.bin"
    with tarfile.open(info.path) as tar:
        offset = tar.getmember(member).offset_data
    st = info.path.stat()
    with open(info.path, "r+b") as handle:
        handle.seek(offset + 100)
        handle.write(b"BBBB")
    os.utime(info.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert info.path.stat().st_mtime_ns == st.st_mtime_ns and info.path.stat().st_size == st.st_size

    rc, out, err = cli("backup", "list", "--json")
    assert rc == 0, err
    [row] = json.loads(out)
    assert row["verified"] != "ok" and row["last_verified_ok"]
    rc, out, err = cli("backup", "list", env={"COLUMNS": "200"})
    assert rc == 0, err
    assert f"not re-verified since {row['last_verified_ok'].replace('T', ' ')}" in out
    assert " ok" not in out
    rc, _, err = cli("backup", "verify", info.name)
    assert rc == 1
    assert_clean_error(err, f"checksum mismatch in {member}")
    rc, out, _ = cli("backup", "list", "--json")
    assert json.loads(out)[0]["verified"] == "failed"


# -- defect 9: bad manifests are one-line errors, and do not break the listing --------------------
def test_bad_manifests_are_one_line_errors_and_the_listing_survives(cli, settings):
    seed_store(settings.db_path, snapshots=1)
    manifest, members = genuine_parts(settings)
    rc, _, err = cli("backup")
    assert rc == 0, err
    [good] = archives(settings)
    directory = settings.backup.dir
    rows_list = craft(directory / "milton-20300101T000000Z-rows.tar.gz",
                      {**manifest, "rows": [1, 2, 3]}, members)
    not_db = [(m, b"hello, I am not a database" if m == manifest["db"] else d) for m, d in members]
    files = {k: v for k, v in manifest["files"].items() if k != manifest["db"]}
    no_db = craft(directory / "milton-20300102T000000Z-notdb.tar.gz", {**manifest, "files": files},
                  not_db)

    rc, out, err = cli("backup", "list", "--json")
    assert rc == 0 and "Traceback" not in err, err
    listed = {r["name"]: r for r in json.loads(out)}
    assert set(listed) == {good, rows_list.name, no_db.name}
    assert "'rows' is not an object" in listed[rows_list.name]["error"]
    assert listed[good]["error"] is None and listed[good]["rows_total"] > 0
    rc, out, err = cli("backup", "list")
    assert rc == 0 and "Traceback" not in err and "UNREADABLE" in out, err

    before = sha(settings.db_path)
    for target, needle in ((rows_list.name, "'rows' is not an object"),
                           ("latest", "not a readable SQLite database")):
        for command in (("backup", "verify", target), ("restore", target, "--yes")):
            rc, _, err = cli(*command)
            assert rc == 1, (command, err)
            assert_clean_error(err, needle)
    assert sha(settings.db_path) == before
    assert not leftovers(directory, settings.paths.data_dir, settings.paths.checkpoints_dir)


def test_restore_still_round_trips_after_the_checks(settings):
    """The stricter checks accept what Milton itself writes (store, pinned and current models)."""
    seed_store(settings.db_path, snapshots=2)
    first = publish(settings, "adapter", b"one")
    ArtifactStore(settings.paths.checkpoints_dir, "adapter").pin(first)
    publish(settings, "adapter", b"two")
    archive = Path(create_backup(settings)["path"])
    saved = live_state(settings)
    db = open_store(settings.db_path)
    db.execute("delete from processes")
    db.close()
    shutil.rmtree(settings.paths.checkpoints_dir / "adapter" / first)
    result = restore_backup(settings, archive)
    assert result["artifacts"]["adapter"]["restored_versions"] == [first]
    assert live_state(settings)[1:] == saved[1:]
