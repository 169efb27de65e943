"""The Ray Serve endpoint on a real local cluster: answers equal ShardedIndex's, bad input is a 4xx
that leaves the server serving, an index upgrade under load fails no request, and the page works
in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from dcgh_dist.ray_session import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

pytestmark = [pytest.mark.ray]


def _png(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A tiny PNG whose header claims 30000 x 30000 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def deploy(args: dict, deployments: list | None = None, timeout: float = 300) -> None:
    """What `serve deploy serve/config.yaml` does, with the test's outputs as the args: the
    declarative path, where a config that changes only deployments' user_config is applied in
    place (a change of args is a new application version: Serve replaces every replica)."""
    import yaml
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["applications"][0]["args"] = args
    config["applications"][0]["deployments"] = deployments or []
    config["applications"][0]["logging_config"] = {"log_level": "WARNING"}  # no access log lines
    _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(config))
    deadline = time.time() + timeout
    while time.time() < deadline:
        app = serve.status().applications.get("dcgh")
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(app.message)
        time.sleep(0.5)
    raise TimeoutError("the application did not reach RUNNING")


def wait_healthy(url: str, timeout: float = 120) -> None:
    """/healthz is 503 until the towers have loaded and every deployment answered a probe."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = requests.get(f"{url}/healthz", timeout=10)
        if r.status_code == 200:
            return
        assert r.status_code == 503 and r.json()["status"] == "starting", (r.status_code, r.text)
        time.sleep(0.2)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_small, ray_cluster):
    """Demo checkpoint (untrained tiny CLIP), codes, two sharded indexes, and the app on 127.0.0.1."""
    from ray import serve

    from dcgh_dist.config import EncodeConfig, IndexConfig
    from dcgh_dist.data.format import read_dataset_info
    from dcgh_dist.encoding import run_encode
    from dcgh_dist.index.build import build_index
    from dcgh_dist.models.checkpoint import read_meta
    from serve.app import AppArgs
    from test_encode_job import make_checkpoint

    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(str(root / "ckpt"), read_dataset_info(demo_small))
    run_encode(ckpt, demo_small, str(root / "codes"), ("image", "text"),
               EncodeConfig(splits=("train", "val", "db"), relaxed=True))  # relaxed: re-ranking
    fp = read_meta(ckpt).fingerprint
    indexes = {}
    for m in ("image", "text"):
        indexes[m] = str(root / f"index-{m}")
        build_index(str(root / "codes" / m), indexes[m], IndexConfig(shard_size=400), expected_fingerprint=fp,
                    use_ray=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    zero = {"num_cpus": 0}
    args = AppArgs(checkpoint=ckpt, indexes=indexes, dataset=demo_small, max_k=200, max_text_chars=200,
                   max_image_bytes=200_000, max_image_pixels=4_000_000, shards_per_replica=1,
                   encoder={"max_batch_size": 8}, index=zero, metadata=zero, frontend=zero)
    deploy(args.model_dump(exclude_none=True))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    try:
        yield {"url": url, "args": args, "root": root, "ckpt": ckpt, "indexes": indexes, "dataset": demo_small}
    finally:
        serve.shutdown()


def _search(url, **body):
    return requests.post(f"{url}/search", json=body, timeout=60)


def test_only_loopback_and_the_openapi_doc(served):
    """Every socket the deployment's processes listen on is loopback, the replicas' internal gRPC
    servers included (Ray Serve binds those to every interface unless serve.app rebinds them)."""
    from sockets import LOOPBACK, listening_sockets

    listening = listening_sockets()
    replicas = {n for _, _, n in listening if n.startswith("ray::ServeReplica")}
    # the frontend, the item lookup and the six index groups: each runs its own gRPC server
    assert len(replicas) >= 8, replicas
    assert [x for x in listening if x[0] not in LOOPBACK] == []
    r = requests.get(f"{served['url']}/openapi.json", timeout=30)
    assert r.status_code == 200 and "/search" in r.json()["paths"] and "/search/image" in r.json()["paths"]
    assert requests.get(f"{served['url']}/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(f"{served['url']}/info", timeout=30).json()
    assert info["bits"] == 64 and info["indexes"]["image"]["size"] == 1080 and info["indexes"]["text"]["groups"] == 3


def test_results_equal_sharded_index_search(served):
    """Fan-out over three shard groups merged by (distance, id) == ShardedIndex on the manifest."""
    from dcgh_dist.index import ShardedIndex
    from dcgh_dist.models.encoder import Encoder

    enc = Encoder.from_checkpoint(served["ckpt"], device="cpu")
    index = ShardedIndex.open(served["indexes"]["image"])
    plain = ShardedIndex.open(served["indexes"]["image"])
    for text, k in (("a red circle", 10), ("blue", 37), ("something green and round", 200)):
        r = _search(served["url"], text=text, k=k)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == enc.meta.fingerprint and body["bits"] == 64 and body["took_ms"] > 0
        got = [(x["distance"], x["id"]) for x in body["results"]]
        codes = enc.encode_texts([text]).codes
        D, I = index.search_stable(codes, k)
        assert got == list(zip(D[0].tolist(), I[0].tolist()))
        # tie-aware against the plain search: same distances, same id set per distance
        D2, I2 = plain.search(codes, k)
        assert [d for d, _ in got] == D2[0].tolist()
        for d in set(D2[0].tolist()) - {D2[0][-1]}:
            assert {i for dd, i in got if dd == d} == set(I2[0][D2[0] == d].tolist())
        assert all(x["caption"] and x["image_url"] == f"/items/{x['id']}/image" for x in body["results"])


def test_rerank_equals_the_index_reranking(served):
    """rerank=r: every group's Hamming top k x r with scores, merged, re-ordered by the relaxed
    inner product == ShardedIndex.search_reranked over the whole index; bad values are a 422."""
    from dcgh_dist.index import ShardedIndex
    from dcgh_dist.codes import pack_relaxed
    from dcgh_dist.models.encoder import Encoder

    enc = Encoder.from_checkpoint(served["ckpt"], device="cpu")
    index = ShardedIndex.open(served["indexes"]["image"])
    for text, k, r in (("a red circle", 10, 4), ("blue", 25, 2)):
        body = _search(served["url"], text=text, k=k, rerank=r).json()
        relaxed = enc.encode_texts([text], packed=False).codes
        D, I, S = index.search_reranked(pack_relaxed(relaxed), relaxed.astype(np.float16).astype(np.float32), k,
                                        factor=r)
        assert [x["id"] for x in body["results"]] == I[0].tolist()
        assert [x["distance"] for x in body["results"]] == D[0].tolist()
        assert np.allclose([x["score"] for x in body["results"]], S[0], rtol=1e-5)
        plain = _search(served["url"], text=text, k=k).json()["results"]
        assert all("score" not in x or x["score"] is None for x in plain)
    for bad in (0, 21, "4"):
        r = _search(served["url"], text="x", rerank=bad)
        assert r.status_code == 422 and r.json()["field"] == "rerank", r.text


def test_encoder_deployment_ray_transport_and_a_multi_cpu_group_answer_the_same(served):
    """encoder.placement: deployment (a QueryEncoder deployment, e.g. on GPU nodes), called with
    transport: ray (actor calls through the object store), and one index group of 2 CPUs holding
    all three shards (its queries scan in worker threads, the shards in parallel; the defaults'
    one-CPU groups scan on the replica's event loop) give the answers of the defaults."""
    from pydantic import ValidationError
    from ray import serve

    from serve.app import AppArgs, DeploymentOptions, EncoderOptions, build_app

    args = served["args"].model_copy(update={"indexes": {"image": served["indexes"]["image"]}, "dataset": None,
                                             "encoder": EncoderOptions(placement="deployment", num_cpus=0),
                                             "transport": "ray", "shards_per_replica": 3,
                                             "index": DeploymentOptions(num_cpus=2)})
    assert served["args"].transport == "grpc"
    serve.run(build_app(args), name="dcgh-encoder", route_prefix="/enc")
    try:
        deployments = serve.status().applications["dcgh-encoder"].deployments
        assert "QueryEncoder" in deployments and [d for d in deployments if d.startswith("IndexShards")] == [
            "IndexShards-image-0"]
        group = serve.get_deployment_handle("IndexShards-image-0", app_name="dcgh-encoder")
        assert group.info.remote().result(timeout_s=60)["threads"] == 2  # Ray's OMP_NUM_THREADS: num_cpus
        for text in ("a red circle", "blue"):
            ids = [[x["id"] for x in _search(url, text=text, k=20).json()["results"]]
                   for url in (served["url"], served["url"] + "/enc")]
            assert ids[0] == ids[1] and len(ids[0]) == 20
    finally:
        serve.delete("dcgh-encoder")
    with pytest.raises(ValidationError, match="encoder.num_gpus size a QueryEncoder deployment"):
        AppArgs.model_validate({**args.model_dump(), "encoder": {"num_gpus": 1}})


def test_command_line_arguments_arrive_as_strings():
    """`serve run serve.app:build_app key=value` passes strings: the mappings are JSON text, the
    numbers are coerced, and a mapping that is not JSON is an error naming the argument."""
    from pydantic import ValidationError

    from serve.app import AppArgs

    args = AppArgs.model_validate({"checkpoint": "runs/demo/checkpoint", "indexes": '{"text": "indexes/demo-text"}',
                                   "frontend": '{"num_replicas": 2}', "max_k": "50"})
    assert args.indexes == {"text": "indexes/demo-text"} and args.frontend.num_replicas == 2 and args.max_k == 50
    with pytest.raises(ValidationError, match="indexes: not a JSON object"):
        AppArgs.model_validate({"checkpoint": "c", "indexes": "{text: x}"})
    with pytest.raises(ValidationError, match="image"):
        AppArgs.model_validate({"checkpoint": "c", "indexes": '{"picture": "x"}'})


def test_an_app_the_cluster_cannot_place_is_refused_naming_what_it_asks():
    """Serve's own default (one CPU a replica) for the demo's four deployments on a 2-CPU machine
    is refused with the deployments, their asks and the cluster's total; the app's defaults fit;
    replicas are placed node by node, autoscaling apps at their starting size, GPUs counted."""
    from serve.app import DEFAULT_CPUS, AppArgs, check_placement

    one_cpu = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}
    serve_defaults = {n: one_cpu for n in ("IndexShards-image-0", "IndexShards-text-0", "ItemLookup", "Frontend")}
    laptop = [{"CPU": 2.0, "memory": 8e9}]
    with pytest.raises(ValueError) as refused:
        check_placement(serve_defaults, laptop)
    msg = str(refused.value)
    for part in ("IndexShards-image-0 1 x 1 CPU", "IndexShards-text-0 1 x 1 CPU", "ItemLookup 1 x 1 CPU",
                 "Frontend 1 x 1 CPU", "in all 4 CPU", "the cluster has 2 CPU on 1 node(s)", "placement_check: none"):
        assert part in msg, msg
    args = AppArgs(checkpoint="c")  # every deployment at the app's defaults
    demo = {"IndexShards-image-0": args.index.options(DEFAULT_CPUS["index"]),
            "IndexShards-text-0": args.index.options(DEFAULT_CPUS["index"]),
            "ItemLookup": args.metadata.options(DEFAULT_CPUS["metadata"]),
            "Frontend": args.frontend.options(DEFAULT_CPUS["frontend+encoder"])}
    check_placement(demo, laptop)
    # 2 CPUs in total, but no node holds a 2-CPU replica
    with pytest.raises(ValueError, match="Frontend would wait"):
        check_placement({"Frontend": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 2}}},
                        [{"CPU": 1.0}, {"CPU": 1.0}])
    auto = {"Frontend": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 8},
                         "ray_actor_options": {"num_cpus": 1}}}
    check_placement(auto, [{"CPU": 3.0}])
    with pytest.raises(ValueError, match="Frontend 3 x 1 CPU"):
        check_placement(auto, [{"CPU": 2.0}])
    gpu = {"QueryEncoder": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}}
    with pytest.raises(ValueError, match="QueryEncoder 1 x 1 CPU \\+ 1 GPU"):
        check_placement(gpu, [{"CPU": 16.0}])
    check_placement(gpu, [{"CPU": 16.0}, {"CPU": 4.0, "GPU": 1.0}])


