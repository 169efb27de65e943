"""Finished training runs, read and checked before a report compares them.

A finished run is the ``--output-dir`` of ``jobs/train.py``: ``metrics.json`` (written last, so its
presence marks a finished run), ``config.yaml``, ``checkpoint/``. One run holds one entry per bit
length: its metrics.json at ``model.bits``, or, for a run that trains several lengths, each
``"by_bits": {"16": {...}, "32": {...}}`` value (a full metrics dict of that length).

Runs are grouped by what they trained, not by how they were launched: runs whose configs are equal
except for ``train.seed`` (and the keys of :data:`NOT_THE_EXPERIMENT`) are seeds of one experiment;
runs of one method that differ in anything else are separate experiments, each labelled by the
keys in which they differ (``dcgh (loss.variance_weight=0.0)``). Two runs of one experiment with
the same seed are refused: averaging them would count one result twice.

Runs are only comparable when they were evaluated on the same rows: :func:`check_comparable`
refuses any two that differ in dataset URI, dataset.json name or number of classes, query or
database size, or in a fingerprint of dataset.json and the split counts, and names both runs and
every difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from dcgh_dist.data.format import INFO_FILE, SPLITS, DATABASE_SPLITS
from dcgh_dist.storage import display, exists, join, read_text, resolve_filesystem

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "dcgh"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
# Where a run keeps the checkpoint of one bit length, first match wins; each candidate's
# meta.json must say that length (a single-length run has just checkpoint/).
CHECKPOINT_CANDIDATES = ("checkpoint/{bits}", "checkpoints/{bits}", "checkpoint-{bits}", "checkpoint_{bits}",
                         "checkpoint")


class RunError(ValueError):
    """A run directory that cannot go into a report, or runs that cannot be compared."""


@dataclass
class Entry:
    """One bit length of one run: its metrics dict exactly as metrics.json holds it."""

    bits: int
    metrics: dict[str, Any]
    checkpoint: str | None  # checkpoint directory of this length, None when the run has none

    @property
    def untrained(self) -> dict[str, Any] | None:
        return self.metrics.get("untrained") or None

    @property
    def linear(self) -> dict[str, Any] | None:
        return self.metrics.get("linear") or None

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.metrics.get("history") or [])


@dataclass
class Run:
    path: str  # as given on the command line: what messages and the report call it
    uri: str  # resolved (absolute local path or s3://...)
    method: str
    seed: int
    config: dict[str, Any]
    metrics: dict[str, Any]
    entries: dict[int, Entry]
    dataset_uri: str
    # dataset.json as the run's checkpoint recorded it (None without a checkpoint)
    recorded_info: dict[str, Any] | None = None
    selected_epoch: int | None = None
    # metrics.json's "variant" (jobs/ablate.py writes it): the run's row is labelled by it, apart
    # from the method's other runs; None: the row is the method's
    variant: str | None = None
    # the keys in which this run's experiment differs from the method's others, e.g.
    # "loss.variance_weight=0.0" (label_experiments sets it); None: the method has one experiment
    differs: str | None = None

    @property
    def name(self) -> str:
        return self.path.rstrip("/")

    @property
    def label(self) -> str:
        """What the table's method column shows for this run: its variant, else its method and
        the keys its experiment differs in."""
        if self.variant:
            return self.variant
        return f"{self.method} ({self.differs})" if self.differs else self.method

    @property
    def experiment(self) -> dict[str, Any]:
        """The resolved config as dotted keys, less what does not change what a run learns."""
        return {k: v for k, v in _flatten(self.config).items() if k not in NOT_THE_EXPERIMENT}


@dataclass(frozen=True)
class DatasetIdentity:
    """What decides whether two runs were scored on the same rows."""

    uri: str
    name: str | None
    num_classes: int | None
    num_query: int | None
    num_database: int | None
    fingerprint: str | None = None  # sha256 of dataset.json + split counts (None: not read)
    split_counts: dict[str, int] = field(default_factory=dict, compare=False, hash=False)


# Config keys that say where a run ran or wrote, or how often it logged, not what it trained; and
# the ones a report compares on its own (the seed; model.bits is the table's bits column; the
# dataset is checked by check_comparable, by content). Sections a training run does not use
# (encode, index, prepare) are left out whole.
NOT_THE_EXPERIMENT = frozenset({
    "train.seed", "model.bits", "data.dataset", "data.data_root", "data.s3_endpoint", "data.cache_bytes",
    "train.output_dir", "train.storage_path", "train.run_name",
    "train.log_every", "train.report_interval_s", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.max_failures", "eval.batch_size",
})
_NOT_TRAINING_SECTIONS = ("encode", "index", "prepare", "ray")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not prefix and key in _NOT_TRAINING_SECTIONS:
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


def label_experiments(runs: Sequence[Run]) -> None:
    """Set each run's ``differs`` from the keys in which its experiment differs from the other
    experiments of its method; refuse two runs of one experiment with the same seed."""
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    for method_runs in by_method.values():
        experiments = [r.experiment for r in method_runs]
        keys = sorted({k for e in experiments for k in e})
        differing = [k for k in keys if len({_value_text(e.get(k, "<unset>")) for e in experiments}) > 1]
        seen: dict[tuple, Run] = {}
        for run, exp in zip(method_runs, experiments):
            run.differs = ", ".join(f"{k}={_value_text(exp.get(k))}" for k in differing) or None
            # the recorded dataset is part of the key: two runs scored on different rows are not one
            # result counted twice, and check_comparable names what differs between them
            key = (run.variant, run.differs, tuple(sorted(run.entries)), run.seed, recorded_identity(run))
            if key in seen:
                raise RunError(
                    f"runs {seen[key].name} and {run.name} have the same config and the same seed "
                    f"({run.seed}): the report averages over seeds, and these would count one result twice; "
                    "give one of them, or train the other with another train.seed"
                )
            seen[key] = run


def _load_json(fs, path: str, where: str) -> Any:
    try:
        return json.loads(read_text(fs, path))
    except json.JSONDecodeError as e:
        raise RunError(f"{where}: not valid JSON ({e})") from e


def _dig(tree: dict | None, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_method(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """metrics.json's ``"method"``, else config ``train.method``, else ``dcgh``."""
    return str(metrics.get("method") or _dig(config, "train.method") or DEFAULT_METHOD)


