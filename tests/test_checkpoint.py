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
