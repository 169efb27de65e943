"""Run the RayCluster's autoscaling on this machine: what KubeRay hands Ray's autoscaler, with
Ray's simulated multi-node provider in place of pods.

    python cluster/k8s/simulate_autoscaling.py overlays/dev       # the demo job; prints the timeline

KubeRay's autoscaler sidecar turns the RayCluster into an autoscaling configuration with Ray's own
code (``ray.autoscaler._private.kuberay.autoscaling_config``): one node type per worker group,
its Ray resources from rayStartParams and the container limits, ``min_workers``/``max_workers``
from minReplicas/maxReplicas, ``idle_timeout_minutes`` from idleTimeoutSeconds, the upscaling
speed from upscalingMode. ``autoscaling_config`` runs that same function on the rendered
manifest and swaps only the provider: instead of creating pods, Ray's fake multi-node provider
starts a raylet on this machine for each node the autoscaler (v2, as ``autoscalerOptions.version``
asks) launches, and kills it when the autoscaler terminates the node.

Differences from a pod, all on this machine's side: a node's object store is sized for one
shared machine (30% of the pod's memory, as Ray picks inside a pod, but at most
``object_store_cap`` bytes); the head's logical CPUs stay 0, as in the manifest. A node's CPUs
are logical, so two 2-CPU nodes can share two real cores.

``SimulatedCluster`` starts the head with ``ray start --head --block`` under a temporary root
of its own (every socket on 127.0.0.1, Ray token authentication on with a token in that root)
and stops only the processes it started: ``ray start --block`` and its children, and every
process that names the root (as ``dcgh_dist.ray_session`` finds them). It never runs
``ray stop``, which would end every Ray cluster on the machine. (Ray's own
``ray.cluster_utils.AutoscalingCluster`` does both, and reads a file the pip wheel lacks.)
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

K8S_DIR = Path(__file__).resolve().parent
REPO = K8S_DIR.parents[1]
sys.path.insert(0, str(REPO))

from dcgh_dist.ray_session import free_port  # noqa: E402  (after the repository is on sys.path)

HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head node type
KUBERAY_HEAD_TYPE = "headgroup"  # KubeRay's
# KubeRay's autoscaler sidecar runs with Ray's default update interval.
UPDATE_INTERVAL_S = 5
PROVIDER = f"{Path(__file__).stem}.MemoryFakeMultiNodeProvider"


def kuberay_autoscaling_config(ray_cluster: dict[str, Any]) -> dict[str, Any]:
    """What KubeRay's autoscaler derives from this RayCluster manifest (Ray's own function)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = copy.deepcopy(ray_cluster)
    cr.setdefault("metadata", {}).setdefault("namespace", "default")
    return _derive_autoscaling_config_from_ray_cr(cr)