def test_targets_are_where_the_servers_listen():
    """serve.targets from the controller's details: the bound host replaces the node address the
    controller advertises unless the host is every interface; Serve's default host when the
    details leave it out; only HTTP groups; the route prefix; nothing for an app not running."""
    from ray.serve._private.common import RequestProtocol

    from serve.targets import http_targets

    def details(host, prefix="/"):
        t = [{"ip": "10.0.0.7", "port": 30000, "instance_id": "", "name": "a"},
             {"ip": "10.0.0.8", "port": 30000, "instance_id": "", "name": "b"}]
        return {"http_options": {"host": host} if host is not None else {}, "applications": {"dcgh": {}},
                "target_groups": [{"targets": t, "route_prefix": prefix, "protocol": RequestProtocol.HTTP,
                                   "app_name": "dcgh"},
                                  {"targets": t, "route_prefix": prefix, "protocol": "gRPC", "app_name": "dcgh"}]}

    assert http_targets("dcgh", details("127.0.0.1")) == ["http://127.0.0.1:30000"]
    assert http_targets("dcgh", details(None)) == ["http://127.0.0.1:30000"]  # Serve's default host
    assert http_targets("dcgh", details("0.0.0.0", "/api/")) == ["http://10.0.0.7:30000/api",
                                                                 "http://10.0.0.8:30000/api"]
    assert http_targets(None, details("::1")) == ["http://[::1]:30000"]
    assert http_targets("other", details("0.0.0.0")) == []


