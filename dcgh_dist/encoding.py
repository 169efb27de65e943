"""The encoding job's library part: dataset -> code shards, streaming, resumable, exactly-once.

Pipeline (Ray Data, streaming; the dataset is never held in memory)::

    read_parquet(pending input files, needed columns, include_paths)      CPU tasks
      -> [filter split]                                                    CPU tasks
      -> preprocess: decode + resize / tokenize, bad rows marked          CPU tasks
      -> CodeEncoder: the model, packs codes (bit = relaxed >= 0)         actor pool (GPU or CPU)
      -> driver: groups rows by input file; a file's shard is written     driver
         once all its rows are in (good rows -> codes, bad -> skip list)

Output layout under ``--output`` (local or ``s3://``)::

    encode.json                      the plan (inputs, model, settings), then the summary
    image/part-00012.parquet         codes of input file #12 (id int64, code fixed_size_binary)
    text/part-00012.parquet
    skipped/image/part-00012.parquet rows of file #12 whose image could not be encoded (id, error)

Resumable and exactly-once: input file #i (in sorted order) maps to ``part-{i:05d}.parquet`` of
each modality. A shard is written only when every row of its input file has come back, and
atomically (temp + rename locally; one PUT on S3), after its skip list; so a shard that exists is
complete. A re-run skips input files whose shards all exist and redoes the others. The run ends
with a check, per input file, that the ids of its code shard plus its skip list are exactly the
input ids, each once, and that no id appears in two files' outputs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dcgh_dist.data.format import (
    INFO_FILE,
    DatasetError,
    DatasetInfo,
    join,
    list_data_files,
    read_dataset_info,
    read_text,
    resolve_filesystem,
    write_text_atomic,
)
from dcgh_dist.index.codes import (
    code_shard_meta,
    codes_table,
    pack_relaxed,
    read_code_meta,
    table_to_bytes,
)

logger = logging.getLogger(__name__)

PLAN_FILE = "encode.json"
PLAN_FORMAT = "dcgh-dist-encode-v1"
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class EncodeConfig:
    """Settings of an encoding run; saved in ``encode.json`` and in every code shard."""

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
    throttle_s: float = 0.0  # testing aid: the driver sleeps this long per batch

    def __post_init__(self):
        if self.batch_size < 1 or self.concurrency < 1 or self.preprocess_batch_size < 1:
            raise ValueError("encode batch_size, concurrency and preprocess_batch_size must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"encode precision must be auto, fp32 or bf16, got {self.precision!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncodeConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown encode config key(s) {sorted(unknown)}; valid: {sorted(names)}")
        d = dict(d)
        if d.get("splits") is not None:
            d["splits"] = tuple(d["splits"])
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class EncodeInput:
    uri: str
    info: DatasetInfo
    files: list[str]  # filesystem paths, sorted; file #i -> part-{i:05d}
    project_format: bool  # dataset.json present


def resolve_input(uri: str, s3_endpoint: str | None = None) -> EncodeInput:
    """A dataset in the project's format, or plain Parquet (a file or a directory/prefix of
    files) with ``id`` and an ``image``/``text`` (or ``*_features``) column."""
    fs, root = resolve_filesystem(uri, s3_endpoint)
    if root.endswith(".parquet"):
        if fs.get_file_info(root).type != pafs.FileType.File:
            raise DatasetError(f"{uri}: no such Parquet file")
        files = [root]
    else:
        files = list_data_files(uri, s3_endpoint)
    if not root.endswith(".parquet") and fs.get_file_info(join(root, INFO_FILE)).type == pafs.FileType.File:
        return EncodeInput(uri, read_dataset_info(uri, s3_endpoint), files, True)
    schema = pq.read_schema(files[0], filesystem=fs)
    names = set(schema.names)
    if "id" not in names:
        raise DatasetError(f"{files[0]}: plain Parquet input needs an 'id' column, has {schema.names}")
    image = "image" if "image" in names else "image_features" if "image_features" in names else None
    text = "text" if "text" in names else "text_features" if "text_features" in names else None
    if image is None and text is None:
        raise DatasetError(
            f"{files[0]}: plain Parquet input needs an image column ('image' bytes or "
            f"'image_features') or a text column ('text' or 'text_features'); has {schema.names}"
        )
    info = DatasetInfo(
        name=os.path.basename(root.rstrip("/")) or "parquet", num_classes=1, class_names=("unlabelled",),
        image_column=image or "image", text_column=text or "text",
        extra={"plain_parquet": True, "has_image": image is not None, "has_text": text is not None},
    )
    return EncodeInput(uri, info, files, False)


def _count_rows(fs: pafs.FileSystem, path: str, splits: Sequence[str] | None, where: str) -> int:
    if splits is None:
        return pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    try:
        col = pq.read_table(path, filesystem=fs, columns=["split"]).column("split")
    except (KeyError, pa.ArrowInvalid) as e:
        raise DatasetError(f"{where}: --splits needs a 'split' column ({e})") from e
    return int(pc.sum(pc.is_in(col, value_set=pa.array(list(splits)))).as_py() or 0)


# --------------------------------------------------------------------------------------------
# The model actor


def encode_relaxed(model, modality: str, x, precision: str):
    """Relaxed codes (float32 tensor) of one modality, in fp32 or under bf16 autocast."""
    import torch

    fn = model.encode_image if modality == "image" else model.encode_text
    with torch.no_grad():
        if precision == "bf16":
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                return fn(x).float()
        return fn(x).float()


def bit_agreement(model, modality: str, x) -> float:
    """Share of bits on which bf16 autocast agrees with fp32 for these inputs (measured)."""
    a = encode_relaxed(model, modality, x, "fp32").cpu().numpy() >= 0
    b = encode_relaxed(model, modality, x, "bf16").cpu().numpy() >= 0
    return float((a == b).mean())


class CodeEncoder:
    """Ray Data actor: preprocessed batch -> packed codes per modality.

    Loads the model once, from the checkpoint's bytes, verified. Rows whose
    ``<modality>_error`` is non-empty are not run through the model; their code bytes are zero and
    the error travels on, so the driver can count and report them.
    """

    def __init__(
        self,
        checkpoint_ref: list,
        modalities: tuple[str, ...],
        precision: str,
        device: str,
        cpu_threads: int,
    ):
        import ray
        import torch

        from dcgh_dist.train.checkpoint import model_from_files

        files = ray.get(checkpoint_ref[0]) if isinstance(checkpoint_ref[0], ray.ObjectRef) else checkpoint_ref[0]
        if device == "cpu":
            torch.set_num_threads(max(1, cpu_threads))
        self.device = torch.device(device)
        # From the bytes in the object store: no per-actor copy of the checkpoint on disk.
        self.model, _ = model_from_files(files, device=self.device)
        self.modalities = modalities
        self.precision = precision
        self.nbytes = self.model.bits // 8

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["id"])
        out: dict[str, np.ndarray] = {"id": batch["id"], "path": batch["path"]}
        for mod in self.modalities:
            key = self.model.image_key if mod == "image" else self.model.text_key
            errors = np.asarray(batch[f"{mod}_error"], dtype=object)
            ok = errors == ""
            codes = np.zeros((n, self.nbytes), dtype=np.uint8)
            if ok.any():
                x = torch.as_tensor(np.asarray(batch[key])[ok]).to(self.device)
                codes[ok] = pack_relaxed(encode_relaxed(self.model, mod, x, self.precision).cpu().numpy())
            out[f"{mod}_code"] = codes
            out[f"{mod}_error"] = errors
        return out


def encode_preprocessor(cfg, info: DatasetInfo, modalities: tuple[str, ...], image_size: int | None = None):
    """The training-time eval preprocessing (same resize, normalisation, tokenizer), in skip mode
    and without labels."""
    from dcgh_dist.data.pipeline import image_size_for, make_preprocessor
    from dcgh_dist.data.preprocess import BatchPreprocessor

    base = make_preprocessor(cfg, info, augment=False, modalities=modalities,
                             image_size=image_size or image_size_for(cfg))
    return BatchPreprocessor(
        info, image_size=base.image_size, context_length=base.context_length, augment=False,
        tokenizer_dir=base.tokenizer_dir, modalities=modalities, on_error="skip", with_labels=False,
    )


def _batch_bytes(pre, modalities: Sequence[str], rows: int) -> int:
    """Memory of a decode/tokenize worker: ~400 MiB of baseline (Python, pyarrow, PIL, the
    tokenizer; measured by Ray's memory issue detector) plus two preprocessed batches (float32
    pixels, int64 tokens)."""
    per_row = 0
    if "image" in modalities:
        per_row += 3 * pre.image_size * pre.image_size * 4
    if "text" in modalities:
        per_row += pre.context_length * 8
    return (400 << 20) + 2 * rows * per_row


class _Preprocess:
    """BatchPreprocessor in skip mode, keeping the ``path`` column (the driver groups by it)."""

    def __init__(self, pre):
        self.pre = pre

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.pre(batch)
        out["path"] = batch["path"]
        return out


# --------------------------------------------------------------------------------------------
# The driver


@dataclass
class _Pending:
    expected: int
    ids: list[np.ndarray] = field(default_factory=list)
    codes: dict[str, list[np.ndarray]] = field(default_factory=dict)
    errors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    received: int = 0


@dataclass
class EncodeResult:
    output_uri: str
    modalities: tuple[str, ...]
    input_rows: int
    encoded: dict[str, int]
    skipped: dict[str, int]
    files_total: int
    files_done_before: int
    files_encoded_now: int
    precision: str
    bf16_agreement: dict[str, float] | None
    seconds: float
    skipped_examples: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:  # S3: a PUT is atomic
        with fs.open_output_stream(path) as f:
            f.write(data)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def run_encode(
    checkpoint_dir: str,
    dataset_uri: str,
    output_uri: str,
    modalities: Sequence[str],
    cfg: EncodeConfig = EncodeConfig(),
    *,
    s3_endpoint: str | None = None,
) -> EncodeResult:
    """Encode ``dataset_uri`` with the checkpoint into code shards under ``output_uri``.

    Ray must be initialised (the job does it). Safe to re-run after a crash: finished shards are
    kept, unfinished input files are encoded again, and the exactly-once check runs at the end.
    """
    import ray
    import ray.data

    from dcgh_dist.train.checkpoint import read_checkpoint_files, verify_files

    t0 = time.time()
    modalities = tuple(m for m in MODALITIES if m in modalities)
    if not modalities:
        raise ValueError("modality must be image, text or both")
    ckpt_files = read_checkpoint_files(checkpoint_dir)
    meta = verify_files(ckpt_files)  # weights match the fingerprint stamped on every code
    mcfg = meta.config
    bits = mcfg.model.bits
    inp = resolve_input(dataset_uri, s3_endpoint)
    info = _check_columns(inp, meta, modalities)

    in_fs, _ = resolve_filesystem(dataset_uri, s3_endpoint)
    out_fs, out_root = resolve_filesystem(output_uri, s3_endpoint)

    def where(path: str) -> str:
        return f"s3://{path}" if dataset_uri.startswith("s3://") else path

    with ThreadPoolExecutor(16) as pool:
        expected = list(pool.map(lambda p: _count_rows(in_fs, p, cfg.splits, where(p)), inp.files))
    plan = {
        "format": PLAN_FORMAT,
        "dataset": dataset_uri,
        "files": [where(p) for p in inp.files],
        "rows": expected,
        "modalities": list(modalities),
        "splits": list(cfg.splits) if cfg.splits is not None else None,
        "bits": bits,
        "model_fingerprint": meta.fingerprint,
        "checkpoint": os.path.abspath(checkpoint_dir),
    }
    _check_or_write_plan(out_fs, out_root, output_uri, plan, cfg)

    # Which input files still need work: any requested modality's shard missing.
    done = [all(_exists(out_fs, join(out_root, m, shard_name(i))) for m in modalities)
            for i in range(len(inp.files))]
    pending = [i for i, d in enumerate(done) if not d]
    n_before = len(inp.files) - len(pending)
    logger.info("%s: %d input files (%d rows); %d already encoded, %d to do", dataset_uri,
                len(inp.files), sum(expected), n_before, len(pending))
    shard_meta = {
        m: code_shard_meta(bits, meta.fingerprint, m, config=mcfg.to_dict(),
                           encode=_jsonable(asdict(cfg)), checkpoint=os.path.abspath(checkpoint_dir))
        for m in modalities
    }

    def flush(i: int, state: _Pending) -> None:
        ids = np.concatenate(state.ids) if state.ids else np.zeros(0, np.int64)
        if len(np.unique(ids)) != len(ids):
            raise DatasetError(f"{where(inp.files[i])}: an id appears twice in this file")
        order = np.argsort(ids, kind="stable")
        for m in modalities:
            code_path = join(out_root, m, shard_name(i))
            if _exists(out_fs, code_path):
                continue  # finished by an earlier run (a crash between two modalities)
            codes = (np.concatenate(state.codes[m]) if state.ids else np.zeros((0, bits // 8), np.uint8))[order]
            errors = (np.concatenate(state.errors[m]) if state.ids else np.zeros(0, object))[order]
            bad = errors != ""
            skip_path = join(out_root, "skipped", m, shard_name(i))
            if bad.any():
                # Written before the code shard: a code shard that exists implies its skip list does.
                skipped = pa.table({"id": pa.array(ids[order][bad], pa.int64()),
                                    "error": pa.array([str(e) for e in errors[bad]], pa.string())})
                _write_bytes_atomic(out_fs, skip_path, _table_bytes(skipped))
            table = codes_table(ids[order][~bad], codes[~bad], {
                **shard_meta[m], "input_file": where(inp.files[i]), "input_rows": state.expected,
                "skipped": int(bad.sum())})
            _write_bytes_atomic(out_fs, code_path, table_to_bytes(table))

    # Files with nothing to encode never show up in the stream.
    for i in pending:
        if expected[i] == 0:
            flush(i, _Pending(0))
    pending = [i for i in pending if expected[i] > 0]

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    precision, agreement = "fp32", None
    if pending:
        precision, agreement = _choose_precision(cfg, use_gpu, ckpt_files, inp, info, mcfg, meta,
                                                 modalities, pending, s3_endpoint)
        ckpt_ref = ray.put(ckpt_files)
        columns = ["id"] + (["split"] if cfg.splits is not None else [])
        columns += [info.image_column] if "image" in modalities else []
        columns += [info.text_column] if "text" in modalities else []
        from dcgh_dist.data.pipeline import read_parquet

        ds = read_parquet([inp.files[i] for i in pending], filesystem=in_fs, columns=columns,
                          include_paths=True)
        if cfg.splits is not None:
            from ray.data.expressions import col

            ds = ds.filter(expr=col("split").is_in(list(cfg.splits)))
        pre = encode_preprocessor(mcfg, info, modalities, _image_size(meta))
        # Reserving the memory of a decoded batch is a real hint for the scheduler, and it makes
        # this step's remote args differ from the model actors': Ray Data would otherwise fuse
        # the two (it fuses a task map into a following actor map with equal resources), and
        # decoding would then scale with the number of actors instead of the cluster's CPUs.
        ds = ds.map_batches(_Preprocess(pre), batch_format="numpy", batch_size=cfg.preprocess_batch_size,
                            num_cpus=cfg.preprocess_cpus,
                            memory=_batch_bytes(pre, modalities, cfg.preprocess_batch_size))
        ds = ds.map_batches(
            CodeEncoder,
            fn_constructor_args=([ckpt_ref], modalities, precision, "cuda" if use_gpu else "cpu",
                                 int(max(1, cfg.actor_cpus))),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_gpus=1 if use_gpu else 0,
            num_cpus=None if use_gpu else cfg.actor_cpus,
        )
        _consume(ds, inp, pending, expected, modalities, flush, cfg, where)

    result_counts = verify_exactly_once(
        dataset_uri, output_uri, inp.files, modalities, cfg.splits, s3_endpoint, meta.fingerprint
    )
    examples = {m: _skip_examples(out_fs, out_root, m, len(inp.files)) if result_counts["skipped"][m] else []
                for m in modalities}
    result = EncodeResult(
        output_uri=output_uri, modalities=modalities, input_rows=result_counts["input_rows"],
        encoded=result_counts["encoded"], skipped=result_counts["skipped"],
        files_total=len(inp.files), files_done_before=n_before, files_encoded_now=len(inp.files) - n_before,
        precision=precision, bf16_agreement=agreement, seconds=round(time.time() - t0, 3),
        skipped_examples=examples,
    )
    write_text_atomic(out_fs, join(out_root, PLAN_FILE), json.dumps(
        {**plan, "status": "complete", "encode_config": _jsonable(asdict(cfg)), "result": result.to_dict()},
        indent=2))
    return result


def _consume(ds, inp: EncodeInput, pending, expected, modalities, flush, cfg: EncodeConfig, where) -> None:
    """Drain the stream on the driver: group rows by input file, write each file's shards once
    all its rows arrived. Only codes (K/8 bytes + id per row) travel here, never payloads."""
    index_of = {p: i for i, p in enumerate(inp.files)}
    states = {i: _Pending(expected[i]) for i in pending}
    total = sum(expected[i] for i in pending)
    seen = files_done = 0
    t0 = last_log = time.time()
    for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        paths = np.asarray(batch["path"], dtype=object)
        for path in np.unique(paths):
            i = index_of.get(str(path))
            if i is None or i not in states:
                raise RuntimeError(f"encoding stream returned rows of an unexpected file {path!r}")
            sel = paths == path
            st = states[i]
            st.ids.append(np.asarray(batch["id"], dtype=np.int64)[sel])
            for m in modalities:
                st.codes.setdefault(m, []).append(np.asarray(batch[f"{m}_code"])[sel])
                st.errors.setdefault(m, []).append(np.asarray(batch[f"{m}_error"], dtype=object)[sel])
            st.received += int(sel.sum())
            seen += int(sel.sum())
            if st.received > st.expected:
                raise RuntimeError(
                    f"{where(inp.files[i])}: {st.received} rows came back for {st.expected} expected "
                    "(a row was delivered twice); nothing was written for this file"
                )
            if st.received == st.expected:
                flush(i, st)
                del states[i]
                files_done += 1
        now = time.time()
        if now - last_log > 10 or not states:
            rate = seen / max(now - t0, 1e-9)
            logger.info("encoded %d/%d rows, %d/%d files (%.1f rows/s)", seen, total, files_done,
                        len(pending), rate)
            last_log = now
        if cfg.throttle_s:
            time.sleep(cfg.throttle_s)
    if states:
        short = ", ".join(f"{where(inp.files[i])} ({s.received}/{s.expected})" for i, s in list(states.items())[:5])
        raise RuntimeError(f"the stream ended before {len(states)} file(s) were complete: {short}")


def _check_columns(inp: EncodeInput, meta, modalities) -> DatasetInfo:
    """The input must hold the form of each modality the model takes (bytes/text for CLIP
    towers, feature vectors for feature towers)."""
    from dataclasses import replace

    info = inp.info
    family = meta.config.model.family
    want = {"image": "image" if family == "clip" else "image_features",
            "text": "text" if family == "clip" else "text_features"}
    have = {"image": info.image_column, "text": info.text_column}
    for m in modalities:
        present = info.extra.get(f"has_{m}", True) if not inp.project_format else True
        if not present or have[m] != want[m]:
            raise DatasetError(
                f"{inp.uri}: the checkpoint's {family} model encodes {m} from column {want[m]!r}, "
                f"but the input has {have[m] if present else 'no ' + m + ' column'}"
            )
    if family == "features":
        info = replace(info, image_feature_dim=meta.dataset_info.image_feature_dim,
                       text_feature_dim=meta.dataset_info.text_feature_dim)
    return info


def _image_size(meta) -> int | None:
    vision = (meta.architecture or {}).get("vision") or {}
    return int(vision["image_size"]) if "image_size" in vision else None


def _choose_precision(cfg, use_gpu, ckpt_files, inp, info, mcfg, meta, modalities, pending, s3_endpoint):
    """fp32 or bf16, with the measured bf16/fp32 bit agreement when bf16 was considered."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and not use_gpu):
        return "fp32", None
    import ray

    task = ray.remote(num_gpus=1 if use_gpu else 0)(_calibrate)
    agreement = ray.get(task.remote(ckpt_files, inp.uri, inp.files[pending[0]], info.to_json(),
                                    mcfg.to_dict(), _image_size(meta), modalities, s3_endpoint,
                                    "cuda" if use_gpu else "cpu"))
    worst = min(agreement.values())
    if cfg.precision == "bf16" or worst >= cfg.bf16_min_agreement:
        logger.info("precision bf16: bit agreement with fp32 %s", agreement)
        return "bf16", agreement
    logger.info("precision fp32: bf16 agrees with fp32 on only %s of the bits (< %s)", agreement,
                cfg.bf16_min_agreement)
    return "fp32", agreement


