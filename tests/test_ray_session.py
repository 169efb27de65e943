"""Local clusters the jobs start leave nothing behind: not on a clean exit, not after SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from dcgh_dist.ray_session import sweep_orphans

# A short TMPDIR of the test's own: Ray's socket paths under it must stay below the 107-byte limit,
# and nothing here may touch another run's directories.
DRIVER = r"""
import os, sys, time
import ray
from dcgh_dist.ray_session import ray_session
with ray_session(num_cpus=2, dashboard=True):
    tmp = ray.get(ray.remote(lambda: os.environ.get("TMPDIR")).remote())
    import json, urllib.request, urllib.error
    url = "http://" + ray._private.worker._global_node.address_info["webui_url"] + "/api/jobs/"
    req = urllib.request.Request(url, data=json.dumps({"entrypoint": "true"}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        code = urllib.request.urlopen(req, timeout=30).status
    except urllib.error.HTTPError as e:
        code = e.code
    print("READY", ray._private.worker._global_node.get_session_dir_path(), tmp, code, flush=True)
    if sys.argv[1] == "hang":
        time.sleep(600)
    if sys.argv[1] == "straggler":
        # What the run can leave behind: a process holding a file under the run directory, in a
        # session of its own, which ray.shutdown() does not end (as a Ray Train controller once
        # outlived it; Ray itself ends its workers' children, so this one is started here).
        import subprocess
        held = os.path.join(tmp, "held")
        p = subprocess.Popen([sys.executable, "-c", f"import time; f = open({held!r}, 'w'); time.sleep(600)"],
                             start_new_session=True)
        while not os.path.exists(held):
            time.sleep(0.1)
        print("STRAGGLER", p.pid, flush=True)
"""


def _driver(mode: str, tmp: str) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": tmp, "RAY_ADDRESS": ""}
    return subprocess.Popen([sys.executable, "-c", DRIVER, mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _ready(proc: subprocess.Popen) -> tuple[str, str, int]:
    for line in proc.stdout:
        if line.startswith("READY"):
            _, session, worker_tmp, code = line.split()
            return session, worker_tmp, int(code)
    raise AssertionError(f"driver exited with {proc.wait()} before Ray was up")


def _procs_under(root: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if any(root in a for a in p.info["cmdline"] or ())]


@pytest.fixture
def short_tmp():
    d = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_clean_exit_removes_the_run_directory(short_tmp):
    proc = _driver("exit", short_tmp)
    session, worker_tmp, job_api = _ready(proc)
    assert job_api == 401  # the dashboard's job API wants Ray's auth token
    assert proc.wait(timeout=120) == 0
    root = os.path.dirname(session)
    assert os.path.basename(root).startswith("dcgh-ray-") and os.path.dirname(root) == short_tmp
    assert worker_tmp == os.path.join(root, "tmp")  # workers' temp files live with the session
    assert not os.path.exists(root), os.listdir(root)
    assert not _procs_under(root)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_clean_exit_ends_what_outlived_the_shutdown(short_tmp):
    proc = _driver("straggler", short_tmp)
    session, _, _ = _ready(proc)
    pid = int(next(proc.stdout).split()[1])
    straggler = psutil.Process(pid)
    try:
        assert proc.wait(timeout=120) == 0
        assert not (straggler.is_running() and straggler.status() != psutil.STATUS_ZOMBIE)
        assert not os.path.exists(os.path.dirname(session))
    finally:
        if straggler.is_running():
            straggler.kill()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sigkilled_driver_leftovers_are_swept_by_the_next_start(short_tmp):
    proc = _driver("hang", short_tmp)
    session, _, _ = _ready(proc)
    root = os.path.dirname(session)
    started = psutil.Process(proc.pid).children(recursive=True)  # everything the driver started
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # what dies with the driver has died by now
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left, "nothing outlived the driver: this test would show nothing"
    ended = sweep_orphans(short_tmp)
    assert set(ended) >= {p.pid for p in left}, [(p.pid, p.name()) for p in left]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started)
    assert not os.path.exists(root)


def test_sweep_spares_live_owners_and_foreign_directories(tmp_path):
    from dcgh_dist.ray_session import _write_owner

    mine = tmp_path / "dcgh-ray-live"
    mine.mkdir()
    _write_owner(str(mine))  # this very process: alive
    foreign = tmp_path / "dcgh-ray-foreign"  # no owner file: not made by ray_session
    foreign.mkdir()
    assert sweep_orphans(str(tmp_path)) == []
    assert mine.exists() and foreign.exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_workers_query_their_own_cluster_with_another_one_running(short_tmp, ray_cluster):
    """Ray Train's placement-group cleaner asks the State API, from a worker, whether the
    controller lives. With a second local cluster on the machine an unguided lookup finds
    "multiple active Ray instances" or the other one, and a running job's placement group was
    removed. Every worker of a session is pointed at its own API server."""
    import ray

    other = _driver("hang", short_tmp)  # a second local cluster, with its own dashboard
    try:
        _ready(other)

        @ray.remote(num_cpus=0)
        class Probe:
            def ping(self) -> int:
                return 1

        probe = Probe.remote()
        ray.get(probe.ping.remote())

        @ray.remote(num_cpus=0)
        def state_of(actor_id: str):
            from ray.util.state import get_actor

            found = get_actor(actor_id, timeout=30)
            return found.state if found else None

        assert ray.get(state_of.remote(probe._actor_id.hex()), timeout=120) == "ALIVE"
    finally:
        other.send_signal(signal.SIGINT)  # its ray_session shuts its cluster down
        try:
            other.wait(timeout=120)
        except subprocess.TimeoutExpired:
            other.kill()
            other.wait()
            sweep_orphans(short_tmp)
