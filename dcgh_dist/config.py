"""One typed configuration tree for every job.

The tree is made of frozen dataclasses so that a resolved config can be hashed, compared and saved
verbatim inside every checkpoint and index manifest. It is built in layers, later layers winning:

    defaults (the DCGH authors' setting) -> dataset preset -> YAML file -> ``key=value`` overrides

Overrides use dotted paths (``optim.head_lr=3e-4``, ``model.bits=32``); values are parsed as YAML
scalars and checked against the field's type, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

VALID_BITS = (16, 32, 64, 128)


@dataclass(frozen=True)
class ModelConfig:
    # "auto": follow the dataset (dataset.json's image_features/text_features columns -> "features",
    # image/text -> "clip"). Set explicitly, a family that does not fit the dataset is an error
    # before Ray starts. Checkpoints and manifests always record the resolved family.
    family: Literal["auto", "clip", "features"] = "auto"
    # clip family: a size preset from dcgh_dist.models.towers.CLIP_PRESETS
    clip_preset: str = "vit-b-32"
    # Local Hugging Face CLIP directory or OpenAI-format ``.pt`` file; None = random init.
    pretrained: str | None = None
    # What stays frozen: "none", "towers" (train the hash heads only), "image", "text".
    freeze: Literal["none", "towers", "image", "text"] = "none"
    # Code length. A list (`model.bits=[16,32,64]`) trains one hash head (and DCGH's class
    # proxies, or DAPH's stage-1 code layers and class net) per length on the same towers in one
    # run, the loss summed over lengths (``loss.bits_weights``): the first is the primary length (what
    # validation, serving and `--bits`-less encoding use), the others land in ``extra_bits``.
    bits: int = 64
    extra_bits: tuple[int, ...] = ()
    hash_dropout: float = 0.2  # the authors' LinearHash uses Dropout(0.2) before tanh
    image_size: int | None = None  # None = the preset's size
    context_length: int = 32  # the authors' max_words
    # features family: MLP widths over precomputed vectors (input sizes come from the dataset)
    feature_hidden: tuple[int, ...] = (1024,)
    feature_dropout: float = 0.1

    @property
    def lengths(self) -> tuple[int, ...]:
        """Every code length the model hashes to, the primary first."""
        return (self.bits, *self.extra_bits)


@dataclass(frozen=True)
class LossConfig:
    # Defaults reproduce HyP.forward of the authors' code: total = proxy terms + 0.8 * n2n
    # + 0.05 * p2p + variance.
    proxy_weight: float = 1.0
    pairwise_pos_weight: float = 0.05
    pairwise_neg_weight: float = 0.8
    variance_weight: float = 1.0
    variance_mode: Literal["reference", "masked"] = "reference"
    # Several code lengths (model.extra_bits; DCGH and both DAPH stages): the loss is the weighted sum over lengths, one
    # weight per length in the order [bits, *extra_bits]; empty = 1 each.
    bits_weights: tuple[float, ...] = ()
    # "global": pair terms between the local batch and codes gathered from all workers;
    # "local": each worker only sees its own batch (for comparison).
    gather: Literal["global", "local"] = "global"
    # Proxies: initialised as the reference (kaiming-normal fan_out, then tanh, seeded) and
    # optimised by their own SGD.
    proxy_seed: int = 0
    proxy_lr: float = 0.02
    proxy_momentum: float = 0.9
    proxy_weight_decay: float = 5e-4


@dataclass(frozen=True)
class OptimConfig:
    tower_lr: float = 1e-5  # CLIP towers (pretrained): the authors' clip_lr
    head_lr: float = 1e-3  # hash heads (and feature MLPs)
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_fraction: float = 0.1
    schedule: Literal["warmup_cosine", "constant"] = "warmup_cosine"
    max_grad_norm: float = 1.0
    # "linear": multiply both learning rates by num_workers (global batch grows with workers);
    # "sqrt": by its square root (the gentler rule for Adam-style optimizers); "none": keep them.
    # See docs/TRAINING.md.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"


@dataclass(frozen=True)
class DataConfig:
    # "demo", a preset name (coco, ...), a local directory or an s3:// prefix.
    dataset: str = "demo"
    batch_size: int = 128  # per worker
    augment: bool = True
    # Streaming shuffle: block order is randomised every epoch and rows are mixed in a local
    # buffer, so the dataset never has to fit in memory. 0 disables the local buffer.
    shuffle_buffer: int = 2048
    # Size of the generated demo dataset (only used when dataset == "demo").
    demo_size: int = 4000
    demo_seed: int = 0
    # Where generated/prepared datasets live; None = $DCGH_DATA_ROOT or ~/.cache/dcgh_dist.
    data_root: str | None = None
    # The S3-compatible endpoint (MinIO, moto, ...) of every s3:// URI a job reads or writes
    # (datasets, checkpoints, codes, indexes, outputs): the one key, `--s3-endpoint` of every job.
    # None = AWS's own resolution.
    s3_endpoint: str | None = None
    # A training split whose preprocessed rows fit this many bytes is read once and kept in Ray's
    # object store: every epoch then draws a fresh global permutation of it, sharded across the
    # workers, with no pipeline start-up. Larger splits, and image splits with per-epoch
    # augmentation, stream. 0 = always stream.
    cache_bytes: int = 2 << 30


@dataclass(frozen=True)
class TrainConfig:
    # dcgh: the DCGH loss (proxies, pairs, variance); daph: DAPH's two stages (see ``daph``).
    method: Literal["dcgh", "daph"] = "dcgh"
    # An upper bound: with a val split, training stops once val mAP has not improved for
    # ``patience`` evaluations (0 = never stop early), and the best-val checkpoint is exported.
    epochs: int = 100
    patience: int = 10
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # torch's intra-op threads in each worker. None = the node's cores shared by the workers on it
    # (dcgh_dist.train.loop.worker_threads): Ray sets OMP_NUM_THREADS to a worker's CPU request
    # (1 by default), which left a lone CPU worker on one thread of a 2-core machine.
    torch_threads: int | None = None
    output_dir: str = "runs/latest"
    # Where Ray Train writes reported checkpoints: a local/shared path or s3:// URI.
    # None = <output_dir>/ray_results.
    storage_path: str | None = None
    # The run's directory under storage_path. None = a new name for every fresh run
    # (<dataset>-<UTC time>-<random>), so runs sharing a storage path never touch each other's
    # files; --resume finds the name in <output_dir>/run.json.
    run_name: str | None = None
    log_every: int = 20
    select_on_val: bool = True
    # "ddp": torch DistributedDataParallel; "deepspeed": deepspeed.initialize with a config
    # generated from this one (ZeRO stage, precision, accumulation, clipping, schedule).
    engine: Literal["ddp", "deepspeed"] = "ddp"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 2  # deepspeed only: 0-3
    grad_accum_steps: int = 1
    # Also checkpoint every N optimizer steps inside an epoch (0 = at epoch ends only).
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2  # best-by-val ones; the latest is always kept as well
    max_failures: int = 0  # Ray Train restarts the worker group from the latest checkpoint
    # How often Ray Train's controller collects the workers' reports. Every epoch-end report waits
    # for the next collection, so Ray's default (2 s) adds up to 2 s to every epoch: most of an
    # epoch of a small feature dataset. An exported RAY_TRAIN_HEALTH_CHECK_INTERVAL_S wins.
    report_interval_s: float = 0.25


@dataclass(frozen=True)
class EvalConfig:
    ndcg_k: int = 1000
    precision_k: tuple[int, ...] = (1, 10, 100, 1000)
    map_topk: int | None = None  # None = mAP over the whole retrieval database
    batch_size: int = 256
    pr_curve: bool = True


@dataclass(frozen=True)
class EncodeConfig:
    """``jobs/encode.py``: how items are hashed into code shards; saved in ``encode.json`` and in
    every code shard."""

    batch_size: int = 256  # rows per model call
    concurrency: int = 1  # model actors (one per GPU on a GPU cluster)
    actor_cpus: float = 1.0  # CPUs (= torch threads) per CPU actor
    preprocess_batch_size: int = 64  # rows per decode/tokenize task batch
    preprocess_cpus: float = 1.0  # CPUs per decode/tokenize task
    use_gpu: bool | None = None  # None: GPU actors when the cluster has GPUs
    # auto: bf16 on GPU when a calibration batch agrees with fp32 on >= bf16_min_agreement of
    # the bits, fp32 otherwise and on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    bf16_min_agreement: float = 0.999
    splits: tuple[str, ...] | None = None  # None: every row
    bits: int | None = None  # which code length of a multi-length checkpoint; None: its primary one
    relaxed: bool = False  # also store the tanh outputs (float16) in the code shards, for re-ranking
    throttle_s: float = 0.0  # testing aid: the driver sleeps this long per batch

    def __post_init__(self):
        for name in ("batch_size", "concurrency", "preprocess_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"encode.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class PrepareConfig:
    """``jobs/prepare_data.py``: how a raw benchmark tree becomes a dataset (docs/PREPARE_DATA.md)."""

    layout: Literal["auto", "raw", "list"] = "auto"
    seed: int = 0  # split seed
    query: int | None = None  # split sizes; None = the preset's (the paper's)
    val: int | None = None  # None = half the query size, carved from the non-query rows
    train: int | None = None
    shard_bytes: int = 256 << 20  # target shard size
    row_group_bytes: int | None = None  # None = min(64 MiB, shard_bytes)
    max_side: int | None = None  # shrink larger images to this side and re-encode as JPEG
    jpeg_quality: int = 90
    workers: int | None = None  # image worker processes; None = cores - 1 (at least 1); 0 = in-process
    chunk_size: int = 32  # images per worker task
    max_image_errors: float = 0.05  # stop past this fraction of unusable images (or broken metadata)
    coco_captions: Literal["first", "join", "all"] = "first"
    nus_text: Literal["auto", "alltags", "tags1k"] = "auto"
    top_k: int | None = None  # NUS-WIDE: the k most frequent concepts; None = the preset's
    min_tag_images: int = 20  # MIRFLICKR: tag vocabulary = tags of at least this many images


INDEX_TYPES = ("flat", "ivf", "multihash")


@dataclass(frozen=True)
class IndexConfig:
    """How ``jobs/build_index.py`` builds an index; saved verbatim in the manifest.

    * ``flat``: ``IndexBinaryFlat``, exact k-NN and radius search, N x K/8 bytes, every query scans
      everything. Fits up to a few hundred million codes per machine, and evaluation.
    * ``ivf``: ``IndexBinaryIVF`` with ``nlist`` lists, ``nprobe`` searched; trained once on
      ``train_size`` codes sampled from all shards, shared by every shard. Approximate, fast at
      large N; ids stored in the lists (+8 bytes/item).
    * ``multihash``: ``IndexBinaryMultiHash`` with ``mh_nhash`` hash tables over substrings of
      ``mh_bits_per_hash`` bits, ``mh_nflip`` flips probed. Radius search is exact up to
      ``nhash * (nflip + 1) - 1`` (pigeonhole); k-NN is approximate. For "everything within r bits"
      queries with small r.
    """

    index_type: Literal["flat", "ivf", "multihash"] = "flat"
    shard_size: int = 10_000_000
    nlist: int = 1024
    nprobe: int = 16
    train_size: int | None = None  # None = 64 * nlist (FAISS wants >= 39 per centroid)
    mh_nhash: int | None = None  # None = bits // 16
    mh_bits_per_hash: int | None = None  # None = bits // mh_nhash
    mh_nflip: int = 1
    seed: int = 0
    task_cpus: float = 1.0  # CPUs per Ray build task (FAISS threads inside it)
    # Builds whose shards a rebuild keeps: the new one and keep_builds - 1 before it, so a server
    # still holding the previous manifest keeps working until it reloads.
    keep_builds: int = 2

    def __post_init__(self):
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index.index_type must be one of {list(INDEX_TYPES)}, got {self.index_type!r}")
        for name in ("shard_size", "nlist", "nprobe", "keep_builds"):
            if getattr(self, name) < 1:
                raise ValueError(f"index.{name} must be >= 1, got {getattr(self, name)}")
        if self.mh_nflip < 0:
            raise ValueError(f"index.mh_nflip must be >= 0, got {self.mh_nflip}")

    def multihash_params(self, bits: int) -> tuple[int, int, int]:
        """(nhash, bits per hash, nflip) resolved for a bit width; checked against it."""
        nhash = self.mh_nhash or max(1, bits // 16)
        b = self.mh_bits_per_hash or bits // nhash
        if nhash * b > bits or b < 1 or b > 64:
            raise ValueError(
                f"multihash: {nhash} hashes x {b} bits do not fit in {bits}-bit codes "
                "(need nhash * bits_per_hash <= bits, 1 <= bits_per_hash <= 64)"
            )
        return nhash, b, self.mh_nflip

    def exact_radius(self, bits: int) -> int | None:
        """Largest radius whose range search is exact; None = any radius (flat)."""
        if self.index_type == "flat":
            return None
        if self.index_type == "multihash":
            nhash, _, nflip = self.multihash_params(bits)
            return nhash * (nflip + 1) - 1
        return -1  # ivf: never guaranteed


DAPH_POSITIVE_RULES = ("exact", "superset")


@dataclass(frozen=True)
class DAPHConfig:
    """DAPH (SIGIR 2023) loss settings (``dcgh_dist/losses/daph.py``). The defaults are the
    authors' command-line defaults; see ``tests/data/golden/DAPH.md`` §1.3 and §2.3."""

    gamma: float = 20.0  # scale of the softmax-like terms (the reference parses it as an int)
    sigma: float = 0.2  # margin subtracted from the positive similarity
    alpha: float = 0.2  # stage 1: bit-balance weight
    beta: float = 0.2  # stage 1: quantisation weight (the paper writes 1; the code uses beta)
    eta: float = 1.0  # stage 2: weight of the partial-positive terms (the paper's L_similar)
    eps: float = 1e-5
    # Stage-2 positive anchors: "exact" = identical label sets, "superset" = the anchor holds
    # every label of the row. The reference's image epochs use exact, its text epochs superset.
    positive_rule_image: Literal["exact", "superset"] = "exact"
    positive_rule_text: Literal["exact", "superset"] = "superset"
    # Which stages `jobs/train.py --method daph` runs: "1" the proxy network (writes the proxy
    # codes), "2" the hashing networks (reads them), "all" both.
    stage: Literal["1", "2", "all"] = "all"
    # Stage 1 has no label-free validation (its nets take labels), so it runs a fixed number of
    # epochs; stage 2 follows train.epochs / train.patience like DCGH.
    proxy_epochs: int = 30
    # The stage-1 proxy codes stage 2 trains against; None = <train.output_dir>/daph_proxy_codes.npz.
    proxy_codes: str | None = None
    # Parity switches with the authors' code (DAPH.md §4.4, §4.5); the defaults are the sensible
    # ones: train every layer, and write the proxy codes in eval mode.
    freeze_reference_layers: bool = False
    proxy_codes_train_mode: bool = False

    def __post_init__(self):
        if not 0 < self.gamma < float("inf"):
            raise ValueError(f"daph.gamma must be a finite number > 0, got {self.gamma}")
        if not -float("inf") < self.sigma < float("inf"):
            raise ValueError(f"daph.sigma must be finite, got {self.sigma}")
        for name in ("alpha", "beta", "eta"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"daph.{name} must be a finite weight >= 0, got {getattr(self, name)}")
        # eps > 0: it keeps log(r + eps) and the stage-2 guard finite when exp() underflows.
        if not 0 < self.eps < 1:
            raise ValueError(f"daph.eps must be in (0, 1), got {self.eps}")
        if self.proxy_epochs < 1:
            raise ValueError(f"daph.proxy_epochs must be >= 1, got {self.proxy_epochs}")
        for name in ("positive_rule_image", "positive_rule_text"):
            if getattr(self, name) not in DAPH_POSITIVE_RULES:
                raise ValueError(
                    f"daph.{name} must be one of {list(DAPH_POSITIVE_RULES)}, got {getattr(self, name)!r}"
                )