@pytest.mark.timeout(400)
def test_throughput_optimized_mode_answers_on_the_replicas_own_loopback_port(served):
    """RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress: the Frontend replica serves HTTP on a port
    of its own, no proxy hop), in a cluster of its own: ``serve.targets`` finds the replica's port,
    which is not the proxy's; it answers what the proxy answers, and what ShardedIndex answers;
    bad input is still a 4xx naming the field; and every socket listens on loopback."""
    import json
    import signal
    import subprocess

    from dcgh_dist.index import ShardedIndex
    from dcgh_dist.models.encoder import Encoder
    from serve.targets import http_targets
    from sockets import LOOPBACK

    assert http_targets("dcgh") == [served["url"]]  # by default: the proxy, nothing else
    texts, k = ["a red circle", "blue sky"], 15
    args = served["args"].model_copy(update={"indexes": {"image": served["indexes"]["image"]}})
    spec = {"port": free_port(), "args": args.model_dump(exclude_none=True), "texts": texts, "k": k}
    # The draining period is for external load balancers to notice a replica leaving; nothing
    # here needs it, and Serve's shutdown would wait it out (30 s).
    env = {**os.environ, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "direct_ingress_child.py"), json.dumps(spec)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # SIGINT first: the child's ray_session then stops its cluster; then whatever is left.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        from dcgh_dist.ray_session import sweep_orphans

        sweep_orphans()
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, stdout[-3000:] + stderr[-3000:]
    out = json.loads(line[len("RESULT "):])

    assert out["targets"] and out["proxy"] not in out["targets"], out["targets"]
    assert all(u.startswith("http://127.0.0.1:") for u in out["targets"]), out["targets"]
    enc = Encoder.from_checkpoint(served["ckpt"], device="cpu")
    index = ShardedIndex.open(served["indexes"]["image"])
    D, I = index.search_stable(enc.encode_texts(texts).codes, k)
    expected = [list(zip(d.tolist(), i.tolist())) for d, i in zip(D, I)]
    for url, answers in out["answers"].items():
        assert [[(x["distance"], x["id"]) for x in a["results"]] for a in answers] == expected, url
    for status, body, after in out["bad_k"]:
        assert status == 422 and body["field"] == "k" and after == 200, body
    assert any(port == int(out["targets"][0].rsplit(":", 1)[1]) for _, port, _ in out["listening"])
    assert [x for x in out["listening"] if x[0] not in LOOPBACK] == []


