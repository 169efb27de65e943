"""The Ray Serve application: text, image or item in, top-k cross-modal results out.

    serve run serve/config.yaml                                   # the demo's outputs
    serve run serve.app:build_app checkpoint=runs/demo/checkpoint indexes='{"text": "indexes/demo-text"}'

Deployments (docs/SERVE.md):

* The checkpoint's towers behind ``@serve.batch`` (concurrent queries are encoded together):
  inside the Frontend by default (``encoder.placement: ingress``: one Serve hop fewer per
  query), or a ``QueryEncoder`` deployment of their own (``placement: deployment``), on a GPU
  when it asks for one.
* ``IndexShards-<modality>-<g>``, one deployment per shard group and modality: each replica holds
  the shards ``i`` of one modality's index with ``i % groups == g``, so an index larger than one
  machine spreads over replicas. Its manifest is its ``user_config``: ``serve deploy`` of a config
  whose ``deployments:`` give a group a new ``user_config: {manifest: ...}`` opens the new build
  beside the old one and swaps it in (queries in flight finish on the old one), with no restart.
  (A change to ``args`` is a new version of the application: Serve replaces the replicas.)
* ``ItemLookup``: captions and thumbnails by id, read from the dataset's Parquet (never loaded).
* ``Frontend``: the FastAPI ingress (OpenAPI at ``/docs``, the search page at ``/``). It fans a
  query out to every shard group and merges their top k by (distance, id); a query that cannot
  reach every group fails with 503 naming the groups that did not answer. It calls the other
  deployments over gRPC (``transport``; docs/SERVE.md, "Latency").

The server never fetches a URL and never opens a path that came from a client, and every
replica's sockets listen on the node's address only (``_on_node_address``).
"""

# No `from __future__ import annotations`: FastAPI builds the request models from the route
# annotations inside the Serve replica, where postponed (string) annotations do not resolve.
import asyncio
import base64
import binascii
import concurrent.futures
import functools
import io
import json
import logging
import math
import os
import threading
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve import Application

logger = logging.getLogger("dcgh_dist.serve")

MODALITIES = ("image", "text")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# Ray CPUs a replica asks for when the app's args give it no num_cpus. Ray Serve's own default is
# one CPU a replica, under which the demo's four deployments asked for four CPUs and never started
# on a 2-core machine. These follow the cores each replica used under load on the demo (4 clients,
# 71 queries/s on 2 cores: frontend with the towers 0.77, item lookup 0.25, each index group 0.11;
# docs/SERVE.md, "Sizing"); an index group is given more than the demo's scans take because a
# 10M-code shard's scan takes about as long as the towers. They add up to 2 CPUs for the demo.
DEFAULT_CPUS = {
    "frontend+encoder": 1.0,  # the towers run in the frontend (encoder.placement: ingress)
    "frontend": 0.25,  # parsing, fan-out and merge only (encoder.placement: deployment)
    "encoder": 1.0,  # a QueryEncoder deployment
    "index": 0.4,  # one shard group (num_cpus >= 2: that many search threads)
    "metadata": 0.2,  # captions and thumbnails, a few Parquet row reads per query
}
# An index replaced by an upgrade is closed this long after the swap: queries that had already
# picked it up finish on it first.
RETIRE_AFTER_S = 30.0
# How long /healthz waits for each deployment's answer before calling it not ready.
HEALTH_PROBE_S = 0.5


# --------------------------------------------------------------------------------------------
# Arguments


class DeploymentOptions(BaseModel):
    """Replica settings of one deployment (Ray Serve's own names)."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: int | Literal["auto"] = 1
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None

    def options(self, default_cpus: float) -> dict[str, Any]:
        """Serve's ``.options()`` of this deployment; ``default_cpus`` where num_cpus is unset."""
        out: dict[str, Any] = {}
        if self.autoscaling_config is not None:
            out["autoscaling_config"] = self.autoscaling_config
        else:
            out["num_replicas"] = self.num_replicas
        if self.max_ongoing_requests is not None:
            out["max_ongoing_requests"] = self.max_ongoing_requests
        actor = {"num_cpus": default_cpus if self.num_cpus is None else self.num_cpus}
        if self.num_gpus is not None:
            actor["num_gpus"] = self.num_gpus
        out["ray_actor_options"] = actor
        return out