@dataclass(frozen=True)
class RayConfig:
    """The Ray cluster every job runs on (``--ray-address``, ``--num-cpus``, ``--ray-temp-dir``)."""

    # None = join RAY_ADDRESS if set (as inside `ray job submit`), else start a local cluster.
    address: str | None = None
    # Logical CPUs of a *local* cluster; None = max(4, os.cpu_count()). More logical CPUs than
    # cores keeps Ray Data from being starved by the training workers on small machines.
    num_cpus: int | None = None
    # The session directory of a local cluster; None = Ray's default.
    temp_dir: str | None = None


# Keys that moved, as (old dotted key, new dotted key): files written before the move (the config
# inside a checkpoint's meta.json, a code shard or an index manifest) still load.
MOVED_KEYS = (("train.ray_address", "ray.address"), ("train.ray_num_cpus", "ray.num_cpus"))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    daph: DAPHConfig = field(default_factory=DAPHConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        return _from_plain(cls, _moved(data), "")

    def validate(self) -> "Config":
        lengths = self.model.lengths
        for b in lengths:
            if b not in VALID_BITS:
                raise ValueError(f"model.bits must be one of {VALID_BITS} (or a list of them), got {b}")
        if len(set(lengths)) != len(lengths):
            raise ValueError(f"model.bits lists a length twice: {list(lengths)}")
        if self.loss.bits_weights and len(self.loss.bits_weights) != len(lengths):
            raise ValueError(f"loss.bits_weights has {len(self.loss.bits_weights)} weights for "
                             f"{len(lengths)} code lengths {list(lengths)}")
        if self.data.batch_size < 2:
            raise ValueError("data.batch_size must be >= 2: the pairwise terms need pairs")
        if self.train.epochs < 1:
            raise ValueError("train.epochs must be >= 1")
        if self.train.patience < 0:
            raise ValueError("train.patience must be >= 0 (0 = no early stopping)")
        if self.data.cache_bytes < 0:
            raise ValueError("data.cache_bytes must be >= 0 (0 = always stream)")
        if self.train.num_workers < 1:
            raise ValueError("train.num_workers must be >= 1")
        if not 0 <= self.train.zero_stage <= 3:
            raise ValueError("train.zero_stage must be 0..3")
        if self.train.grad_accum_steps < 1:
            raise ValueError("train.grad_accum_steps must be >= 1")
        if self.train.engine == "ddp" and self.train.precision == "fp16":
            raise ValueError("train.precision=fp16 needs train.engine=deepspeed (loss scaling); use bf16 with ddp")
        name = self.train.run_name
        if name is not None and not _RUN_NAME.fullmatch(name):
            raise ValueError(
                f"train.run_name must be one path component of letters, digits, '.', '_' or '-' "
                f"(not starting with '.'), got {name!r}"
            )
        return self


# A run name becomes a directory under the storage path: one safe component, never '..'.
_RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


# --------------------------------------------------------------------------------------------
# Plain-dict conversion with type checking


def _moved(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` with every key of MOVED_KEYS at its new place (a value there already wins)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for old, new in MOVED_KEYS:
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = out.get(old_section)
        if isinstance(section, dict) and old_key in section:
            value = section.pop(old_key)
            target = out.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(new_key, value)
    return out


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; error names the config key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"config {where or 'root'}: expected a mapping, got {value!r}")
        return _from_plain(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"config {where}: {value!r} does not fit {tp}")
    if origin is Literal:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in args:
            value = str(value)  # `daph.stage=1` parses as the YAML integer 1
        if value not in args:
            raise ValueError(f"config {where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"config {where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"config {where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"config {where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as e:
            raise ValueError(f"config {where}: expected an integer, got {value!r}") from e
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"config {where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config {where}: expected a number, got {value!r}") from e
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"config {where}: expected a string, got {value!r}")
        return str(value)
    return value


def config_section(cls: type, data: Mapping[str, Any], prefix: str):
    """One section of the tree (e.g. ``IndexConfig`` from a manifest's ``index``), type-checked
    and coerced like the whole tree; errors name ``prefix.key``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config {prefix}: expected a mapping, got {data!r}")
    return _from_plain(cls, data, prefix)


def _from_plain(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    def path(key: str) -> str:  # the dotted name a user types: model.bits
        return f"{prefix}.{key}" if prefix else key

    if cls is ModelConfig and isinstance(data.get("bits"), (list, tuple)):
        # model.bits=[16,32,64]: the first is the primary length, the rest extra heads
        lengths = list(data["bits"])
        if not lengths:
            raise ValueError("config model.bits: an empty list of code lengths")
        data = {**data, "bits": lengths[0], "extra_bits": lengths[1:]}
    unknown = set(data) - names
    if unknown:
        raise ValueError(
            f"unknown config key(s) {sorted(path(k) for k in unknown)}; "
            f"valid keys under '{prefix or 'root'}': {sorted(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, path(k)) for k, v in data.items()}
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.head_lr=3e-4", "model.bits=32"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.strip().split(".")
        cur = nested
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return nested


def load_config(
    yaml_path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    preset: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build a validated config: defaults <- preset <- YAML file <- flags <- overrides.

    ``flags``: what a job's named options set (``--bits 32`` -> ``{"model": {"bits": 32}}``);
    ``overrides``: ``section.key=value`` strings (or the nested mapping they parse to)."""
    merged = Config().to_dict()
    if preset:
        merged = _deep_merge(merged, preset)
    if yaml_path is not None:
        with open(yaml_path) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{yaml_path}: not valid YAML ({e})".replace("\n", " ")) from e
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{yaml_path}: top level must be a mapping of sections")
        merged = _deep_merge(merged, loaded)
    if flags:
        merged = _deep_merge(merged, flags)
    if overrides:
        ov = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
        merged = _deep_merge(merged, ov)
    return Config.from_dict(merged).validate()