def autoscaling_config(ray_cluster: dict[str, Any], gcs_address: str,
                       object_store_cap: int = 1 << 30) -> dict[str, Any]:
    """The KubeRay-derived configuration with the simulated provider in place of KubeRay's."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    config = kuberay_autoscaling_config(ray_cluster)
    kuberay_provider = config["provider"]
    config["provider"] = {
        # "external" + module: Ray's "fake_multinode" type reads an example.yaml that the pip
        # wheel does not ship, for defaults this configuration does not need.
        "type": "external",
        "module": PROVIDER,
        "gcs_address": gcs_address,
        "head_node_id": FAKE_HEAD_NODE_ID,
        "launch_multiple": True,
        **{k: v for k, v in kuberay_provider.items() if k not in ("type", "namespace")},
    }
    types = config["available_node_types"]
    types[HEAD_TYPE] = types.pop(KUBERAY_HEAD_TYPE)
    config["head_node_type"] = HEAD_TYPE
    for node_type in types.values():
        res = node_type["resources"]
        if "memory" in res:
            res["object_store_memory"] = min(int(0.3 * res["memory"]), object_store_cap)
    return config


def _make_provider_class():
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    class MemoryFakeMultiNodeProvider(FakeMultiNodeProvider):
        """Ray's fake multi-node provider, which passes every resource but ``memory`` on to the
        raylet it starts (Ray refuses ``memory`` as a custom resource): this one gives the node
        the memory of its node type, like a pod whose limit Ray reads."""

        def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
            import ray
            from ray._common.network_utils import build_address
            from ray._private import ray_constants
            from ray.autoscaler.tags import (
                NODE_KIND_WORKER,
                STATUS_UP_TO_DATE,
                TAG_RAY_NODE_KIND,
                TAG_RAY_NODE_NAME,
                TAG_RAY_NODE_STATUS,
                TAG_RAY_USER_NODE_TYPE,
            )

            resources = copy.deepcopy(resources)
            with self.lock:
                node_type = tags[TAG_RAY_USER_NODE_TYPE]
                next_id = self._next_hex_node_id()
                gcs = self._gcs_address or build_address(ray._private.services.get_node_ip_address(), 6379)
                ray_params = ray._private.parameter.RayParams(
                    min_worker_port=0, max_worker_port=0, dashboard_port=None, dashboard_agent_listen_port=0,
                    num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                    memory=resources.pop("memory", None),
                    object_store_memory=resources.pop("object_store_memory", None),
                    resources=resources, labels=labels, redis_address=gcs, gcs_address=gcs,
                    env_vars={
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id,
                        "RAY_CLOUD_INSTANCE_ID": next_id,
                        "RAY_NODE_TYPE_NAME": node_type,
                        ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                        ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                    },
                )
                node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False)
                all_tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                            TAG_RAY_NODE_NAME: next_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}
                all_tags.update(tags)
                self._nodes[next_id] = {"tags": all_tags, "node": node}

    return MemoryFakeMultiNodeProvider


def __getattr__(name: str):
    # The monitor process imports the provider by name; ray is only imported then.
    if name == "MemoryFakeMultiNodeProvider":
        return _make_provider_class()
    raise AttributeError(name)


class SimulatedCluster:
    """A head started with ``ray start --head --block --autoscaling-config`` on loopback."""

    def __init__(self, ray_cluster: dict[str, Any], root: str | None = None):
        self.ray_cluster = ray_cluster
        # short: Ray's socket paths live under it and Unix sockets allow ~107 characters
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="dcgh-as-")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token_path = os.path.join(self.root, "auth_token")
        self.config = autoscaling_config(ray_cluster, f"127.0.0.1:{self.gcs_port}")
        self.proc: subprocess.Popen | None = None
        self._procs: dict[int, Any] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def cluster_env(self) -> dict[str, str]:
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        return {
            **env,
            # job entrypoints say "python": this interpreter, with the project installed
            "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
            "PYTHONPATH": os.pathsep.join([str(K8S_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node on 127.0.0.1
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            "AUTOSCALER_UPDATE_INTERVAL_S": str(UPDATE_INTERVAL_S),
            "AUTOSCALER_METRIC_PORT": str(free_port()),
            **self.client_env(),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }

    def client_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def start(self, timeout: float = 120) -> SimulatedCluster:
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        config_path = os.path.join(self.root, "autoscaling.json")
        with open(config_path, "w") as f:
            json.dump(self.config, f, indent=2)
        head = self.config["available_node_types"][HEAD_TYPE]["resources"]
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--port={self.gcs_port}", f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}",
               f"--temp-dir={self.root}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--autoscaling-config={config_path}"]
        if "memory" in head:
            cmd.append(f"--memory={head['memory']}")
        if "object_store_memory" in head:
            cmd.append(f"--object-store-memory={head['object_store_memory']}")
        self._log = open(os.path.join(self.root, "head.log"), "w")
        self.proc = subprocess.Popen(cmd, env=self.cluster_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.root)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if any(n["is_head"] for n in self.nodes()):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the head did not come up in {timeout}s; see {self._log.name}")
            time.sleep(1)
        self._remember()
        return self

    def _remember(self) -> None:
        """Record every process of this cluster (by PID and start time) so far."""
        import psutil

        from dcgh_dist.ray_session import processes_of

        found = []
        try:
            head = psutil.Process(self.proc.pid)
            found = [head, *head.children(recursive=True)]
        except psutil.Error:
            pass
        # this process (which holds head.log open under the root) and its parents are not ours
        me = psutil.Process()
        spare = {me.pid, *(p.pid for p in me.parents())}
        for p in found + processes_of(self.root):
            if p.pid in spare:
                continue
            try:
                self._procs.setdefault((p.pid, p.create_time()), p)
            except psutil.Error:
                pass

    def processes(self) -> list:
        self._remember()
        return [p for p in self._procs.values() if p.is_running()]

    def stop(self, timeout: float = 20) -> None:
        """End every process this cluster started, and nothing else."""
        import psutil

        from dcgh_dist.ray_session import kill_and_wait

        if self.proc is None:
            return
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        _, still = kill_and_wait(alive, timeout=30)
        self._log.close()
        if still:
            raise RuntimeError(f"could not stop {[p.pid for p in still]}; logs kept in {self.root}")
        self.proc = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SimulatedCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- observing ------------------------------------------------------------------------------

    def _get(self, path: str) -> Any:
        with open(self.token_path) as f:
            token = f.read().strip()
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the GCS knows: id, is_head, state, resources_total."""
        data = self._get("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]
        return [{"id": n["node_id"], "is_head": n["is_head_node"], "state": n["state"],
                 "resources": n["resources_total"]} for n in data]

    def alive_workers(self) -> int:
        return sum(1 for n in self.nodes() if n["state"] == "ALIVE" and not n["is_head"])

    def job_status(self, submission_id: str) -> dict[str, Any]:
        return self._get(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        return self._get(f"/api/jobs/{submission_id}/logs").get("logs", "")

    def submit(self, entrypoint: list[str], working_dir: str, env_vars: dict[str, str] | None = None) -> str:
        """``ray job submit --no-wait`` (the CLI a user runs), authenticated with the token."""
        submission_id = f"dcgh-sim-{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--no-wait",
               "--address", self.dashboard, "--submission-id", submission_id, "--working-dir", working_dir,
               "--runtime-env-json", json.dumps({"env_vars": env_vars or {}}), "--", *entrypoint]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        for _ in range(10):
            out = subprocess.run(cmd, env={**env, **self.client_env()}, capture_output=True, text=True, timeout=300,
                                 check=False)
            if out.returncode == 0:
                return submission_id
            if "No available agent" not in out.stdout + out.stderr:
                break
            time.sleep(2)  # the head's job agent may not have registered yet
        raise RuntimeError(f"ray job submit failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")


def demo_entrypoint(output_dir: str, data_root: str) -> list[str]:
    """The scaled-down training job: the demo, two workers of one CPU."""
    return ["python", "jobs/train.py", "--dataset", "demo", "--num-workers", "2", "--epochs", "1",
            "--batch-size", "32", "--bits", "16", "--skip-baseline", "--output-dir", output_dir,
            "model.clip_preset=tiny", "train.cpus_per_worker=1", "data.demo_size=600",
            f"data.data_root={data_root}"]


def measure(cluster: SimulatedCluster, entrypoint: list[str], *, group: str, job_timeout: float = 420,
            down_timeout: float | None = None, poll_s: float = 1.0,
            on_sample: Callable[[float, int], None] | None = None) -> dict[str, Any]:
    """Submit ``entrypoint`` and follow the group's size until it is back at its minimum.

    Returns the timeline: seconds from submission to the first worker, to the peak, the job's
    end, and from the job's end to the group's return to minReplicas; the samples; the job's
    status (and its logs' tail when it did not succeed)."""
    node_type = cluster.config["available_node_types"][group]
    idle_s = 60 * cluster.config["idle_timeout_minutes"]
    idle_s = node_type.get("idle_timeout_s", idle_s)
    down_timeout = down_timeout or idle_s + 120
    minimum = node_type["min_workers"]
    start_workers = cluster.alive_workers()
    t0 = time.time()
    job_id = cluster.submit(entrypoint, str(REPO), {"HF_HUB_OFFLINE": "1"})
    samples: list[tuple[float, int]] = []
    first_up = peak_at = job_end = down_at = None
    peak = start_workers
    status = None

    def sample() -> int:
        nonlocal first_up, peak, peak_at
        n = cluster.alive_workers()
        t = round(time.time() - t0, 1)
        samples.append((t, n))
        if on_sample:
            on_sample(t, n)
        if n > minimum and first_up is None:
            first_up = t
        if n > peak:
            peak, peak_at = n, t
        return n

    while job_end is None:
        sample()
        status = cluster.job_status(job_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            job_end = round(time.time() - t0, 1)
        elif time.time() - t0 > job_timeout:
            raise TimeoutError(f"job {job_id} still {status} after {job_timeout}s: {cluster.job_logs(job_id)[-3000:]}")
        else:
            time.sleep(poll_s)
    while True:
        n = sample()
        if n <= minimum:
            down_at = round(time.time() - t0, 1)
            break
        if time.time() - t0 - job_end > down_timeout:
            break
        time.sleep(poll_s)
    return {
        "job_id": job_id, "status": status, "logs_tail": "" if status == "SUCCEEDED" else cluster.job_logs(job_id)[-5000:],
        "group": group, "min_workers": minimum, "max_workers": node_type["max_workers"],
        "node_resources": node_type["resources"], "idle_timeout_s": idle_s,
        "workers_at_submit": start_workers, "peak_workers": peak,
        "first_worker_s": first_up, "peak_s": peak_at, "job_end_s": job_end, "back_to_min_s": down_at,
        "scale_down_after_job_s": None if down_at is None else round(down_at - job_end, 1),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from render import render

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kustomization", nargs="?", default="overlays/dev", help="relative to cluster/k8s/")
    p.add_argument("--group", default="cpu")
    args = p.parse_args(argv)
    [cr] = [d for d in render(args.kustomization) if d["kind"] == "RayCluster"]
    work = tempfile.mkdtemp(prefix="dcgh-as-work-")
    with SimulatedCluster(cr) as cluster:
        print(f"simulated {cr['metadata']['name']} ({args.kustomization}): dashboard {cluster.dashboard}", flush=True)
        timeline = measure(cluster, demo_entrypoint(os.path.join(work, "run"), os.path.join(work, "data")),
                           group=args.group, on_sample=lambda t, n: print(f"{t:7.1f}s  {n} {args.group} node(s)",
                                                                          flush=True))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in timeline.items() if k != "samples"}, indent=2))
    return 0 if timeline["status"] == "SUCCEEDED" and timeline["back_to_min_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
