"""The encoding driver: the Ray Data pipeline, per-input-file code shards, the run's plan."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dcgh_dist.config import EncodeConfig
from dcgh_dist.data.format import DatasetError
from dcgh_dist.encoding.actor import EncodeBatches, Preprocess, preprocess_memory
from dcgh_dist.encoding.calibration import choose_precision
from dcgh_dist.encoding.inputs import MODALITIES, EncodeInput, check_columns, count_rows, resolve_input
from dcgh_dist.encoding.verify import shard_name, verify_exactly_once
from dcgh_dist.index.codes import code_shard_bytes, code_shard_meta, codes_table
from dcgh_dist.storage import (
    display,
    exists,
    join,
    read_text,
    resolve_filesystem,
    table_to_bytes,
    write_bytes_atomic,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

PLAN_FILE = "encode.json"
PLAN_FORMAT = "dcgh-dist-encode-v1"


@dataclass
class _Pending:
    expected: int
    ids: list[np.ndarray] = field(default_factory=list)
    codes: dict[str, list[np.ndarray]] = field(default_factory=dict)
    relaxed: dict[str, list[np.ndarray]] = field(default_factory=dict)  # encode.relaxed only
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

    from dcgh_dist.models.checkpoint import read_checkpoint_files, verify_files
    from dcgh_dist.models.inputs import preprocessor_for

    t0 = time.time()
    modalities = tuple(m for m in MODALITIES if m in modalities)
    if not modalities:
        raise ValueError("modality must be image, text or both")
    ckpt_files = read_checkpoint_files(checkpoint_dir, s3_endpoint)
    meta = verify_files(ckpt_files)  # weights match the fingerprint stamped on every code
    mcfg = meta.config
    bits = cfg.bits or mcfg.model.bits
    if bits not in mcfg.model.lengths:
        raise ValueError(f"{checkpoint_dir}: the checkpoint hashes to {list(mcfg.model.lengths)} bits, "
                         f"not encode.bits={bits}")
    inp = resolve_input(dataset_uri, s3_endpoint)
    check_columns(inp, meta, modalities)

    in_fs, _ = resolve_filesystem(dataset_uri, s3_endpoint)
    out_fs, out_root = resolve_filesystem(output_uri, s3_endpoint)

    def where(path: str) -> str:
        return display(in_fs, path)

    with ThreadPoolExecutor(16) as pool:
        expected = list(pool.map(lambda p: count_rows(in_fs, p, cfg.splits, where(p)), inp.files))
    plan = {
        "format": PLAN_FORMAT,
        "dataset": dataset_uri,
        "files": [where(p) for p in inp.files],
        "rows": expected,
        "modalities": list(modalities),
        "splits": list(cfg.splits) if cfg.splits is not None else None,
        "bits": bits,
        "relaxed": cfg.relaxed,
        "model_fingerprint": meta.fingerprint,
        "checkpoint": _where_checkpoint(checkpoint_dir),
    }
    _check_or_write_plan(out_fs, out_root, output_uri, plan, cfg)

    # Which input files still need work: any requested modality's shard missing.
    done = [all(exists(out_fs, join(out_root, m, shard_name(i))) for m in modalities)
            for i in range(len(inp.files))]
    pending = [i for i, d in enumerate(done) if not d]
    n_before = len(inp.files) - len(pending)
    logger.info("%s: %d input files (%d rows); %d already encoded, %d to do", dataset_uri,
                len(inp.files), sum(expected), n_before, len(pending))
    shard_meta = {
        m: code_shard_meta(bits, meta.fingerprint, m, config=mcfg.to_dict(),
                           encode=_jsonable(asdict(cfg)), checkpoint=_where_checkpoint(checkpoint_dir))
        for m in modalities
    }

    def flush(i: int, state: _Pending) -> None:
        ids = np.concatenate(state.ids) if state.ids else np.zeros(0, np.int64)
        if len(np.unique(ids)) != len(ids):
            raise DatasetError(f"{where(inp.files[i])}: an id appears twice in this file")
        order = np.argsort(ids, kind="stable")
        for m in modalities:
            code_path = join(out_root, m, shard_name(i))
            if exists(out_fs, code_path):
                continue  # finished by an earlier run (a crash between two modalities)
            codes = (np.concatenate(state.codes[m]) if state.ids else np.zeros((0, bits // 8), np.uint8))[order]
            errors = (np.concatenate(state.errors[m]) if state.ids else np.zeros(0, object))[order]
            relaxed = None
            if cfg.relaxed:  # an empty file's shard carries the (empty) column too: all shards alike
                relaxed = (np.concatenate(state.relaxed[m]) if state.ids else np.zeros((0, bits), np.float16))[order]
            bad = errors != ""
            skip_path = join(out_root, "skipped", m, shard_name(i))
            if bad.any():
                # Written before the code shard: a code shard that exists implies its skip list does.
                skipped = pa.table({"id": pa.array(ids[order][bad], pa.int64()),
                                    "error": pa.array([str(e) for e in errors[bad]], pa.string())})
                write_bytes_atomic(out_fs, skip_path, table_to_bytes(skipped))
            table = codes_table(ids[order][~bad], codes[~bad], {
                **shard_meta[m], "input_file": where(inp.files[i]), "input_rows": state.expected,
                "skipped": int(bad.sum())}, relaxed=relaxed[~bad] if relaxed is not None else None)
            write_bytes_atomic(out_fs, code_path, code_shard_bytes(table))

    # Files with nothing to encode never show up in the stream.
    for i in pending:
        if expected[i] == 0:
            flush(i, _Pending(0))
    pending = [i for i in pending if expected[i] > 0]

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    precision, agreement = "fp32", None
    if pending:
        precision, agreement = choose_precision(cfg, use_gpu, ckpt_files, inp.uri, inp.files[pending[0]],
                                                meta, modalities, s3_endpoint)
        ckpt_ref = ray.put(ckpt_files)
        columns = ["id"] + (["split"] if cfg.splits is not None else [])
        columns += [inp.info.image_column] if "image" in modalities else []
        columns += [inp.info.text_column] if "text" in modalities else []
        from dcgh_dist.data.pipeline import read_parquet

        ds = read_parquet([inp.files[i] for i in pending], filesystem=in_fs, columns=columns,
                          include_paths=True)
        if cfg.splits is not None:
            from ray.data.expressions import col

            ds = ds.filter(expr=col("split").is_in(list(cfg.splits)))
        pre = preprocessor_for(meta.config, meta.dataset_info, architecture=meta.architecture,
                               modalities=modalities, on_error="skip", with_labels=False)
        # Reserving the memory of a decoded batch is a real hint for the scheduler, and it makes
        # this step's remote args differ from the model actors': Ray Data would otherwise fuse
        # the two (it fuses a task map into a following actor map with equal resources), and
        # decoding would then scale with the number of actors instead of the cluster's CPUs.
        ds = ds.map_batches(Preprocess(pre), batch_format="numpy", batch_size=cfg.preprocess_batch_size,
                            num_cpus=cfg.preprocess_cpus,
                            memory=preprocess_memory(pre, modalities, cfg.preprocess_batch_size))
        ds = ds.map_batches(
            EncodeBatches,
            fn_constructor_args=({"checkpoint": ckpt_ref}, modalities),
            fn_constructor_kwargs={"packed": True, "precision": precision,
                                   "device": "cuda" if use_gpu else "cpu",
                                   "cpu_threads": int(max(1, cfg.actor_cpus)), "passthrough": ("id", "path"),
                                   "bits": bits, "keep_relaxed": cfg.relaxed},
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
                st.codes.setdefault(m, []).append(np.asarray(batch[f"{m}_codes"])[sel])
                if cfg.relaxed:
                    st.relaxed.setdefault(m, []).append(np.asarray(batch[f"{m}_relaxed"])[sel])
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


def _check_or_write_plan(fs, root: str, uri: str, plan: dict, cfg: EncodeConfig) -> None:
    path = join(root, PLAN_FILE)
    if exists(fs, path):
        old = json.loads(read_text(fs, path))
        keys = ("files", "rows", "modalities", "splits", "bits", "model_fingerprint", "relaxed")
        # A plan from before a key existed holds its default.
        diff = [k for k in keys if old.get(k, {"relaxed": False}.get(k)) != plan.get(k)]
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


def _skip_examples(fs, root: str, modality: str, n_files: int, limit: int = 5) -> list[str]:
    out: list[str] = []
    for i in range(n_files):
        path = join(root, "skipped", modality, shard_name(i))
        if exists(fs, path):
            out += pq.read_table(path, filesystem=fs, columns=["error"]).column("error").to_pylist()
            if len(out) >= limit:
                break
    return out[:limit]




def _where_checkpoint(uri: str) -> str:
    return uri if uri.startswith("s3://") else os.path.abspath(uri)
