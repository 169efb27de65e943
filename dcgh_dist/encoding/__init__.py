"""The encoding job's library part: dataset -> code shards, streaming, resumable, exactly-once.

Files: ``inputs`` (what is encoded: a dataset or plain Parquet, and its columns), ``actor`` (the
Ray Data callable that runs the model, shared with evaluation), ``calibration`` (bf16 or fp32),
``driver`` (the pipeline, the per-file shards, the plan), ``verify`` (the exactly-once check).
Settings: ``Config.encode`` (``dcgh_dist.config.EncodeConfig``).

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

from dcgh_dist.encoding.driver import PLAN_FILE, EncodeResult, run_encode
from dcgh_dist.encoding.inputs import EncodeInput, resolve_input
from dcgh_dist.encoding.verify import verify_exactly_once

__all__ = ["PLAN_FILE", "EncodeInput", "EncodeResult", "resolve_input", "run_encode", "verify_exactly_once"]
