"""The Serve app under ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, in a process (and Ray cluster) of its
own: Ray Serve reads that setting when each of its processes imports it, so it cannot be switched
on inside the test session's cluster. Run by ``tests/test_serve.py``; prints one JSON object of
what it saw (answers by endpoint, the bad-input answer, every listening socket) for the test to
judge.

    python tests/direct_ingress_child.py '<json: {"port": ..., "args": {...AppArgs}, "texts": [...], "k": ...}>'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    import requests
    from ray import serve

    from dcgh_dist.ray_session import ray_session
    from serve.app import AppArgs, build_app
    from serve.targets import http_targets
    from sockets import listening_sockets  # tests/, this script's own folder

    spec = json.loads(argv[0])
    proxy = f"http://127.0.0.1:{spec['port']}"
    out: dict = {"proxy": proxy}
    with ray_session(num_cpus=4):
        serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})
        serve.run(build_app(AppArgs(**spec["args"])), name="dcgh", route_prefix="/")
        out["targets"] = http_targets("dcgh")
        out["answers"] = {
            url: [requests.post(f"{url}/search", json={"text": t, "k": spec["k"]}, timeout=60).json() for t in spec["texts"]]
            for url in [proxy, *out["targets"]]}
        for url in out["targets"]:
            bad = requests.post(f"{url}/search", json={"text": "x", "k": 0}, timeout=60)
            after = requests.get(f"{url}/healthz", timeout=60)
            out.setdefault("bad_k", []).append([bad.status_code, bad.json(), after.status_code])
        out["listening"] = listening_sockets()
        serve.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
