"""The Serve endpoint under a bounded closed-loop load, beside the same searches in-process, and
with an index replica killed under load.

    python benchmarks/bench_serve.py                       # demo index and 10M random 64-bit codes
    python benchmarks/bench_serve.py --n 2M --seconds 8 --clients 1,4 --skip-fault

For each index: N client threads send text->image queries back to back to 127.0.0.1 (nothing
else is ever a target), in rounds that alternate with the same queries through ``Encoder`` +
``ShardedIndex.search_stable`` in this process with N threads (so that a machine whose speed drifts
slows both sides alike); QPS and p50/p95/p99 latency of each side, their ratio, and its range over
the rounds.
The random index is flat, in two shards served by two ``IndexShards`` groups. The fault run kills
one group's replica under load and counts failed requests until Serve has replaced it; every
answered request is checked against the in-process result (no response may leave out a shard's
items). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Sequence

import numpy as np

from common import machine, parse_n  # benchmarks/common.py: a script's own folder is on sys.path

QUERIES = ["a red circle", "blue sky over water", "two trees and a house", "a yellow sun", "green grass"]


class Client:
    """A lean HTTP/1.1 client: one keep-alive connection per thread, JSON in and out.

    The load generator shares the machine's two cores with the server, so whatever it spends per
    request is charged to Serve: ``requests.Session`` spends ~0.6 ms a call on machine A, this
    ~0.1 ms (both against a socket that answers at once).
    Errors are raised (``OSError``, ``http.client.HTTPException``) and drop the connection; the
    next call opens a new one."""

    def __init__(self, base: str, timeout: float = 60.0):
        u = urllib.parse.urlsplit(base)
        self.host, self.port, self.prefix, self.timeout = u.hostname, u.port, u.path.rstrip("/"), timeout
        self._local = threading.local()

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        fresh = getattr(self._local, "conn", None) is None
        if fresh:
            self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn = self._local.conn
        data = None if body is None else json.dumps(body).encode()
        try:
            conn.request(method, self.prefix + path, body=data,
                         headers={"Content-Type": "application/json"} if data is not None else {})
            r = conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            self._local.conn = None
            # A kept-alive connection the server closed while idle (its keep-alive timeout) fails
            # before any answer: retry once on a new one, as browsers and urllib3 do.
            if not fresh and isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                return self.request(method, path, body)
            raise

    def search(self, text: str, k: int) -> tuple[int, dict | None]:
        status, raw = self.request("POST", "/search", {"text": text, "k": k})
        return status, json.loads(raw) if status == 200 else None


def closed_loop(fn, clients: int, seconds: float) -> dict:
    """``fn(i)`` back to back from ``clients`` threads for ``seconds``: the latencies of the
    calls that succeeded (ms), the failures, and the wall time."""
    lat: list[float] = []
    errors = [0]
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def worker(w: int):
        i = w
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            ok = fn(i)
            dt = time.perf_counter() - t0
            with lock:
                (lat.append(dt) if ok else None)
                errors[0] += 0 if ok else 1
            i += clients

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"ms": np.array(lat) * 1000, "errors": errors[0], "wall": time.perf_counter() - t0}


def summary(*runs: dict) -> dict:
    """QPS and latency quantiles over one or more ``closed_loop`` runs taken together."""
    ms = np.concatenate([r["ms"] for r in runs])
    ms = ms if len(ms) else np.array([np.nan])
    q = {f"p{p}": float(np.percentile(ms, p)) for p in (50, 95, 99)}
    return {"qps": sum(len(r["ms"]) for r in runs) / sum(r["wall"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "n": len(ms), **q}


def random_index(root: str, n: int, fingerprint: str, bits: int = 64) -> str:
    import pyarrow.parquet as pq

    from dcgh_dist.config import IndexConfig
    from dcgh_dist.index.build import build_index
    from dcgh_dist.index.codes import CODE_SHARD_OPTIONS, code_shard_meta, codes_table

    codes_dir = os.path.join(root, "codes")
    os.makedirs(codes_dir)
    rng = np.random.default_rng(0)
    meta = code_shard_meta(bits, fingerprint, "image")
    per_file = 1_000_000
    for f, s in enumerate(range(0, n, per_file)):
        e = min(n, s + per_file)
        codes = rng.integers(0, 256, (e - s, bits // 8), dtype=np.uint8)
        pq.write_table(codes_table(np.arange(s, e, dtype=np.int64), codes, meta),
                       os.path.join(codes_dir, f"part-{f:05d}.parquet"), **CODE_SHARD_OPTIONS)
    out = os.path.join(root, "index")
    build_index(codes_dir, out, IndexConfig(shard_size=-(-n // 2)), expected_fingerprint=fingerprint, use_ray=False)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="10M", help="random codes in the large index (default 10M)")
    p.add_argument("--clients", default="1,4", help="concurrent clients, comma-separated")
    p.add_argument("--seconds", type=float, default=30.0, help="per row and side (Serve, in-process)")
    p.add_argument("--rounds", type=int, default=4,
                   help="each row alternates Serve and in-process this many times (seconds/rounds each), so "
                        "that drift in the machine's speed falls on both sides; the ratio's spread is per round")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--placements", default="ingress,deployment",
                   help="encoder.placement values to measure on the large index (the demo uses the first)")
    p.add_argument("--transports", default="grpc,ray",
                   help="AppArgs.transport values to measure on the large index, with the first placement "
                        "(the other rows use the first)")
    p.add_argument("--proxy-transport", choices=("grpc", "ray"), default="grpc",
                   help="how the HTTP proxy reaches the ingress (RAY_SERVE_PROXY_USE_GRPC, set cluster-wide "
                        "as cluster/k8s does); default grpc")
    p.add_argument("--ray-serve", choices=("default", "throughput-optimized"), default="default",
                   help="throughput-optimized: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for the cluster (direct ingress: "
                        "the Frontend replica also serves HTTP on a port of its own); each row is then measured "
                        "through the proxy and direct to the replica (docs/SERVE.md, 'Latency')")
    p.add_argument("--skip-fault", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Read by every Serve proxy when it starts: set before this script starts Ray, as the
    # KubeRay cluster sets it in every container.
    os.environ["RAY_SERVE_PROXY_USE_GRPC"] = "1" if args.proxy_transport == "grpc" else "0"
    if args.ray_serve == "throughput-optimized":
        # Read by each Serve process as it imports Serve: set before Ray starts. The draining
        # period lets an external load balancer notice a replica leaving; none is in front here,
        # and each redeploy would wait it out (30 s).
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import torch
    from ray import serve

    from dcgh_dist.config import Config, EncodeConfig, IndexConfig, ModelConfig
    from dcgh_dist.data.demo import ensure_demo_dataset
    from dcgh_dist.data.format import read_dataset_info
    from dcgh_dist.encoding import run_encode
    from dcgh_dist.index import ShardedIndex
    from dcgh_dist.index.build import build_index
    from dcgh_dist.models.checkpoint import read_meta, save_untrained
    from dcgh_dist.models.encoder import Encoder
    from dcgh_dist.ray_session import ray_session
    from serve.app import AppArgs, build_app

    work = tempfile.mkdtemp(prefix="bench-serve-")
    clients = [int(c) for c in args.clients.split(",")]
    rows, fault, floors, threads = [], None, [], None
    try:
        with ray_session(num_cpus=4):
            demo = ensure_demo_dataset(2000, 0, os.path.join(work, "data"))
            ckpt = save_untrained(os.path.join(work, "ckpt"), Config(model=ModelConfig(clip_preset="tiny", bits=64)),
                                  read_dataset_info(demo))
            fp = read_meta(ckpt).fingerprint
            run_encode(ckpt, demo, os.path.join(work, "codes"), ("image",), EncodeConfig(splits=("train", "val", "db")))
            demo_index = os.path.join(work, "demo-index")
            build_index(os.path.join(work, "codes", "image"), demo_index, IndexConfig(), expected_fingerprint=fp,
                        use_ray=False)
            big = random_index(os.path.join(work, "random"), parse_n(args.n), fp)
            enc = Encoder.from_checkpoint(ckpt, device="cpu")
            qcodes = enc.encode_texts(QUERIES).codes
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base = f"http://127.0.0.1:{port}"
            placements, transports = args.placements.split(","), args.transports.split(",")
            big_label = f"random {args.n} x 64 bits (2 shards, 2 groups)"
            runs = [("demo (3,600 items, 1 shard)", demo_index, demo, placements[0], transports[0])]
            runs += [(big_label, big, None, p, transports[0]) for p in placements]
            runs += [(big_label, big, None, placements[0], t) for t in transports[1:]]
            for label, index_uri, dataset, placement, transport in runs:
                zero = {"num_cpus": 0}
                encoder = {"placement": placement, **(zero if placement == "deployment" else {})}
                serve.run(build_app(AppArgs(checkpoint=ckpt, indexes={"image": index_uri}, dataset=dataset,
                                            encoder=encoder, index=zero, metadata=zero, frontend=zero,
                                            transport=transport)),
                          name="dcgh", route_prefix="/")
                label = f"{label}, encoder in {placement}, {transport}"
                # Through the proxy; and under direct ingress, also straight to the Frontend replica.
                endpoints = {"proxy": base}
                if args.ray_serve == "throughput-optimized":
                    endpoints["direct"] = direct_url(base)
                index = ShardedIndex.open(index_uri)
                threads = (index.threads, torch.get_num_threads())
                expected = {q: index.search_stable(qcodes[i:i + 1], args.k)[1][0].tolist() for i, q in enumerate(QUERIES)}

                def local(i: int) -> bool:
                    c = enc.encode_texts([QUERIES[i % len(QUERIES)]]).codes
                    index.search_stable(c, args.k)
                    return True

                for via, root in endpoints.items():
                    client = Client(root)

                    def query(i: int) -> bool:
                        return client.search(QUERIES[i % len(QUERIES)], args.k)[0] == 200

                    for _ in range(3):
                        query(0)  # warm-up: first batches, page cache
                    # The fixed cost of the HTTP path and the ingress alone: GET /healthz does nothing else.
                    health = summary(closed_loop(lambda i: client.request("GET", "/healthz")[0] == 200,
                                                 1, min(3.0, args.seconds)))
                    row_label = f"{label}, {via}"
                    floors.append((row_label, health))
                    for c in clients:
                        serve_runs, local_runs = [], []
                        for _ in range(args.rounds):
                            serve_runs.append(closed_loop(query, c, args.seconds / args.rounds))
                            local_runs.append(closed_loop(local, c, args.seconds / args.rounds))
                        a, b = summary(*serve_runs), summary(*local_runs)
                        per_round = [summary(x)["p50"] / summary(y)["p50"] for x, y in zip(serve_runs, local_runs)]
                        rows.append((row_label, c, a, b, per_round))
                        print(f"  {row_label}, {c} client(s): {a['qps']:.1f} QPS vs {b['qps']:.1f} in-process",
                              flush=True)
                if index_uri == big and transport == transports[0] and fault is None and not args.skip_fault:
                    # where the fastest path goes: the replica itself under direct ingress
                    fault = kill_a_group_under_load(endpoints.get("direct", base), expected, args.k)
                index.close()
            serve.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nMachine: {machine()}; text->image, k={args.k}, closed loop for {args.seconds:g} s per row and side; "
          f"proxy to ingress over {args.proxy_transport}; Ray Serve {args.ray_serve}; in-process = Encoder + ShardedIndex.search_stable "
          f"in the client's process, same client threads ({threads[0]} search threads, {threads[1]} torch threads)\n")
    print(f"Each row: {args.rounds} rounds of Serve then in-process, {args.seconds / args.rounds:g} s each; the "
          "ratio is of the p50s over all rounds, the range is the ratio's lowest and highest in one round\n")
    print("| index | clients | Serve QPS | p50 ms | p95 ms | p99 ms | in-process QPS | p50 ms | p99 ms "
          "| Serve/in-process p50 | per round | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, c, a, b, per_round in rows:
        print(f"| {label} | {c} | {a['qps']:.1f} | {a['p50']:.1f} | {a['p95']:.1f} | {a['p99']:.1f} | "
              f"{b['qps']:.1f} | {b['p50']:.1f} | {b['p99']:.1f} | {a['p50'] / b['p50']:.2f}x | "
              f"{min(per_round):.2f}-{max(per_round):.2f}x | {a['errors']} |")
    print("\n| app | GET /healthz p50 ms (HTTP path + ingress, nothing else) | p99 ms |\n|---|---|---|")
    for label, h in floors:
        print(f"| {label} | {h['p50']:.1f} | {h['p99']:.1f} |")
    if fault:
        print("\n| fault: one IndexShards replica killed under 4 clients | value |\n|---|---|")
        for k, v in fault.items():
            print(f"| {k} | {v} |")


def direct_url(proxy: str, timeout: float = 60.0) -> str:
    """The one Frontend replica's own URL under direct ingress, once the replica of the previous
    application has left the controller's targets."""
    from serve.targets import http_targets

    deadline = time.time() + timeout
    while True:
        urls = [u for u in http_targets("dcgh") if u != proxy]
        if len(urls) == 1:
            return urls[0]
        if time.time() > deadline:
            raise RuntimeError(f"expected one direct-ingress target, the controller lists {urls}")
        time.sleep(0.5)


