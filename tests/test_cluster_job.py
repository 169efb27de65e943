"""``ray job submit`` of jobs/train.py to a two-node local cluster started by cluster/local_cluster.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "cluster"))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_job_submit_to_local_multinode_cluster(tmp_path, demo_small):
    import local_cluster

    state_dir = str(tmp_path / "cluster")
    state = local_cluster.main(["start", "--workers", "1", "--cpus-per-node", "2",
                                "--dashboard-port", "0", "--state-dir", state_dir])
    try:
        assert state["nodes"] == 2 and state["address"].startswith("127.0.0.1:")
        # every socket of the cluster listens on loopback
        pids = {pid for pid, _ in local_cluster.recorded_processes(state)}
        listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids}
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening

        # nobody in without the token: the job API refuses, and runs nothing
        marker = tmp_path / "marker"
        req = urllib.request.Request(
            f"{state['dashboard']}/api/jobs/", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"entrypoint": f"touch {marker}"}).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code in (401, 403)
        assert oct(os.stat(state["auth_token_path"]).st_mode & 0o777) == "0o600"

        out = tmp_path / "job-out"
        # the CLI must use --address, not a test cluster; the token comes from the state dir
        env = {**os.environ, "RAY_ADDRESS": "", **local_cluster.client_env(state)}
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
            "--address", state["dashboard"], "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
            "--", "python", "jobs/train.py", "--dataset", demo_small, "--epochs", "1",
            "--num-workers", "2", "--batch-size", "32", "--bits", "16", "--skip-baseline",
            "--output-dir", str(out), "model.clip_preset=tiny", "train.cpus_per_worker=1",
        ]
        for _ in range(10):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=800)
            # right after start the head's job agent may not have registered yet
            if "No available agent" not in proc.stderr + proc.stdout:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in (proc.stdout + proc.stderr)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["history"][-1]["global_step"] == (600 // 2) // 32
        assert (out / "checkpoint" / "model.pt").exists()
        assert not marker.exists()
    finally:
        local_cluster.main(["stop", "--state-dir", state_dir])
    # stop ended exactly what start started: nothing recorded is left
    # (by PID and start time: a PID reused by an unrelated process since does not count)
    assert not any(local_cluster._alive(pid, created) for pid, created in local_cluster.recorded_processes(state))