def _normalise_uri(uri: str) -> str:
    if uri.startswith("s3://"):
        return uri.rstrip("/")
    return resolve_filesystem(uri)[1].rstrip("/") or "/"


def load_run(path: str, s3_endpoint: str | None = None) -> Run:
    """Read one finished run; a RunError says what is missing or malformed, and where."""
    import yaml

    fs, root = resolve_filesystem(path, s3_endpoint)
    from pyarrow.fs import FileType

    kind = fs.get_file_info(root).type
    if kind == FileType.NotFound and not path.startswith("s3://"):
        raise RunError(f"{path}: no such directory")
    if kind == FileType.File:
        raise RunError(f"{path}: is a file; give a run directory (the --output-dir of jobs/train.py)")
    metrics_path = join(root, METRICS_FILE)
    if not exists(fs, metrics_path):
        raise RunError(
            f"{path}: not a finished training run: no {METRICS_FILE} (jobs/train.py writes it last, "
            "so a run that is still going or was interrupted has none)"
        )
    metrics = _load_json(fs, metrics_path, display(fs, metrics_path))
    if not isinstance(metrics, dict):
        raise RunError(f"{display(fs, metrics_path)}: expected a JSON object")

    config: dict[str, Any] = {}
    recorded_info = None
    config_path = join(root, CONFIG_FILE)
    if exists(fs, config_path):
        try:
            config = yaml.safe_load(read_text(fs, config_path)) or {}
        except yaml.YAMLError as e:
            raise RunError(f"{display(fs, config_path)}: not valid YAML ({e})") from e
    meta_path = join(root, "checkpoint", "meta.json")
    if exists(fs, meta_path):
        meta = _load_json(fs, meta_path, display(fs, meta_path))
        recorded_info = meta.get("dataset_info")
        if not config:
            config = meta.get("config") or {}
    if not config:
        raise RunError(f"{path}: has neither {CONFIG_FILE} nor checkpoint/meta.json: its bit length is unknown")

    dataset = metrics.get("dataset")
    if not dataset:
        raise RunError(f"{display(fs, metrics_path)}: no \"dataset\" key: which dataset was this run evaluated on?")

    uri = display(fs, root)
    if "by_bits" in metrics:
        by_bits = metrics["by_bits"]
        if not isinstance(by_bits, dict) or not by_bits:
            raise RunError(f"{display(fs, metrics_path)}: \"by_bits\" must map bit lengths to metrics")
        raw = {}
        for key, value in by_bits.items():
            try:
                raw[int(key)] = value
            except ValueError as e:
                raise RunError(f"{display(fs, metrics_path)}: by_bits key {key!r} is not a bit length") from e
    else:
        bits = _dig(config, "model.bits")
        if bits is None:
            raise RunError(f"{path}: config has no model.bits")
        raw = {int(bits): metrics}
    entries = {}
    for bits, m in sorted(raw.items()):
        if not isinstance(m, dict) or not any(k.startswith("map") for k in m):
            raise RunError(f"{display(fs, metrics_path)}: the {bits}-bit metrics hold no mAP (map_i2t, ...)")
        entries[bits] = Entry(bits, m, find_checkpoint(fs, root, bits))
    seed = _dig(config, "train.seed")
    return Run(path=path, uri=uri, method=run_method(metrics, config), seed=int(seed if seed is not None else 0),
               config=config, metrics=metrics, entries=entries, dataset_uri=_normalise_uri(str(dataset)),
               recorded_info=recorded_info, selected_epoch=metrics.get("selected_epoch"),
               variant=str(metrics["variant"]) if metrics.get("variant") else None)