def kill_a_group_under_load(base: str, expected: dict, k: int) -> dict:
    """Kill group 0's replica under load; count what failed, check every answer is whole."""
    import ray

    log: list[tuple[float, int, bool, float]] = []  # (time, status, answer complete and right, seconds taken)
    stop = threading.Event()
    lock = threading.Lock()

    api = Client(base)

    def client(w: int):
        i = w
        while not stop.is_set():
            q = QUERIES[i % len(QUERIES)]
            t0 = time.time()
            try:
                status, answer = api.search(q, k)
                right = status != 200 or [x["id"] for x in answer["results"]] == expected[q]
                entry = (time.time(), status, right, time.time() - t0)
            except (OSError, http.client.HTTPException):
                entry = (time.time(), 0, True, time.time() - t0)
            with lock:
                log.append(entry)
            i += 4

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)

    def group0() -> list[dict]:
        return [a for a in ray.util.list_named_actors(all_namespaces=True) if "IndexShards-image-0" in a["name"]]

    victim = group0()[0]
    killed_at = time.time()
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    deadline = killed_at + 120
    while time.time() < deadline:  # recovered: a new replica, and 20 answers in a row after the kill, all 200
        with lock:
            after = [s for t, s, _, _ in log if t > killed_at]
        if len(after) > 20 and all(s == 200 for s in after[-20:]) and any(
                a["name"] != victim["name"] for a in group0()):
            break
        time.sleep(0.5)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    replacements = [a["name"] for a in group0() if a["name"] != victim["name"]]
    after = [(t, s, ok, dt) for t, s, ok, dt in log if t > killed_at]
    failed = [(t, s) for t, s, _, _ in after if s != 200]
    last_fail = max((t for t, _ in failed), default=killed_at)
    return {
        "requests after the kill": len(after),
        "failed (503 / other / connection)": f"{sum(s == 503 for _, s in failed)} / "
                                              f"{sum(s not in (0, 503) for _, s in failed)} / {sum(s == 0 for _, s in failed)}",
        "seconds until the last failure": round(last_fail - killed_at, 1),
        "longest request answered after the kill (s)": round(max((dt for _, _, _, dt in after), default=0.0), 2),
        "answers missing a shard's items": sum(not ok for _, _, ok, _ in after),
        "requests after recovery that failed": sum(1 for t, s, _, _ in after if t > last_fail and s != 200),
        "replaced by a new replica": f"yes ({replacements[0].rsplit('#', 1)[-1]})" if replacements else "no",
    }


if __name__ == "__main__":
    main()
