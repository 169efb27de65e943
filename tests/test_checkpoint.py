"""A checkpoint's weights are what its meta.json says: verified on every load, before Ray starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dcgh_dist.data.format import DatasetInfo
from dcgh_dist.models.checkpoint import CheckpointError, load_model, read_meta, verified_meta

REPO = Path(__file__).resolve().parents[1]
INFO = DatasetInfo(name="t", num_classes=3, class_names=("a", "b", "c"))


def _save(path: Path, seed: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from test_encode_job import make_checkpoint

    return Path(make_checkpoint(str(path), INFO, seed=seed))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return _save(root / "a", 0), _save(root / "b", 1)


def test_intact_checkpoint_loads_and_verifies(two):
    a, _ = two
    model, meta = load_model(str(a))
    assert meta.fingerprint == verified_meta(str(a)).fingerprint == read_meta(str(a)).fingerprint


def test_weights_copied_from_another_run_are_refused(two, tmp_path):
    a, b = two
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(b / "model.pt", mixed / "model.pt")  # same architecture, other weights
    for load in (lambda: load_model(str(mixed)), lambda: verified_meta(str(mixed))):
        with pytest.raises(CheckpointError, match=r"model.pt's weights hash to \w+ but meta.json says \w+"):
            load()


def test_random_bytes_model_pt_is_a_clear_error(two, tmp_path):
    a, _ = two
    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    (bad / "model.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"bad/model.pt: not a loadable weights file"):
        verified_meta(str(bad))


def test_encode_job_refuses_a_bad_checkpoint_before_ray_starts(two, tmp_path):
    """One `error:` line, exit code 2, no traceback, and in seconds (no Ray start-up)."""
    import time

    a, b = two
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(b / "model.pt", mixed / "model.pt")
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "encode.py"), "--checkpoint", str(mixed),
                           "--dataset", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "hash to" in proc.stderr and "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert time.time() - t0 < 60


def test_resume_reads_local_checkpoints_in_place_and_downloads_remote_ones_privately(two, s3_server):
    """Two workers of one node resuming from S3 each get a directory of their own.

    Ray's ``to_directory()`` hands every worker of a node the same directory, and a worker that
    takes its lock after another finished downloads again over the files the other is reading
    (a truncated ``model.pt`` on a two-worker DeepSpeed resume).
    """
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from dcgh_dist.storage import resolve_filesystem
    from dcgh_dist.train.loop import checkpoint_files

    with checkpoint_files(None) as d:
        assert d is None
    local = Checkpoint.from_directory(str(two[0]))
    with checkpoint_files(local) as d:
        assert Path(d) == two[0]  # read where it is, nothing copied
    assert two[0].is_dir()  # and never removed

    endpoint, make_bucket = s3_server
    bucket = make_bucket("dcgh-resume")
    fs, _ = resolve_filesystem(bucket, endpoint)
    pafs.copy_files(str(two[0]), "dcgh-resume/ckpt", destination_filesystem=fs)
    remote = Checkpoint(path="dcgh-resume/ckpt", filesystem=fs)
    with checkpoint_files(remote) as a, checkpoint_files(remote) as b:
        assert a != b
        for d in (a, b):
            assert (Path(d) / "model.pt").read_bytes() == (two[0] / "model.pt").read_bytes()
            model, meta = load_model(d)  # the weights check out against meta.json's fingerprint
            assert meta.fingerprint == read_meta(str(two[0])).fingerprint
    assert not Path(a).exists() and not Path(b).exists()  # the downloads are removed afterwards
