"""Atomic writes, manifests and checksums."""

import errno
import warnings

import pandas as pd
import pytest

import ffnlib
from ffnlib import storage


def test_result_round_trip_and_manifest_mismatch(tmp_path):
    frame = pd.DataFrame({"layer": [0, 1], "value": [0.5, 0.25]})
    storage.save_result(tmp_path, "r", frame, {"model": "m", "k": 5})
    pd.testing.assert_frame_equal(storage.load_result(tmp_path, "r", {"model": "m", "k": 5}), frame)
    assert storage.load_result(tmp_path, "r", {"model": "m", "k": 6}) is None
    manifest = storage.read_json(tmp_path / "r.manifest.json")
    assert manifest["sha256"] == storage.sha256_file(tmp_path / "r.parquet") and manifest["rows"] == 2


def test_truncated_result_is_detected_named_and_not_used(tmp_path):
    storage.save_result(tmp_path, "r", pd.DataFrame({"a": range(100)}), {"x": 1})
    path = tmp_path / "r.parquet"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.warns(UserWarning, match="r.parquet.*checksum"):
        assert storage.load_result(tmp_path, "r", {"x": 1}) is None


def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    storage.write_json(target, {"old": True})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full)
    with pytest.raises(ffnlib.ResultsError, match="disk is full"):
        storage.write_json(target, {"new": True})
    assert storage.read_json(target) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_unwritable_results_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ffnlib.ResultsError, match="Cannot create the folder"):
        storage.ensure_dir(blocker / "results")


def test_unreadable_manifest_warns_and_recomputes(tmp_path):
    storage.save_result(tmp_path, "r", pd.DataFrame({"a": [1]}), {"x": 1})
    (tmp_path / "r.manifest.json").write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert storage.load_result(tmp_path, "r", {"x": 1}) is None
    assert any("manifest is unreadable" in str(w.message) for w in caught)
