"""Model files: nothing but the trusted types loads, and the checksum is checked first."""

from __future__ import annotations

from collections import Counter

import pytest
import skops.io as sio

from milton.anomaly.model import AnomalyModel, load_verified
from milton.core.artifacts import ArtifactStore
from milton.core.errors import ArtifactError
from milton.models.layout import ANOMALY_KIND as KIND


def _publish(tmp_path, forest_obj):
    store = ArtifactStore(tmp_path, KIND)

    def build(directory):
        sio.dump(forest_obj, directory / "forest.skops")
        (directory / "profile.json").write_text("{}")
        (directory / "meta.json").write_text('{"threshold": 0.5}')

    return store, store.publish(build)


def test_untrusted_types_in_a_model_file_are_refused(tmp_path):
    _store, version = _publish(tmp_path, {"payload": Counter(a=1)})
    with pytest.raises(ArtifactError, match="Untrusted types"):
        AnomalyModel.load(version)


def test_checksum_is_verified_before_parsing(tmp_path):
    store, version = _publish(tmp_path, {"payload": 1})
    (version.path / "forest.skops").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="checksum mismatch in forest.skops"):
        load_verified(store)