def _calibrate(ckpt_files, uri, path, info_json, cfg_dict, image_size, modalities, s3_endpoint, device,
               rows: int = 256) -> dict[str, float]:
    """Measure bf16-vs-fp32 bit agreement on the first ``rows`` good rows of one input file."""
    import torch

    from dcgh_dist.config import Config
    from dcgh_dist.train.checkpoint import model_from_files

    cfg = Config.from_dict(cfg_dict)
    info = DatasetInfo.from_json(info_json)
    fs, _ = resolve_filesystem(uri, s3_endpoint)
    cols = ["id"] + [info.image_column] * ("image" in modalities) + [info.text_column] * ("text" in modalities)
    table = pq.ParquetFile(path, filesystem=fs).read_row_group(0, columns=cols).slice(0, rows)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in cols}
    x = encode_preprocessor(cfg, info, tuple(modalities), image_size)(batch)
    model, _ = model_from_files(ckpt_files, device=device)
    out = {}
    for m in modalities:
        key = model.image_key if m == "image" else model.text_key
        ok = x[f"{m}_error"] == ""
        out[m] = bit_agreement(model, m, torch.as_tensor(x[key][ok]).to(device)) if ok.any() else 1.0
    return out


def _check_or_write_plan(fs, root: str, uri: str, plan: dict, cfg: EncodeConfig) -> None:
    path = join(root, PLAN_FILE)
    if _exists(fs, path):
        old = json.loads(read_text(fs, path))
        keys = ("files", "rows", "modalities", "splits", "bits", "model_fingerprint")
        diff = [k for k in keys if old.get(k) != plan.get(k)]
        if diff:
            raise ValueError(
                f"{uri} holds an encoding of other inputs or another model (differs in {diff}); "
                "use a new --output, or delete that directory to start over"
            )
        logger.info("%s: resuming an earlier run (status %s)", uri, old.get("status", "running"))
        return
    fs.create_dir(root, recursive=True)
    write_text_atomic(fs, path, json.dumps({**plan, "status": "running",
                                            "encode_config": _jsonable(asdict(cfg))}, indent=2))


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def _table_bytes(table: pa.Table) -> bytes:
    import io

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _skip_examples(fs, root: str, modality: str, n_files: int, limit: int = 5) -> list[str]:
    out: list[str] = []
    for i in range(n_files):
        path = join(root, "skipped", modality, shard_name(i))
        if _exists(fs, path):
            out += pq.read_table(path, filesystem=fs, columns=["error"]).column("error").to_pylist()
            if len(out) >= limit:
                break
    return out[:limit]