class EncoderOptions(DeploymentOptions):
    # Where the towers run. "ingress": inside each Frontend replica, which saves a Serve hop per
    # query (about 5 ms on a 2-core node, docs/BENCHMARKS.md); the frontend's replica settings
    # then size it. "deployment": a QueryEncoder deployment of its own, e.g. on GPU nodes
    # (num_gpus) while the frontend stays on CPU nodes; this deployment's settings size it.
    placement: Literal["ingress", "deployment"] = "ingress"
    max_batch_size: int = Field(32, ge=1)
    # How long a lone query waits for others to share its forward pass. 0: none; under load,
    # the queries that arrive while a forward pass runs still form the next batch.
    batch_wait_timeout_s: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _sizing_needs_a_deployment(self):
        # In the ingress, these would be silently ignored: say so instead.
        sized = [f for f in ("autoscaling_config", "max_ongoing_requests", "num_cpus", "num_gpus")
                 if getattr(self, f) is not None] + (["num_replicas"] if self.num_replicas != 1 else [])
        if sized and self.placement == "ingress":
            raise ValueError(f"encoder.{', encoder.'.join(sized)} size a QueryEncoder deployment: set "
                             "encoder.placement: deployment, or size the frontend (the towers run in it)")
        return self


class AppArgs(BaseModel):
    """``build_app``'s arguments: ``serve run serve.app:build_app key=value`` or a config's ``args``."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str  # directory or s3:// URI
    indexes: dict[Literal["image", "text"], str] = Field(default_factory=dict)  # modality -> manifest URI
    dataset: str | None = None  # anything --dataset of the jobs takes: captions and thumbnails by id
    s3_endpoint: str | None = None
    max_k: int = Field(1000, ge=1)
    max_text_chars: int = Field(1000, ge=1)
    max_image_bytes: int = Field(10 << 20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    shards_per_replica: int = Field(1, ge=1)
    # How the frontend calls the index groups, the item lookup and a QueryEncoder deployment.
    # "grpc": Ray Serve's direct gRPC data plane between replicas: lower latency and more QPS
    # than "ray" on a 2-core node, 10M codes (docs/BENCHMARKS.md, "Serving"). "ray": Ray actor
    # calls through the object store, Serve's own default. Either way every replica's gRPC
    # server listens on the node's address only (_on_node_address).
    transport: Literal["grpc", "ray"] = "grpc"
    encoder: EncoderOptions = Field(default_factory=EncoderOptions)
    index: DeploymentOptions = Field(default_factory=DeploymentOptions)
    metadata: DeploymentOptions = Field(default_factory=DeploymentOptions)
    frontend: DeploymentOptions = Field(default_factory=DeploymentOptions)
    # "cluster": refuse, before any replica starts, an app whose replicas the cluster's nodes
    # cannot hold (Serve would wait for them forever, /healthz unanswered). "none": leave it to
    # Ray, for a cluster whose autoscaler adds nodes on demand (KubeRay: cluster/k8s/).
    placement_check: Literal["cluster", "none"] = "cluster"

    @model_validator(mode="before")
    @classmethod
    def _json_from_the_command_line(cls, data: Any) -> Any:
        # `serve run serve.app:build_app indexes='{"text": ...}'` passes every value as a string:
        # the mappings come as JSON text.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in ("indexes", "encoder", "index", "metadata", "frontend"):
            if isinstance(data.get(name), str):
                try:
                    data[name] = json.loads(data[name])
                except ValueError as e:
                    raise ValueError(f"{name}: not a JSON object ({e}): {data[name]!r}") from e
        return data


# --------------------------------------------------------------------------------------------
# Deployments


def _bind_replica_grpc_to_node() -> None:
    """Make this replica's internal gRPC server listen on the node's address, not every interface.

    Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on ``[::]:0`` (all
    interfaces, no authentication, no setting to change it: ray-project/ray#64544). It starts it
    after the deployment's constructor, from ``ray.serve._private.replica``'s reference to
    ``add_port_to_grpc_server``, so each deployment's constructor calls this first
    (``_on_node_address``): the server then binds the address Ray's own servers bind (127.0.0.1
    on a local cluster, the pod's IP on Kubernetes, where other nodes must reach it). ``tests/test_serve.py`` checks every
    listening socket of a running deployment, so a Ray that moves the call fails there.
    """
    import ray
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "node_address", None):
        return
    host = ray.util.get_node_ip_address()
    host = f"[{host}]" if ":" in host else host

    def on_node_address(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return bind(server, address)

    on_node_address.node_address = host
    replica.add_port_to_grpc_server = on_node_address


def _on_node_address(cls):
    """Class decorator under every ``@serve.deployment`` of this app: the replica's constructor
    first rebinds its internal gRPC server (``_bind_replica_grpc_to_node``)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _bind_replica_grpc_to_node()
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


class BatchedEncoder:
    """The checkpoint's towers behind ``@serve.batch``: concurrent queries share one forward pass.

    Used inside the Frontend (``encoder.placement: ingress``) or as the ``QueryEncoder``
    deployment. The forward pass runs in a worker thread (torch releases the GIL), so the
    replica's event loop keeps taking requests, which queue into the next batch.
    """

    def __init__(self, checkpoint: str, s3_endpoint: str | None, max_batch_size: int, batch_wait_timeout_s: float):
        from dcgh_dist.models.encoder import Encoder

        self.encoder = Encoder.from_checkpoint(checkpoint, s3_endpoint=s3_endpoint)
        for method in (self.encode_text, self.encode_image):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # Each query: (packed code, error, its relaxed code as float16 bytes, for re-ranking).
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def encode_text(self, texts: list[str]) -> list[tuple[bytes, str, bytes]]:
        return _with_packed(await asyncio.to_thread(self.encoder.encode_texts, texts, packed=False))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def encode_image(self, images: list[bytes]) -> list[tuple[bytes, str, bytes]]:
        return _with_packed(await asyncio.to_thread(self.encoder.encode_images, images, packed=False))


def _with_packed(out) -> list[tuple[bytes, str, bytes]]:
    from dcgh_dist.codes import pack_relaxed

    packed = pack_relaxed(out.codes)  # the bit convention, as encode writes the database's codes
    relaxed = out.codes.astype(np.float16)
    return [(c.tobytes(), e, r.tobytes()) for c, e, r in zip(packed, out.errors, relaxed)]


@serve.deployment
@_on_node_address
class QueryEncoder(BatchedEncoder):
    """The batched towers as a deployment of their own (``encoder.placement: deployment``)."""

    def ready(self) -> bool:
        return True


@serve.deployment
@_on_node_address
class IndexShards:
    """The shards ``i % groups == group`` of one modality's index; the manifest in user_config."""

    def __init__(self, modality: str, group: int, groups: int, s3_endpoint: str | None, fingerprint: str,
                 bits: int):
        self.modality, self.group, self.groups, self.s3_endpoint = modality, group, groups, s3_endpoint
        self.fingerprint, self.bits = fingerprint, bits
        self.index = None
        self._lock = threading.Lock()

    def reconfigure(self, config: dict) -> None:
        from dcgh_dist.index import ShardedIndex, read_manifest

        uri = config["manifest"]
        manifest = read_manifest(uri, self.s3_endpoint)
        mine = [i for i in range(len(manifest.shards)) if i % self.groups == self.group]
        if not mine:
            raise ValueError(f"{uri}: {len(manifest.shards)} shards leave group {self.group} of {self.groups} "
                             "empty; rebuild with at least as many shards, or redeploy the application")
        # The encoder's model and bit width: a manifest of another model is refused, and the old
        # index keeps serving. verify="once": a replica restart, or another group on this node,
        # does not hash the same build's shards again.
        new = ShardedIndex.open(uri, s3_endpoint=self.s3_endpoint, expected_fingerprint=self.fingerprint,
                                expected_bits=self.bits, shards=mine, verify="once")
        with self._lock:
            old, self.index = self.index, new
        if old is not None:
            threading.Timer(RETIRE_AFTER_S, old.close).start()
        logger.info("%s group %d/%d: build %s, %d of %d shards, %d items", self.modality, self.group,
                    self.groups, manifest.build_id, len(mine), len(manifest.shards), new.ntotal)

    async def search(self, codes: bytes, k: int, flt: dict | None = None, relaxed: bytes | None = None) -> dict:
        index = self.index  # one reference for the whole query: an upgrade cannot switch it mid-way
        if index.threads == 1:
            # One search thread (a replica of one CPU or less; Serve's default is one): the scan
            # runs right here, on the replica's event loop. Serve would run a plain method in a
            # worker thread, which only adds a hop when the scans take turns on one CPU anyway:
            # ~1 ms of a 15 ms query over 10M codes on a 2-core node (docs/BENCHMARKS.md,
            # "Serving"). Queries beyond the running one wait in Serve's queue meanwhile.
            return self._search(index, codes, k, flt, relaxed)
        # More CPUs (ShardedIndex takes Ray's OMP_NUM_THREADS, the replica's num_cpus): each query
        # scans in a worker thread, so that as many run at once.
        return await asyncio.to_thread(self._search, index, codes, k, flt, relaxed)

    def _search(self, index, codes: bytes, k: int, flt: dict | None = None, relaxed: bytes | None = None) -> dict:
        from dcgh_dist.index.filters import SearchFilter

        q = np.frombuffer(codes, dtype=np.uint8).reshape(1, -1)
        try:
            search_filter = SearchFilter.of(**flt) if flt else None
            if search_filter is not None:
                search_filter.check(index.num_classes, "this index")
        except ValueError as e:  # the client's filter: answered as such, the replica serves on
            return {"error": str(e), "field": "filter", "build_id": index.manifest.build_id, "group": self.group}
        if relaxed is not None and not all(index.view(i).has_relaxed for i in range(len(index.manifest.shards))):
            return {"error": "this index stores no relaxed codes, so it cannot re-rank (encode with --relaxed and "
                             "rebuild it)", "field": "rerank", "build_id": index.manifest.build_id, "group": self.group}
        if index.ntotal == 0:
            return {"distances": [], "ids": [], "build_id": index.manifest.build_id, "group": self.group}
        D, I = index.search_stable(q, min(k, index.ntotal), filter=search_filter)
        keep = I[0] >= 0
        out = {"distances": D[0][keep].tolist(), "ids": I[0][keep].tolist(),
               "build_id": index.manifest.build_id, "group": self.group}
        if relaxed is not None:  # scores of this group's candidates; the Frontend re-ranks the merged top
            qr = np.frombuffer(relaxed, dtype=np.float16).astype(np.float32).reshape(1, -1)
            out["scores"] = index.relaxed_scores(qr, I[:, keep])[0].tolist()
        return out

    def info(self) -> dict:
        m = self.index.manifest
        return {"ntotal": self.index.ntotal, "build_id": m.build_id, "version": m.version,
                "num_classes": m.num_classes, "bits": m.bits,
                "model_fingerprint": m.model_fingerprint, "threads": self.index.threads}


@serve.deployment
@_on_node_address
class ItemLookup:
    def __init__(self, dataset: str, s3_endpoint: str | None):
        from serve.items import ItemStore

        self.store = ItemStore(dataset, s3_endpoint)

    def captions(self, ids: list[int]) -> list[str | None]:
        return self.store.captions(ids)

    def raw(self, modality: str, item_id: int) -> str | bytes | None:
        try:
            return self.store.caption(item_id) if modality == "text" else self.store.image(item_id)
        except KeyError:
            return None

    def thumbnail(self, item_id: int) -> bytes | None:
        try:
            return self.store.thumbnail(item_id)
        except KeyError:
            return None


# --------------------------------------------------------------------------------------------
# HTTP API


MAX_FILTER_IDS = 100_000
MAX_RERANK = 20


class SearchFilterBody(BaseModel):
    """Which items may be returned: labels including any of ``labels_any``, all of ``labels_all``
    (0-based class indices; needs an index built with --labels), ids in ``ids``. Every part given
    must hold."""

    model_config = ConfigDict(extra="forbid", strict=True)
    labels_any: list[int] | None = None
    labels_all: list[int] | None = None
    ids: list[int] | None = None


class SearchRequest(BaseModel):
    """Exactly one of ``text``, ``image`` (base64 of encoded image bytes) or ``id`` (with
    ``modality``: which item of that id)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str | None = None
    image: str | None = None
    id: int | None = None
    modality: Literal["image", "text"] | None = None
    k: int = 10
    target: Literal["image", "text"] | None = None  # default: the other modality
    filter: SearchFilterBody | None = None
    # Re-rank the Hamming top k x rerank by the relaxed codes (an index built from encode --relaxed).
    rerank: int | None = None


class SearchResult(BaseModel):
    id: int
    distance: int
    score: float | None = None  # with rerank: the relaxed inner product the results are ordered by
    caption: str | None = None
    image_url: str | None = None


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float
    model: str | None
    bits: int


class ApiError(Exception):
    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


api = FastAPI(title="dcgh-dist search", description="Cross-modal Hamming search over DCGH codes.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)


def _validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(422, field, f"{field or 'body'}: {first['msg']}")


@serve.deployment
@serve.ingress(api)
@_on_node_address
class Frontend:
    def __init__(self, encoder, groups: dict[str, list], items, settings: dict):
        # The transport is an option of each handle, fixed where the handle was made (the
        # controller, for bound handles), so RAY_SERVE_USE_GRPC_BY_DEFAULT in this replica's
        # environment would not reach them: set it on the handles this replica calls through.
        # (_by_reference is the handle option that variable sets; tests/test_serve.py runs both.)
        by_reference = settings["transport"] == "ray"

        def via(handle):
            return handle.options(_by_reference=by_reference)

        # encoder: a QueryEncoder handle, or BatchedEncoder's arguments to build it in this replica
        if isinstance(encoder, dict):
            # The towers load in a thread (torch and the checkpoint: seconds), so the replica is
            # up, and /healthz answers 503, meanwhile; a query waits for them (_codes).
            self._towers = concurrent.futures.ThreadPoolExecutor(1).submit(BatchedEncoder, **encoder)
            self._encode = {"text": lambda texts: self._local("encode_text", texts),
                            "image": lambda images: self._local("encode_image", images)}
            self._encoder_handle = None
        else:
            self._towers = None
            encoder = self._encoder_handle = via(encoder)
            self._encode = {"text": encoder.encode_text.remote, "image": encoder.encode_image.remote}
        self.groups = {m: [via(h) for h in handles] for m, handles in groups.items()}
        self.items = via(items) if items is not None else None
        self.s = settings
        self._ready = False

    async def _local(self, method: str, payload):
        encoder = await asyncio.wrap_future(self._towers)
        return await getattr(encoder, method)(payload)

    def check_health(self) -> None:
        # Serve calls this periodically: towers that failed to load fail the replica, which
        # Serve then replaces, instead of a replica that answers 503 forever.
        if self._towers is not None and self._towers.done():
            self._towers.result()

    # -- validation ---------------------------------------------------------------------------

    def _k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.s["max_k"]:
            raise ApiError(422, "k", f"k must be an integer in 1..{self.s['max_k']}, got {k!r}")
        return k

    def _target(self, target: str | None, source: str) -> str:
        target = target or ("image" if source == "text" else "text")
        if target not in MODALITIES:
            raise ApiError(422, "target", f"target must be 'image' or 'text', got {target!r}")
        if target not in self.groups:
            raise ApiError(400, "target", f"no {target} index is served")
        return target

    def _check_image(self, data: bytes, field: str) -> None:
        if len(data) > self.s["max_image_bytes"]:
            raise ApiError(413, field, f"{field}: {len(data)} bytes, more than the {self.s['max_image_bytes']} allowed")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                w, h = img.size
        except Image.DecompressionBombError as e:  # PIL's own cap, past twice MAX_IMAGE_PIXELS
            raise ApiError(413, field, f"{field}: {e}") from e
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ApiError(422, field, f"{field}: not an image ({e})") from e
        if w * h > self.s["max_image_pixels"]:
            raise ApiError(413, field, f"{field}: {w}x{h} pixels, more than the {self.s['max_image_pixels']} "
                                       "allowed (a decompression bomb?)")

    # -- the query path -----------------------------------------------------------------------

    async def _codes(self, modality: str, payload) -> tuple[bytes, bytes]:
        """(packed code, relaxed code as float16 bytes) of one query."""
        codes, error, relaxed = await self._encode[modality](payload)
        if error:
            raise ApiError(422, modality, error.split(": ", 1)[-1] if ": row id" in error else error)
        return codes, relaxed

    async def _search(self, codes: bytes, target: str, k: int, flt: dict | None = None,
                      rerank: tuple[int, bytes] | None = None) -> list[tuple]:
        """The merged top k as (distance, id[, score]). ``rerank``: (factor, the query's relaxed
        code): every group answers its Hamming top k x factor with scores; the merged top
        k x factor by (distance, id) is re-ordered by score (stable) and cut to k, which is
        ``ShardedIndex.search_reranked`` over the whole index."""
        handles = self.groups[target]
        kk, relaxed = (k * rerank[0], rerank[1]) if rerank else (k, None)
        replies = await asyncio.gather(*(h.search.remote(codes, kk, flt, relaxed) for h in handles),
                                       return_exceptions=True)
        failed = [g for g, r in enumerate(replies) if isinstance(r, BaseException)]
        if failed:
            for g in failed:
                logger.warning("%s index group %d failed: %r", target, g, replies[g])
            raise ApiError(503, None, f"{target} index shard group(s) {failed} of {len(handles)} did not answer; "
                                      "results would be incomplete")
        refused = [r for r in replies if "error" in r]
        if refused:
            raise ApiError(422, refused[0]["field"], refused[0]["error"])
        if relaxed is None:
            return sorted((d, i) for r in replies for d, i in zip(r["distances"], r["ids"]))[:k]
        merged = sorted((d, i, s) for r in replies for d, i, s in zip(r["distances"], r["ids"], r["scores"]))[:kk]
        return sorted(merged, key=lambda hit: -hit[2])[:k]

    async def _answer(self, codes: bytes, target: str, k: int, t0: float, flt: dict | None = None,
                      rerank: tuple[int, bytes] | None = None) -> dict:
        hits = await self._search(codes, target, k, flt, rerank)
        results = []
        captions = await self.items.captions.remote([h[1] for h in hits]) if self.items else [None] * len(hits)
        for hit, cap in zip(hits, captions):
            d, i = hit[0], hit[1]
            r = {"id": int(i), "distance": int(d)}
            if rerank:
                r["score"] = float(hit[2])
            if self.items is not None:
                r["caption"] = cap
                r["image_url"] = f"/items/{int(i)}/image"
            results.append(r)
        return {"results": results, "took_ms": round((time.perf_counter() - t0) * 1000, 3),
                "model": self.s["fingerprint"], "bits": self.s["bits"]}

    # -- routes -------------------------------------------------------------------------------

    @api.post("/search", response_model=SearchResponse, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": SearchRequest.model_json_schema()}}}})
    async def search(self, request: Request) -> dict:
        t0 = time.perf_counter()
        if not request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            raise ApiError(415, None, "send the query as JSON (Content-Type: application/json), or an "
                                      "image to /search/image as multipart/form-data")
        try:
            body = await request.json()
        except ValueError as e:
            raise ApiError(400, None, f"body is not valid JSON ({e})") from e
        if not isinstance(body, dict):
            raise ApiError(422, None, f"body must be a JSON object, got {type(body).__name__}")
        try:
            req = SearchRequest.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from e
        given = [f for f in ("text", "image", "id") if getattr(req, f) is not None]
        if len(given) != 1:
            raise ApiError(422, None, f"give exactly one of text, image, id (got {given or 'none'})")
        k = self._k(req.k)
        rerank = req.rerank
        if rerank is not None and not 1 <= rerank <= MAX_RERANK:
            raise ApiError(422, "rerank", f"rerank must be an integer in 1..{MAX_RERANK} (the Hamming top k x rerank "
                                          f"is re-ordered), got {rerank}")
        flt = None
        if req.filter is not None:
            flt = req.filter.model_dump(exclude_none=True) or None
            if len(flt.get("ids") or ()) > MAX_FILTER_IDS:
                raise ApiError(413, "filter", f"filter ids: {len(flt['ids'])} ids, more than the {MAX_FILTER_IDS} allowed")
        if req.text is not None:
            if not req.text.strip():
                raise ApiError(422, "text", "text is empty")
            if len(req.text) > self.s["max_text_chars"]:
                raise ApiError(413, "text", f"text has {len(req.text)} characters, more than {self.s['max_text_chars']}")
            target = self._target(req.target, "text")
            codes, relaxed = await self._codes("text", req.text)
        elif req.image is not None:
            if len(req.image) > 4 * math.ceil(self.s["max_image_bytes"] / 3) + 4:
                raise ApiError(413, "image", f"image is larger than the {self.s['max_image_bytes']} bytes allowed")
            try:
                data = base64.b64decode(req.image, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ApiError(422, "image", f"image is not valid base64 ({e})") from e
            self._check_image(data, "image")
            target = self._target(req.target, "image")
            codes, relaxed = await self._codes("image", data)
        else:
            if req.modality is None:
                raise ApiError(422, "modality", "a query by id needs modality: 'image' or 'text' (which item)")
            if self.items is None:
                raise ApiError(400, "id", "no dataset is configured: queries by id need one")
            raw = await self.items.raw.remote(req.modality, req.id)
            if raw is None:
                raise ApiError(404, "id", f"no {req.modality} item with id {req.id}")
            target = self._target(req.target, req.modality)
            codes, relaxed = await self._codes(req.modality, raw)
        return await self._answer(codes, target, k, t0, flt, (rerank, relaxed) if rerank else None)

    @api.post("/search/image", response_model=SearchResponse)
    async def search_image(self, file: UploadFile = File(...), k: int = Form(10),
                           target: str | None = Form(None)) -> dict:
        t0 = time.perf_counter()
        data = await file.read(self.s["max_image_bytes"] + 1)
        self._check_image(data, "file")
        target = self._target(target, "image")
        codes, _ = await self._codes("image", data)
        return await self._answer(codes, target, self._k(k), t0)

    @api.get("/items/{item_id}/image", responses={200: {"content": {"image/jpeg": {}}}})
    async def item_image(self, item_id: int) -> Response:
        if self.items is None:
            raise ApiError(404, "id", "no dataset is configured")
        data = await self.items.thumbnail.remote(item_id)
        if data is None:
            raise ApiError(404, "id", f"no image with id {item_id}")
        return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @api.get("/healthz")
    async def healthz(self) -> Any:
        # 503 until every deployment a query needs has answered once, each asked with a short
        # timeout: a probe gets its answer within about a second, never a held connection.
        if not self._ready:
            waiting = await self._not_ready()
            if waiting:
                return JSONResponse({"status": "starting", "waiting_for": waiting}, status_code=503)
            self._ready = True
        return {"status": "ok"}

    async def _not_ready(self) -> list[str]:
        towers = [] if self._towers is None or self._towers.done() else ["encoder (loading the towers)"]
        probes = {f"IndexShards-{m}-{g}": h.info.remote() for m, hs in self.groups.items() for g, h in enumerate(hs)}
        if self.items is not None:
            probes["ItemLookup"] = self.items.captions.remote([])
        if self._encoder_handle is not None:
            probes["QueryEncoder"] = self._encoder_handle.ready.remote()

        async def answers(response) -> bool:
            try:
                await asyncio.wait_for(response, HEALTH_PROBE_S)
                return True
            except Exception:  # not started yet, or failed: either way not ready
                response.cancel()
                return False

        done = await asyncio.gather(*(answers(r) for r in probes.values()))
        return towers + [name for name, ok in zip(probes, done) if not ok]

    @api.get("/info")
    async def info(self) -> dict:
        indexes = {}
        for m, handles in self.groups.items():
            parts = await asyncio.gather(*(h.info.remote() for h in handles))
            indexes[m] = {"size": sum(p["ntotal"] for p in parts), "build_id": sorted({p["build_id"] for p in parts}),
                          "version": sorted({p["version"] for p in parts}),
                          "labels": sorted({p["num_classes"] is not None for p in parts}) == [True],
                          "groups": len(parts)}
        return {"model": self.s["fingerprint"], "bits": self.s["bits"], "indexes": indexes,
                "max_k": self.s["max_k"], "dataset": self.items is not None}

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(os.path.join(STATIC, "index.html"))

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> FileResponse:
        # Only the page's own files, by name: never a path from the request.
        files = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in files:
            raise ApiError(404, None, "not found")
        return FileResponse(os.path.join(STATIC, name), media_type=files[name])


# --------------------------------------------------------------------------------------------
# The builder


def build_app(args: AppArgs) -> Application:
    """Check everything a deployment needs before any replica starts, then bind the graph."""
    from dcgh_dist.index import read_manifest
    from dcgh_dist.models.checkpoint import verified_meta

    meta = verified_meta(args.checkpoint, args.s3_endpoint)
    if not args.indexes:
        raise ValueError("indexes: give at least one of image, text (manifest URIs)")
    enc = args.encoder
    ingress = enc.placement == "ingress"
    sizes: dict[str, dict[str, Any]] = {}  # deployment name -> its .options()
    group_counts = {}
    for modality, uri in args.indexes.items():
        manifest = read_manifest(uri, args.s3_endpoint)
        if manifest.model_fingerprint != meta.fingerprint:
            raise ValueError(
                f"indexes.{modality}: {uri} was built from codes of model {manifest.model_fingerprint}, "
                f"not of the checkpoint's {meta.fingerprint}; re-encode and rebuild it with this checkpoint"
            )
        if manifest.bits != meta.config.model.bits:
            raise ValueError(f"indexes.{modality}: {manifest.bits}-bit codes, the checkpoint makes "
                             f"{meta.config.model.bits}")
        group_counts[modality] = n = max(1, math.ceil(len(manifest.shards) / args.shards_per_replica))
        for g in range(n):
            sizes[f"IndexShards-{modality}-{g}"] = args.index.options(DEFAULT_CPUS["index"])
    dataset = None
    if args.dataset is not None:
        from dataclasses import replace

        from dcgh_dist.data.presets import resolve_dataset

        dataset = resolve_dataset(replace(meta.config.data, dataset=args.dataset, s3_endpoint=args.s3_endpoint))
        sizes["ItemLookup"] = args.metadata.options(DEFAULT_CPUS["metadata"])
    if not ingress:
        sizes["QueryEncoder"] = enc.options(DEFAULT_CPUS["encoder"])
    sizes["Frontend"] = args.frontend.options(DEFAULT_CPUS["frontend+encoder" if ingress else "frontend"])
    if args.placement_check == "cluster":
        check_placement(sizes)

    groups = {
        modality: [IndexShards.options(name=f"IndexShards-{modality}-{g}", **sizes[f"IndexShards-{modality}-{g}"],
                                       user_config={"manifest": args.indexes[modality]})
                   .bind(modality, g, n, args.s3_endpoint, meta.fingerprint, meta.config.model.bits)
                   for g in range(n)]
        for modality, n in group_counts.items()
    }
    items = ItemLookup.options(**sizes["ItemLookup"]).bind(dataset, args.s3_endpoint) if dataset else None
    encoder = {"checkpoint": args.checkpoint, "s3_endpoint": args.s3_endpoint, "max_batch_size": enc.max_batch_size,
               "batch_wait_timeout_s": enc.batch_wait_timeout_s}
    if not ingress:
        encoder = QueryEncoder.options(**sizes["QueryEncoder"]).bind(**encoder)
    settings = {"max_k": args.max_k, "max_text_chars": args.max_text_chars, "max_image_bytes": args.max_image_bytes,
                "max_image_pixels": args.max_image_pixels, "fingerprint": meta.fingerprint,
                "bits": meta.config.model.bits, "transport": args.transport}
    return Frontend.options(**sizes["Frontend"]).bind(encoder, groups, items, settings)


def _replicas_at_start(options: dict[str, Any]) -> int:
    auto = options.get("autoscaling_config")
    if auto is not None:
        return int(auto.get("initial_replicas") or auto.get("min_replicas", 1))
    n = options["num_replicas"]
    return 1 if n == "auto" else int(n)  # "auto" alone: Serve's autoscaling from one replica


def check_placement(sizes: dict[str, dict[str, Any]], nodes: list[dict[str, float]] | None = None) -> None:
    """Refuse an application whose replicas, as they start, cannot all be placed on the cluster's
    nodes (``nodes``: each alive node's resources; the connected cluster's when None).

    Serve would otherwise wait for them forever, logging every 30 s. Placement is checked the
    way Ray places actors, replica by replica on the node with the most room left (largest first),
    so it is exact for this app alone on the cluster; what other jobs hold is not counted.
    """
    if nodes is None:
        import ray

        if not ray.is_initialized():  # `serve run module:app` builds the app before it starts Ray
            logger.info("placement not checked: not connected to Ray yet")
            return
        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    def need_of(options: dict[str, Any]) -> dict[str, float]:
        actor = options.get("ray_actor_options", {})
        return {"CPU": float(actor.get("num_cpus") or 0), "GPU": float(actor.get("num_gpus") or 0)}

    replicas = [(name, need_of(o)) for name, o in sizes.items() for _ in range(_replicas_at_start(o))]
    free = [{r: float(n.get(r, 0.0)) for r in ("CPU", "GPU")} for n in nodes]
    unplaced = []
    for name, need in sorted(replicas, key=lambda r: (-r[1]["GPU"], -r[1]["CPU"])):
        fits = [n for n in free if all(n[r] + 1e-9 >= need[r] for r in need)]
        if not fits:
            unplaced.append(name)
            continue
        node = max(fits, key=lambda n: (n["CPU"], n["GPU"]))
        for r in need:
            node[r] -= need[r]
    if not unplaced:
        return

    def amount(need: dict[str, float]) -> str:
        return " + ".join(f"{v:g} {r}" for r, v in need.items() if v) or "0 CPU"

    asked = ", ".join(f"{name} {_replicas_at_start(o)} x {amount(need_of(o))}" for name, o in sizes.items())
    total = {r: sum(float(n.get(r, 0.0)) for n in nodes) for r in ("CPU", "GPU")}
    raise ValueError(
        f"the cluster cannot place this application: its deployments ask for {asked}, in all "
        f"{amount({r: sum(v[r] for _, v in replicas) for r in ('CPU', 'GPU')})}; the cluster has "
        f"{amount(total)} on {len(nodes)} node(s), and {', '.join(sorted(set(unplaced)))} would wait for room "
        "forever. Give the deployments fewer CPUs (args frontend/index/metadata/encoder: num_cpus), "
        "fewer index groups (shards_per_replica), or more nodes; or placement_check: none where an "
        "autoscaler adds nodes on demand"
    )
