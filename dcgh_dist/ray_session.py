"""Joining a Ray cluster, or starting a local one: the one place every job does it.

    with ray_session(address, num_cpus=4, dashboard=True):
        ...  # Ray Train / Data / tasks

* ``address`` (or ``RAY_ADDRESS``) set: join that cluster. Inside ``ray job submit`` this is how a
  job runs; the job's runtime env applies (pass env vars with ``--runtime-env-json``), and on exit
  nothing is shut down.
* Otherwise a new local cluster, every socket on 127.0.0.1 and with Ray's token authentication
  (Ray's default for clusters that ``ray.init`` starts since 2.59: the mode is read when ray is
  imported, so it cannot be switched on here; tests/test_ray_session.py checks it is on). It gets ``num_cpus`` logical CPUs, default max(4, cores): with as many logical
  CPUs as cores, training workers holding every CPU starve the Ray Data tasks that feed them.
  Its session directory (logs, sockets, spilled objects) and its workers' temporary files live
  under one directory made for the run (``$TMPDIR/dcgh-ray-*``); on a clean exit the cluster is
  shut down and that directory removed, on an error it is kept and named in the log.
* A driver killed with SIGKILL cleans up nothing, and Ray's dashboard and runtime-env agents then
  outlive it. So each run directory names its owner (PID and start time), and the next start
  ends the processes of any run directory whose owner is gone (found by that directory in their
  command line: only clusters this project started) and removes the directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Iterator

logger = logging.getLogger(__name__)

# Every worker: no model hub, no tokenizer thread pools fighting Ray's workers for cores.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    temp_dir: str | None = None,
    dashboard: bool = False,
) -> Iterator[bool]:
    """Yields True if this call started the cluster (and so will stop it)."""
    # Read when ray is first imported: set before, in case this is that import.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        yield False
        return
    sweep_orphans()
    own_root = temp_dir is None
    root = temp_dir or tempfile.mkdtemp(prefix=ROOT_PREFIX)
    if own_root:
        # Only a directory made here may be swept: a --ray-temp-dir the user gave is theirs.
        _write_owner(root)
    worker_tmp = os.path.join(root, "tmp")
    os.makedirs(worker_tmp, exist_ok=True)
    env = {**WORKER_ENV, "TMPDIR": worker_tmp}
    dashboard_port = None
    if dashboard:
        # Ray Train's placement-group cleaner asks the State API whether the controller lives;
        # left to find the API server itself, it picks any Ray instance on the machine, and with
        # two local clusters (tests, benchmarks, a second job) it found the controller "dead" in
        # the other one and removed a running job's placement group. So the port is chosen here
        # and every worker of this cluster is told where its own API server is.
        dashboard_port = free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ray.init(
        # "local": always a new cluster. Without it, ray.init() joins whatever `ray start` left
        # registered in /tmp/ray (someone else's cluster on a shared machine).
        address="local",
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        # Ray Train's controller watches its actors through the State API, which the dashboard
        # serves; without it the logs fill with "State API may be temporarily unavailable".
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        **({"dashboard_port": dashboard_port} if dashboard_port else {}),
        # Loopback only. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does the same but is read when ray is
        # first imported, which a library cannot guarantee to precede.
        _node_ip_address="127.0.0.1",
        _temp_dir=root,
        # TMPDIR: what workers leave behind when they are killed (multiprocessing's pymp-*
        # directories, torch extension builds) goes with the session, not into /tmp.
        runtime_env={"env_vars": env},
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    ok = False
    try:
        yield True
        ok = True
    finally:
        ray.shutdown()
        if own_root:
            end_leftovers(root)
        if ok and own_root:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            logger.warning("Ray's logs of this run are kept in %s", root)


def config_session(ray_cfg, *, dashboard: bool = False):
    """:func:`ray_session` for a config tree's ``ray`` section (a ``RayConfig``): the one way a job
    turns ``ray.address`` / ``ray.num_cpus`` / ``ray.temp_dir`` into its cluster."""
    return ray_session(ray_cfg.address, num_cpus=ray_cfg.num_cpus, temp_dir=ray_cfg.temp_dir, dashboard=dashboard)


def node_cores() -> int:
    """Cores this process's node gives to Ray work: the fewer of the node's CPU resource (a
    KubeRay pod's CPU limit; may exceed the cores on a laptop, where Ray is given more logical
    CPUs than it has) and this process's affinity mask. Call inside a Ray task or actor: Ray sets
    OMP_NUM_THREADS to its CPU request, a scheduling unit rather than a core count."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node_cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node_id), 1)
    return max(1, min(int(node_cpus), len(os.sched_getaffinity(0))))