# --------------------------------------------------------------------------------------------
# Exactly-once verification


def _verify_file(dataset_uri, output_uri, i, path, modalities, splits, s3_endpoint, fingerprint):
    """Check one input file against its outputs; returns counts and id ranges per modality."""
    in_fs, _ = resolve_filesystem(dataset_uri, s3_endpoint)
    out_fs, out_root = resolve_filesystem(output_uri, s3_endpoint)
    cols = ["id"] + (["split"] if splits is not None else [])
    table = pq.read_table(path, filesystem=in_fs, columns=cols)
    ids = table.column("id").to_numpy()
    if splits is not None:
        keep = pc.is_in(table.column("split"), value_set=pa.array(list(splits)))
        ids = ids[np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)]
    ids = np.sort(ids.astype(np.int64))
    where = f"s3://{path}" if dataset_uri.startswith("s3://") else path
    res = {"input": len(ids), "encoded": {}, "skipped": {}, "range": {}}
    for m in modalities:
        code_path = join(out_root, m, shard_name(i))
        if not _exists(out_fs, code_path):
            raise RuntimeError(f"exactly-once check: {where}: no {m} shard {code_path}")
        meta = read_code_meta(out_fs, code_path) or {}
        if meta.get("model_fingerprint") != fingerprint:
            raise RuntimeError(f"exactly-once check: {code_path} was written by model "
                               f"{meta.get('model_fingerprint')}, not {fingerprint}")
        got = pq.read_table(code_path, filesystem=out_fs, columns=["id"]).column("id").to_numpy()
        skip_path = join(out_root, "skipped", m, shard_name(i))
        skipped = (pq.read_table(skip_path, filesystem=out_fs, columns=["id"]).column("id").to_numpy()
                   if _exists(out_fs, skip_path) else np.zeros(0, np.int64))
        if meta.get("skipped", len(skipped)) != len(skipped):
            raise RuntimeError(f"exactly-once check: {code_path} records {meta.get('skipped')} skipped "
                               f"rows but {skip_path} lists {len(skipped)}")
        both = np.sort(np.concatenate([got, skipped]).astype(np.int64))
        if len(both) != len(ids) or not np.array_equal(both, ids):
            missing = np.setdiff1d(ids, both)
            extra = np.setdiff1d(both, ids)
            dups = both[1:][both[1:] == both[:-1]]
            raise RuntimeError(
                f"exactly-once check failed for {where} ({m}): {len(ids)} input ids, "
                f"{len(got)} encoded + {len(skipped)} skipped; missing {missing[:5].tolist()}, "
                f"unexpected {extra[:5].tolist()}, duplicated {dups[:5].tolist()}"
            )
        res["encoded"][m] = len(got)
        res["skipped"][m] = len(skipped)
        res["range"][m] = (int(ids[0]), int(ids[-1])) if len(ids) else None
    return res