def test_image_and_id_queries(served):
    url = served["url"]
    b64 = base64.b64encode(_png(3)).decode()
    r = _search(url, image=b64, k=5)
    assert r.status_code == 200 and len(r.json()["results"]) == 5  # image -> text by default
    up = requests.post(f"{url}/search/image", files={"file": ("q.png", _png(3), "image/png")},
                       data={"k": "5", "target": "text"}, timeout=60)
    assert up.status_code == 200 and up.json()["results"] == r.json()["results"]
    first = r.json()["results"][0]["id"]
    by_id = _search(url, id=first, modality="text", target="image", k=4)
    assert by_id.status_code == 200 and len(by_id.json()["results"]) == 4
    thumb = requests.get(f"{url}/items/{first}/image", timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 256


@pytest.mark.parametrize("case,status,field", [
    ({"text": ""}, 422, "text"),
    ({"text": "   "}, 422, "text"),
    ({"text": "x" * 201}, 413, "text"),
    ({"image": "not base64!!"}, 422, "image"),
    ({"image": base64.b64encode(b"plain bytes, no image").decode()}, 422, "image"),
    ({"image": base64.b64encode(b"\x89PNG" + b"0" * 300_000).decode()}, 413, "image"),
    ({"image": base64.b64encode(_bomb()).decode()}, 413, "image"),
    ({"text": "a", "k": 0}, 422, "k"),
    ({"text": "a", "k": -1}, 422, "k"),
    ({"text": "a", "k": 201}, 422, "k"),
    ({"text": "a", "k": "3"}, 422, "k"),
    ({"id": 10 ** 12, "modality": "image"}, 404, "id"),
    ({"id": 5}, 422, "modality"),
    ({"text": "a", "target": "audio"}, 422, "target"),
    ({"text": "a", "id": 3, "modality": "text"}, 422, None),
    ({}, 422, None),
    ({"text": "a", "extra": 1}, 422, "extra"),
])
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(served, case, status, field):
    r = _search(served["url"], **case)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and body["error"]
    assert _search(served["url"], text="still here", k=3).status_code == 200


def test_bad_bodies_and_content_types(served):
    url = served["url"]
    for data, ctype, status in ((b"[1, 2]", "application/json", 422), (b"{not json", "application/json", 400),
                                (b"text=a", "application/x-www-form-urlencoded", 415), (b"a", "text/plain", 415)):
        r = requests.post(f"{url}/search", data=data, headers={"Content-Type": ctype}, timeout=30)
        assert r.status_code == status and "error" in r.json(), (ctype, r.text)
    r = requests.post(f"{url}/search/image", files={"file": ("x.png", _bomb(), "image/png")}, timeout=30)
    assert r.status_code == 413 and r.json()["field"] == "file"
    assert requests.get(f"{url}/items/123456789/image", timeout=30).status_code == 404
    assert requests.get(f"{url}/static/..%2F..%2Fpyproject.toml", timeout=30).status_code == 404
    assert _search(url, text="still here", k=3).status_code == 200


def test_index_built_by_another_model_is_refused_at_start(served, tmp_path):
    from dcgh_dist.data.format import read_dataset_info
    from serve.app import build_app
    from test_encode_job import make_checkpoint

    other = make_checkpoint(str(tmp_path / "other"), read_dataset_info(served["dataset"]), seed=7)
    args = served["args"].model_copy(update={"checkpoint": other})
    with pytest.raises(ValueError, match=r"indexes.image: .* was built from codes of model \w+, not of the checkpoint's"):
        build_app(args)


def test_index_upgrade_under_load_fails_no_request(served):
    """A rebuilt index given to the index groups' user_config (`serve deploy` of the edited
    config) is opened beside the old one and swapped in while clients query; every request
    succeeds."""
    from dcgh_dist.config import IndexConfig
    from dcgh_dist.index import read_manifest
    from dcgh_dist.index.build import build_index
    from dcgh_dist.models.checkpoint import read_meta

    url, root = served["url"], served["root"]
    old = read_manifest(served["indexes"]["image"]).build_id
    new_dir = str(root / "index-image-v2")
    shutil.copytree(served["indexes"]["image"], new_dir)
    build_index(str(root / "codes" / "image"), new_dir, IndexConfig(shard_size=400),
                expected_fingerprint=read_meta(served["ckpt"]).fingerprint, use_ray=False)
    new = read_manifest(new_dir).build_id
    assert new != old
    codes = _swap_under_load(served, "image", new_dir, {"text": "a query under load", "k": 10})
    assert len(codes) > 10 and set(codes) == {200}, {c for c in codes if c != 200}


def _swap_under_load(served, modality: str, manifest: str, query: dict) -> list:
    """Deploy ``manifest`` to every group of ``modality`` while three clients query; wait until
    every group serves it. Returns the clients' status codes."""
    from dcgh_dist.index import read_manifest

    url, build = served["url"], read_manifest(manifest).build_id
    groups = requests.get(f"{url}/info", timeout=30).json()["indexes"][modality]["groups"]
    stop, codes = threading.Event(), []

    def client():
        while not stop.is_set():
            try:
                codes.append(_search(url, **query).status_code)
            except requests.RequestException as e:
                codes.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        deploy(served["args"].model_dump(exclude_none=True),
               [{"name": f"IndexShards-{modality}-{g}", "user_config": {"manifest": manifest}} for g in range(groups)])
        deadline = time.time() + 120
        while time.time() < deadline:
            if requests.get(f"{url}/info", timeout=30).json()["indexes"][modality]["build_id"] == [build]:
                break
            time.sleep(0.5)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert requests.get(f"{url}/info", timeout=30).json()["indexes"][modality]["build_id"] == [build]
    return codes


@pytest.mark.timeout(400)
def test_a_live_index_appends_and_deletes_under_load(served):
    """Delete the top results of a query and append some of them back, each a new version that
    `serve deploy` swaps in (user_config: the version's own manifest file) while clients query:
    no request fails, no deleted id comes back after its swap, appended ids do. Label filters on
    the labelled index answer only items of that label; a bad filter is a 422."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from dcgh_dist.config import IndexConfig
    from dcgh_dist.index.build import build_index
    from dcgh_dist.index.codes import read_code_shard, read_relaxed
    from dcgh_dist.index.manifest import version_manifest_name
    from dcgh_dist.index.update import delete_ids
    from dcgh_dist.models.checkpoint import read_meta

    url, root, dataset = served["url"], served["root"], served["dataset"]
    query = {"text": "a query under load", "k": 10}
    live = str(root / "index-image-live")
    fp = read_meta(served["ckpt"]).fingerprint
    m = build_index(str(root / "codes" / "image"), live, IndexConfig(shard_size=400), expected_fingerprint=fp,
                    use_ray=False, labels_uri=dataset)
    version = lambda m: os.path.join(live, version_manifest_name(m.build_id))  # noqa: E731
    assert set(_swap_under_load(served, "image", version(m), query)) == {200}
    top = [r["id"] for r in _search(url, **query).json()["results"]]

    m, result = delete_ids(live, top)
    assert result.deleted == 10
    codes = _swap_under_load(served, "image", version(m), query)
    assert len(codes) > 5 and set(codes) == {200}, {c for c in codes if c != 200}
    after = [r["id"] for r in _search(url, **query).json()["results"]]
    assert len(after) == 10 and not set(after) & set(top)

    back = top[:5]
    files = sorted((root / "codes" / "image").glob("*.parquet"))
    shards = [read_code_shard(pafs.LocalFileSystem(), str(f)) for f in files]
    ids, all_codes = np.concatenate([i for i, _ in shards]), np.concatenate([c for _, c in shards])
    relaxed = np.concatenate([read_relaxed(pafs.LocalFileSystem(), str(f)) for f in files])  # encode --relaxed
    rows = np.isin(ids, back)
    add_dir = root / "codes-image-back"
    add_dir.mkdir()
    from dcgh_dist.index.codes import code_shard_meta, codes_table

    pq.write_table(codes_table(ids[rows], all_codes[rows], code_shard_meta(m.bits, fp, "image"), relaxed=relaxed[rows]),
                   add_dir / "part-00000.parquet")
    m = build_index(str(add_dir), live, IndexConfig(shard_size=400), use_ray=False, append=True, labels_uri=dataset)
    assert m.operation == "append" and m.num_live == m.num_items - 10  # the 10 old copies stay hidden
    codes = _swap_under_load(served, "image", version(m), query)
    assert set(codes) == {200}, {c for c in codes if c != 200}
    final = [r["id"] for r in _search(url, **query).json()["results"]]
    assert set(back) <= set(final) and not set(final) & set(top[5:])

    labels = {}
    for f in sorted(Path(dataset).glob("*.parquet")):
        t = pq.read_table(f, columns=["id", "labels"])
        labels.update(zip(t.column("id").to_pylist(), t.column("labels").to_pylist()))
    r = _search(url, **query, filter={"labels_any": [1]})
    assert r.status_code == 200 and len(r.json()["results"]) == 10
    assert all(1 in labels[x["id"]] for x in r.json()["results"])
    allow = [x["id"] for x in r.json()["results"][:3]] + [top[9]]  # a deleted id: never answered
    r = _search(url, **query, filter={"ids": allow})
    assert sorted(x["id"] for x in r.json()["results"]) == sorted(allow[:3])
    for bad, status in (({"labels_any": [10 ** 6]}, 422), ({"labels_all": []}, 422), ({"color": [1]}, 422),
                        ({"ids": list(range(100_001))}, 413)):
        r = _search(url, **query, filter=bad)
        assert r.status_code == status and r.json()["field"].startswith("filter"), r.text
    r = _search(url, text="to the unlabelled text index", k=3, target="text", filter={"labels_any": [0]})
    assert r.status_code == 422 and "has no labels" in r.json()["error"]
    assert _search(url, text="still here", k=3).status_code == 200


def _chrome():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no Chromium: `apt-get install -y chromium chromium-driver` (Debian) enables the page test")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


@pytest.mark.timeout(300)
def test_search_page_in_a_real_browser(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome()
    shots = Path(os.environ.get("DCGH_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(served["url"] + "/")
        wait.until(lambda d: "bits" in d.find_element(By.ID, "status").text)
        box = driver.find_element(By.ID, "text")
        box.send_keys("a red square")
        k = driver.find_element(By.ID, "k")
        k.clear()
        k.send_keys("6")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 6)
        assert "text=a+red+square" in driver.current_url and "k=6" in driver.current_url
        assert "ms" in driver.find_element(By.ID, "meta").text and "64 bits" in driver.find_element(By.ID, "meta").text
        imgs = driver.find_elements(By.CSS_SELECTOR, "#results img")
        wait.until(lambda d: all(i.get_property("naturalWidth") > 0 for i in imgs))
        driver.save_screenshot(str(shots / "serve-text-query.png"))
        # click a result: a search for items like it, in the URL
        first = driver.find_elements(By.CSS_SELECTOR, "#results .result")[0]
        first_id = first.get_attribute("data-id")
        first.click()
        wait.until(EC.url_contains(f"id={first_id}"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 6)
        driver.save_screenshot(str(shots / "serve-like-this.png"))
        # upload an image (the file input behind the drop zone)
        path = tmp_path / "query.png"
        path.write_bytes(_png(11, (64, 64)))
        driver.find_element(By.ID, "target").send_keys("captions")
        driver.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda d: "upload=1" in d.current_url and d.find_elements(By.CSS_SELECTOR, "#results .result"))
        driver.save_screenshot(str(shots / "serve-upload.png"))
        # errors appear inline
        driver.get(served["url"] + "/?text=x&k=100000")
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "k must be" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