def find_checkpoint(fs, root: str, bits: int) -> str | None:
    """The run's checkpoint directory for ``bits`` (see CHECKPOINT_CANDIDATES), or None."""
    for pattern in CHECKPOINT_CANDIDATES:
        ckpt = join(root, pattern.format(bits=bits))
        meta_path = join(ckpt, "meta.json")
        if not exists(fs, meta_path):
            continue
        try:
            meta = json.loads(read_text(fs, meta_path))
        except json.JSONDecodeError:
            continue
        lengths = [_dig(meta.get("config"), "model.bits"), *(_dig(meta.get("config"), "model.extra_bits") or ())]
        if bits in lengths:  # a multi-length checkpoint holds a head per length
            return display(fs, ckpt)
    return None


def load_runs(paths: Sequence[str], s3_endpoint: str | None = None) -> list[Run]:
    if not paths:
        raise RunError("no runs given")
    runs, seen = [], {}
    for p in paths:
        run = load_run(p, s3_endpoint)
        if run.uri in seen:
            raise RunError(f"{p}: given twice (also as {seen[run.uri]})")
        seen[run.uri] = p
        runs.append(run)
    label_experiments(runs)
    return runs


# --------------------------------------------------------------------------------------------
# Same dataset, same splits


def _entry_counts(run: Run) -> tuple[int | None, int | None]:
    """(num_query, num_database) of the run; every bit length of a run must agree."""
    counts = {(e.metrics.get("num_query"), e.metrics.get("num_database")) for e in run.entries.values()}
    if len(counts) > 1:
        raise RunError(f"{run.name}: its bit lengths were evaluated on different splits "
                       f"(num_query, num_database) {sorted(counts, key=str)}")
    return next(iter(counts))


def recorded_identity(run: Run) -> DatasetIdentity:
    """The identity from the run's own files alone (metrics.json, checkpoint meta): no dataset read."""
    info = run.recorded_info or {}
    nq, nd = _entry_counts(run)
    return DatasetIdentity(run.dataset_uri, info.get("name"), info.get("num_classes"), nq, nd)