def verify_exactly_once(
    dataset_uri: str, output_uri: str, files: Sequence[str], modalities: Sequence[str],
    splits: Sequence[str] | None, s3_endpoint: str | None, fingerprint: str,
) -> dict[str, Any]:
    """Every input id appears exactly once in the outputs (code shard or skip list) of each
    modality: per input file, then across files where their id ranges overlap.

    Runs on the driver with a thread pool: it reads only id columns (8 bytes a row, in and out),
    so even a billion rows is a few GB of reads, and it needs no worker processes.
    """
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda ip: _verify_file(dataset_uri, output_uri, ip[0], ip[1], tuple(modalities), splits,
                                    s3_endpoint, fingerprint),
            enumerate(files)))
    ranges = sorted((r["range"][modalities[0]], i) for i, r in enumerate(results) if r["range"][modalities[0]])
    overlap: set[int] = set()
    hi, hi_i = None, None
    for (lo, top), i in ranges:
        if hi is not None and lo <= hi:
            overlap.update({i, hi_i})
        if hi is None or top > hi:
            hi, hi_i = top, i
    if overlap:
        in_fs, _ = resolve_filesystem(dataset_uri, s3_endpoint)
        all_ids = np.concatenate([
            pq.read_table(files[i], filesystem=in_fs, columns=["id"]).column("id").to_numpy()
            for i in sorted(overlap)])
        uniq, cnt = np.unique(all_ids, return_counts=True)
        if (cnt > 1).any():
            raise RuntimeError(f"exactly-once check: id {int(uniq[cnt > 1][0])} is in more than one "
                               f"input file of {dataset_uri}; input ids must be unique")
    counts = {
        "input_rows": sum(r["input"] for r in results),
        "encoded": {m: sum(r["encoded"][m] for r in results) for m in modalities},
        "skipped": {m: sum(r["skipped"][m] for r in results) for m in modalities},
    }
    logger.info("exactly-once check passed: %s", counts)
    return counts


# --------------------------------------------------------------------------------------------
# Ray


def connect_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> bool:
    """Join ``address`` / ``RAY_ADDRESS``, or start a local cluster on 127.0.0.1 (returns True
    then: the caller shuts it down). No dashboard: the jobs only use Ray Data and tasks."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return False
    kwargs: dict[str, Any] = {}
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    ray.init(
        # "local": always a new cluster. Without it, ray.init() joins whatever `ray start` left
        # registered in /tmp/ray (someone else's cluster on a shared machine).
        address="local",
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        logging_level=logging.WARNING,
        **kwargs,
    )
    return True


def quiet_progress() -> None:
    """Ray Data's overall progress only (a bar on a terminal, a log line every few seconds
    otherwise); per-operator bars flood non-interactive logs."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = False
    ctx.enable_progress_bars = sys.stderr.isatty()
