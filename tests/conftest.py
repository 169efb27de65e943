"""Shared fixtures. Ray-starting tests use one local cluster per session, bound to loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports ray: a local cluster then binds to 127.0.0.1 only; and nothing may
# reach a model hub.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("DCGH_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden reference values not found at {GOLDEN} (set DCGH_GOLDEN_DIR)")
    return GOLDEN


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory) -> str:
    """A small demo dataset (600 pairs) generated once per test session."""
    from dcgh_dist.data.demo import ensure_demo_dataset

    root = tmp_path_factory.mktemp("data")
    return ensure_demo_dataset(size=600, seed=0, data_root=str(root))
