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
# Dummy credentials before any Ray worker starts: workers inherit them, and the S3 tests talk
# only to moto on 127.0.0.1.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
# Test data that a cloned repository carries (tests/data/README.md gives each file's provenance):
# the reference values computed with the DCGH and DAPH authors' code, KubeRay's CRD schemas.
TEST_DATA = REPO / "tests" / "data"
# DCGH_GOLDEN_DIR points elsewhere only for the test that golden data missing is an error.
GOLDEN = Path(os.environ.get("DCGH_GOLDEN_DIR") or TEST_DATA / "golden")
# The files the golden tests read: a directory without them is as missing as no directory.
GOLDEN_FILES = ("map_cases.npz", "dcgh_loss_cases.npz")


class ListenerWatch:
    """Samples, in a thread, the listening TCP sockets of this process and all its descendants
    (Ray's raylets, workers, dashboards): which addresses they bind, and who binds them."""

    def __init__(self, interval: float = 0.3):
        import threading

        self.seen: dict[tuple[str, int], str] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            try:
                pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
                for c in psutil.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN and c.pid in pids and (c.laddr.ip, c.laddr.port) not in self.seen:
                        try:
                            name = " ".join(psutil.Process(c.pid).cmdline())[:80]
                        except psutil.Error:
                            name = str(c.pid)
                        self.seen[(c.laddr.ip, c.laddr.port)] = name
                self.samples += 1
            except psutil.Error:
                pass
            self._stop.wait(self._interval)

    def __enter__(self) -> "ListenerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def not_loopback(self) -> dict[tuple[str, int], str]:
        return {a: n for a, n in self.seen.items() if a[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden-value directory. Missing reference data fails the test (an error, never a
    skip): a test that cannot compare against its reference has not passed."""
    missing = [name for name in GOLDEN_FILES if not (GOLDEN / name).is_file()]
    if missing:
        pytest.fail(
            f"golden reference values not found: {', '.join(missing)} missing in {GOLDEN}",
            pytrace=False,
        )
    return GOLDEN


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory) -> str:
    """A small demo dataset (1,200 pairs: 600 train) generated once per test session."""
    from dcgh_dist.data.demo import ensure_demo_dataset

    root = tmp_path_factory.mktemp("data")
    return ensure_demo_dataset(size=1200, seed=0, data_root=str(root))


@pytest.fixture(scope="session")
def demo_features(tmp_path_factory) -> str:
    """The built-in feature dataset (2,866 pairs, single-label, 10 classes), generated once."""
    from dcgh_dist.data.demo import ensure_features_demo

    return ensure_features_demo(seed=0, data_root=str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1, started for the session.

    Yields ``(endpoint_url, make_bucket)``. Credentials are dummy values set in the environment,
    which pyarrow, s3fs and boto3 (and Ray workers started afterwards) all read.
    """
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        os.environ[k] = v
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    def make_bucket(name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"

    try:
        yield endpoint, make_bucket
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for all Ray tests of the session: 4 logical CPUs on loopback.

    Jobs called through ``main([...])`` join it instead of starting their own (they only shut
    down clusters they started). More logical CPUs than cores, so training workers cannot starve
    the Ray Data tasks that feed them.
    """
    import ray

    from dcgh_dist.ray_session import ray_session

    with ray_session(num_cpus=4, dashboard=True):
        yield ray


def pytest_collection_modifyitems(config, items):
    """The tiers (README, Tests) by what a test uses: one that starts or joins a local Ray cluster
    (the ``ray_cluster`` fixture, directly or through another fixture) is marked ``ray`` even if
    its author forgot, so ``-m "not ray"`` is a loop without Ray."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)