@contextlib.contextmanager
def env_default(name: str, value: str) -> Iterator[str]:
    """``os.environ[name] = value`` for the duration of the block, unless the user exported
    ``name`` (then their value stands); yields the value in effect. For Ray settings read from
    the environment by the process or actor a call starts (Ray Data's footer readers, Ray
    Train's controller), which a library must not leave behind for the rest of the program."""
    if name in os.environ:
        yield os.environ[name]
        return
    os.environ[name] = value
    try:
        yield value
    finally:
        os.environ.pop(name, None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server about to start)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ROOT_PREFIX = "dcgh-ray-"
OWNER_FILE = "owner.json"


def _write_owner(root: str) -> None:
    import psutil

    me = psutil.Process()
    with open(os.path.join(root, OWNER_FILE), "w") as f:
        json.dump({"pid": me.pid, "create_time": me.create_time()}, f)


def _owner_alive(root: str) -> bool:
    import psutil

    try:
        with open(os.path.join(root, OWNER_FILE)) as f:
            owner = json.load(f)
        return abs(psutil.Process(owner["pid"]).create_time() - owner["create_time"]) < 1e-3
    except FileNotFoundError:
        return True  # not (yet) a run directory of ours: leave it alone
    except (psutil.Error, OSError, ValueError, KeyError, TypeError):
        return False


def processes_of(root: str) -> list:
    """This user's processes of the Ray run in ``root``: it is in their command line (GCS, raylet,
    dashboard), or they hold a file under it open (the agents, whose process titles Ray rewrites
    to ``ray::DashboardAgent``, keep their logs open there)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "uids"]):
        try:
            if p.info["uids"] is not None and p.info["uids"].real != os.getuid():
                continue
            if any(root in arg for arg in p.info["cmdline"] or ()) or any(
                    f.path.startswith(root + os.sep) for f in p.open_files()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def kill_and_wait(procs: list, timeout: float = 10.0) -> tuple[list, list]:
    """SIGKILL each ``psutil.Process`` (one that already left is no error) and wait up to
    ``timeout`` s for them, as SIGKILL is asynchronous: (gone, alive)."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return psutil.wait_procs(procs, timeout=timeout)


def end_leftovers(root: str, grace_s: float = 5.0) -> list[int]:
    """End the processes of the Ray run in ``root`` that outlived ``ray.shutdown()``; returns
    their PIDs. Workers normally exit once their raylet is gone, so each gets ``grace_s`` first;
    but one was seen still running 40 minutes on (a Ray Train controller whose parent was init),
    and once the run directory is removed, ``sweep_orphans`` can no longer find it. This process
    and its ancestors are never ended (the driver may hold its own logs under ``root``)."""
    import psutil

    me = psutil.Process()
    spare = {me.pid, *(p.pid for p in me.parents())}
    procs = [p for p in processes_of(root) if p.pid not in spare]
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    kill_and_wait(alive)
    if alive:
        logger.warning("ended %d process(es) of the Ray run in %s that outlived ray.shutdown(): %s",
                       len(alive), root, [p.pid for p in alive])
    return [p.pid for p in alive]


def sweep_orphans(tmp: str | None = None) -> list[int]:
    """End what clusters of dead owners left running and remove their run directories.

    Returns the PIDs it ended. Only run directories made by ``ray_session`` (``dcgh-ray-*`` with
    an owner file), belonging to this user, whose owner process no longer exists are touched, and
    only this user's processes in them are ended: another user's runs in a shared /tmp are theirs."""
    tmp = tmp or tempfile.gettempdir()
    uid = os.getuid()
    dead = [os.path.join(tmp, d) for d in os.listdir(tmp)
            if d.startswith(ROOT_PREFIX) and os.stat(os.path.join(tmp, d)).st_uid == uid
            and not _owner_alive(os.path.join(tmp, d))]
    ended: list[int] = []
    for root in dead:
        gone, alive = kill_and_wait(processes_of(root))
        ended += [p.pid for p in gone]
        if alive:
            logger.warning("could not end %s, left over from a Ray run in %s", [p.pid for p in alive], root)
            continue
        logger.info("ended %d process(es) left by a killed run; removing %s", len(gone), root)
        shutil.rmtree(root, ignore_errors=True)
    return ended


def quiet_progress() -> None:
    """Ray Data's overall progress only (a bar on a terminal, a log line every few seconds
    otherwise); per-operator bars flood non-interactive logs (ray job logs, CI)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = False
    ctx.enable_progress_bars = sys.stderr.isatty()