def dataset_identity(uri: str, s3_endpoint: str | None = None) -> DatasetIdentity:
    """The identity of the dataset as it is now: dataset.json and the split counts (one pass
    over the light columns, ``scan_dataset``)."""
    from dcgh_dist.data.format import scan_dataset

    scan = scan_dataset(uri, s3_endpoint, check_ids=False)
    fs, root = resolve_filesystem(uri, s3_endpoint)
    info_text = read_text(fs, join(root, INFO_FILE))
    counts = {s: int(scan.split_counts.get(s, 0)) for s in SPLITS}
    digest = hashlib.sha256(info_text.encode() + b"\n" + json.dumps(counts, sort_keys=True).encode()).hexdigest()
    return DatasetIdentity(
        uri, scan.info.name, scan.info.num_classes, counts["query"],
        sum(counts[s] for s in DATABASE_SPLITS), digest[:16], counts,
    )


_FIELDS = (("uri", "dataset URI"), ("name", "dataset.json name"), ("num_classes", "dataset.json num_classes"),
           ("num_query", "num_query"), ("num_database", "num_database"),
           ("fingerprint", "fingerprint of dataset.json + split counts"))


def differences(a: DatasetIdentity, b: DatasetIdentity, *, location: bool = True) -> dict[str, str]:
    """``{"num_query": "num_query 693 vs 80", ...}`` for every field known on both sides that
    differs; ``location=False`` leaves the URI out (a copy elsewhere is the same dataset)."""
    out = {}
    for attr, label in _FIELDS:
        va, vb = getattr(a, attr), getattr(b, attr)
        if va is not None and vb is not None and va != vb and (location or attr != "uri"):
            out[attr] = f"{label} {va} vs {vb}"
    return out


def check_comparable(runs: Sequence[Run], s3_endpoint: str | None = None) -> tuple[DatasetIdentity, list[str]]:
    """(the identity every run shares, notes for the report), or a RunError naming two runs and
    what differs.

    First from the runs' own files (cheap: no dataset is read), then from the datasets as they
    are now: each must still have the splits its run was scored on. Runs whose datasets sit at
    different URIs are compared by content (fingerprint of dataset.json + split counts): a copy
    of the same dataset is the same dataset.
    """
    current: dict[str, DatasetIdentity] = {}

    def now(run: Run) -> DatasetIdentity:
        if run.dataset_uri not in current:
            try:
                current[run.dataset_uri] = dataset_identity(run.dataset_uri, s3_endpoint)
            except (ValueError, OSError) as e:
                raise RunError(f"the dataset of run {run.name} ({run.dataset_uri}) cannot be read, and the "
                               f"report re-encodes it for its curves and maps: {e}") from e
        return current[run.dataset_uri]

    def refuse(a: Run, b: Run, diff: dict[str, str]) -> RunError:
        # What the datasets say now, where they can be read, completes what the runs recorded.
        try:
            diff = {**differences(now(a), now(b)), **diff}
        except RunError:
            pass
        order = [attr for attr, _ in _FIELDS]
        return RunError(f"runs {a.name} and {b.name} were evaluated on different datasets or splits: "
                        + "; ".join(diff[k] for k in sorted(diff, key=order.index)))

    first, notes = runs[0], []
    ref = recorded_identity(first)
    for run in runs[1:]:
        diff = differences(ref, recorded_identity(run))
        if set(diff) - {"uri"}:
            raise refuse(first, run, diff)
        if diff:  # only the location differs: compare what is there
            if differences(now(first), now(run), location=False):
                raise refuse(first, run, diff)
            note = f"{run.dataset_uri} (run {run.name}) holds the same dataset as {first.dataset_uri}"
            if note not in notes:
                notes.append(note)
    # Each run's recorded counts against its dataset as it is now (it may have been rewritten).
    for run in runs:
        diff = differences(recorded_identity(run), now(run), location=False)
        if diff:
            raise RunError(f"the dataset at {run.dataset_uri} has changed since run {run.name} was evaluated "
                           "on it (run vs now): " + "; ".join(diff.values()))
    return now(first), notes
