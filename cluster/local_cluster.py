"""A multi-node Ray cluster on one machine, on 127.0.0.1 only, for trying cluster workflows
(``ray job submit``, several nodes, node failures) without a real cluster.

    python cluster/local_cluster.py start --workers 2 --cpus-per-node 2   # prints the addresses
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --dataset demo
    python cluster/local_cluster.py status
    python cluster/local_cluster.py stop                                   # stops exactly what start started

Why not ``ray start`` for the worker nodes: Ray refuses a second node unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``, and with that set it replaces 127.0.0.1 by the machine's
network address, so nodes would talk over the network interface. Instead a small daemon holds a
``ray.cluster_utils.Cluster`` (Ray's own multi-node-on-one-host harness): a head and N worker
nodes, each a real raylet with its own object store, every socket on loopback. ``start`` records
the daemon's PID and every process it spawned in ``<state-dir>/cluster.json``; ``stop`` ends that
daemon (which shuts the nodes down) and then any recorded process still alive, and nothing else:
unlike ``ray stop``, other Ray clusters on the machine are left alone.

Every API of the cluster (dashboard, job submission, GCS) requires Ray's token authentication:
loopback is not a security boundary on a shared machine, and an open job API runs any command
for anyone who can reach the port. ``start`` writes a random token to ``<state-dir>/auth_token``
(mode 0600) and prints the two variables a client sets to use it::

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.cache/dcgh_dist/local_cluster/auth_token
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dcgh_dist.ray_session import free_port  # noqa: E402  (after the repository is on sys.path)

DEFAULT_STATE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dcgh_dist", "local_cluster")


def _state_file(state_dir: str) -> str:
    return os.path.join(state_dir, "cluster.json")


def _read_state(state_dir: str) -> dict | None:
    try:
        with open(_state_file(state_dir)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _token_file(state_dir: str) -> str:
    return os.path.join(state_dir, "auth_token")


def ensure_auth_token(state_dir: str) -> str:
    """The cluster's token file, created with a fresh random token (owner-only) if absent."""
    path = _token_file(state_dir)
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def client_env(state: dict) -> dict[str, str]:
    """What a client (``ray job submit``, ``ray.init(address=...)``) needs to talk to the cluster."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["auth_token_path"]}


def _alive(pid: int, create_time: float | None = None) -> bool:
    """Is this process still running? With ``create_time``, only if it is the *same* process:
    on a busy machine a recorded PID can be reused by an unrelated one, which stop must spare."""
    import psutil

    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 1e-3:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def recorded_processes(state: dict) -> list[tuple[int, float]]:
    """(pid, create_time) of the daemon and of every process it had spawned."""
    return [tuple(p) for p in state["procs"]]


def serve(args: argparse.Namespace) -> None:
    """The daemon: hold the cluster until SIGTERM/SIGINT, then shut it down."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, before ray imports
    import psutil
    from ray.cluster_utils import Cluster

    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": args.cpus_per_node,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": args.dashboard_port,
            # Every node runs a dashboard agent; on one host they must not share the default
            # port, or the head's agent may lose the race and jobs can't be submitted.
            "dashboard_agent_listen_port": free_port(),
        },
    )
    for _ in range(args.workers):
        cluster.add_node(num_cpus=args.cpus_per_node, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    me = psutil.Process()
    state = {
        "pid": os.getpid(),
        "address": cluster.address,
        "dashboard": f"http://127.0.0.1:{args.dashboard_port}",
        "nodes": 1 + args.workers,
        "cpus_per_node": args.cpus_per_node,
        "auth_token_path": os.environ["RAY_AUTH_TOKEN_PATH"],
        "procs": [[p.pid, p.create_time()] for p in [me, *me.children(recursive=True)]],
    }
    import pyarrow.fs as pafs

    from dcgh_dist.storage import write_text_atomic

    # start() polls for this file: it must appear whole
    write_text_atomic(pafs.LocalFileSystem(), os.path.abspath(_state_file(args.state_dir)), json.dumps(state, indent=2))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        cluster.shutdown()


def start(args: argparse.Namespace) -> dict:
    os.makedirs(args.state_dir, exist_ok=True)
    old = _read_state(args.state_dir)
    if old and _alive(*recorded_processes(old)[0]):
        raise SystemExit(f"a cluster started from {args.state_dir} is already running: {old['dashboard']}")
    if old:
        os.remove(_state_file(args.state_dir))
    if not args.dashboard_port:
        args.dashboard_port = free_port()
    token_path = ensure_auth_token(args.state_dir)
    log = open(os.path.join(args.state_dir, "cluster.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "_serve", "--state-dir", args.state_dir,
         "--workers", str(args.workers), "--cpus-per-node", str(args.cpus_per_node),
         "--dashboard-port", str(args.dashboard_port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # outlives this command
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
             "RAY_AUTH_TOKEN_PATH": token_path},
    )
    deadline = time.time() + args.timeout
    while (state := _read_state(args.state_dir)) is None:
        if proc.poll() is not None:
            raise SystemExit(f"the cluster failed to start; see {log.name}")
        if time.time() > deadline:
            proc.terminate()
            raise SystemExit(f"the cluster did not start in {args.timeout}s; see {log.name}")
        time.sleep(0.5)
    print(json.dumps(state, indent=2))
    print("\n(right after start the job agent may need a few seconds: if ray job submit answers "
          "'No available agent', submit again)")
    exports = " ".join(f"{k}={v}" for k, v in client_env(state).items())
    print(f"\nsubmit jobs with (the token authenticates every client):\n  export {exports}\n"
          f"  ray job submit --address {state['dashboard']} --working-dir . -- "
          "python jobs/train.py --dataset demo\nstop with:\n  python cluster/local_cluster.py stop"
          + (f" --state-dir {args.state_dir}" if args.state_dir != DEFAULT_STATE_DIR else ""))
    return state


def stop(args: argparse.Namespace) -> int:
    """Stop the daemon and every process it recorded; returns how many had to be killed."""
    import psutil

    from dcgh_dist.ray_session import kill_and_wait

    state = _read_state(args.state_dir)
    if state is None:
        print(f"no cluster recorded in {args.state_dir}")
        return 0
    daemon = recorded_processes(state)[0]
    if _alive(*daemon):
        os.kill(daemon[0], signal.SIGTERM)
        deadline = time.time() + args.timeout
        while _alive(*daemon) and time.time() < deadline:
            time.sleep(0.5)
    leftovers = []
    for pid, created in recorded_processes(state):
        if _alive(pid, created):
            with contextlib.suppress(psutil.Error):
                leftovers.append(psutil.Process(pid))
    _, still = kill_and_wait(leftovers, timeout=30)
    if still:
        raise SystemExit(f"could not stop processes {[p.pid for p in still]}")
    killed = len(leftovers)
    os.remove(_state_file(args.state_dir))
    print(f"stopped the cluster at {state['address']}" + (f" ({killed} processes killed)" if killed else ""))
    return killed


def status(args: argparse.Namespace) -> dict | None:
    state = _read_state(args.state_dir)
    if state is None or not _alive(*recorded_processes(state)[0]):
        print("not running")
        return None
    print(json.dumps(state, indent=2))
    return state


def main(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status", "_serve"])
    p.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    p.add_argument("--cpus-per-node", type=int, default=2)
    p.add_argument("--dashboard-port", type=int, default=8265, help="0 = any free port")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args(argv)
    return {"start": start, "stop": stop, "status": status, "_serve": serve}[args.command](args)


if __name__ == "__main__":
    main()
