"""Benchmark jobs/prepare_data.py on a generated MIRFLICKR-25K-style tree.

Generates (in a temporary directory) a raw MIRFLICKR tree of ``--images`` small JPEGs with tag
files (Zipf-distributed tags, so the >= 20-images vocabulary filter has work to do) and the 24
concept files (about 20% of the images unlabelled, as in the real set), then times the whole
preparation (metadata, image decoding, writing shards, manifest) for each configuration:

* in-process (``--workers 0``) and with a process pool of one worker per core;
* with ``--max-side`` (every image decoded in full, shrunk and re-encoded).

Prints a markdown table: rows/s, MB/s of image bytes read, MB/s of shards written. Usage::

    python3 benchmarks/bench_prepare.py [--images 20000] [--size 160x120] [--max-side 64] [--repeat 2]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common import machine  # benchmarks/common.py: a script's own folder is on sys.path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONCEPTS = (
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor",
    "lake", "male", "night", "people", "plant_life", "portrait", "river", "sea", "sky",
    "structures", "sunset", "transport", "tree", "water",
)


def generate_tree(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> int:
    """Write a raw MIRFLICKR-like tree of ``n`` images; returns the bytes of images written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "mirflickr" / "meta" / "tags").mkdir(parents=True)
    (root / "mirflickr25k_annotations_v080").mkdir()
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    members: list[list[int]] = [[] for _ in CONCEPTS]
    vocab = [f"tag{i}" for i in range(3000)]
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    cdf = np.cumsum(zipf) / zipf.sum()
    noise = rng.normal(0, 10, (2 * h, 2 * w, 3)).astype(np.float32)  # cropped at random offsets
    total = 0
    for k in range(1, n + 1):
        # A smooth two-colour gradient plus noise: compresses like a photo, not like pure noise.
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = ((xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (w + h) + 0.5)[..., None]
        oy, ox = rng.integers(0, h), rng.integers(0, w)
        img = (1 - t) * c0 + t * c1 + noise[oy:oy + h, ox:ox + w]
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
        (root / "mirflickr" / f"im{k}.jpg").write_bytes(buf.getvalue())
        total += buf.tell()
        tags = np.searchsorted(cdf, rng.random(int(rng.integers(1, 12))))
        (root / "mirflickr" / "meta" / "tags" / f"tags{k}.txt").write_text(
            "\r\n".join(vocab[i] for i in tags) + "\r\n")
        if rng.random() < 0.8:
            for c in rng.choice(len(CONCEPTS), size=int(rng.integers(1, 4)), replace=False):
                members[c].append(k)
    for name, ids in zip(CONCEPTS, members):
        (root / "mirflickr25k_annotations_v080" / f"{name}.txt").write_text("".join(f"{i}\r\n" for i in sorted(ids)))
    return total


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", default="160x120", help="generated image size WxH (default 160x120)")
    p.add_argument("--max-side", type=int, default=64, help="size for the re-encoding run (0 = skip it)")
    p.add_argument("--workers", type=int, nargs="*", help="worker counts to time (default: 0 and the core count)")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is reported (the machine may be shared)")
    p.add_argument("--dir", help="where to generate (default: a temporary directory, removed afterwards)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from dcgh_dist.data.prepare import PrepareOptions, prepare_dataset

    w, h = (int(x) for x in args.size.lower().split("x"))
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_prepare_"))
    raw = base / "raw"
    try:
        t0 = time.perf_counter()
        image_bytes = generate_tree(raw, args.images, (w, h))
        gen_s = time.perf_counter() - t0
        print(f"generated {args.images} images ({image_bytes / 1e6:.1f} MB, {w}x{h} JPEG) in {gen_s:.1f} s", flush=True)
        cores = os.cpu_count() or 1
        configs = [(n, None) for n in (args.workers if args.workers is not None else [0, cores])]
        if args.max_side:
            configs.append((cores, args.max_side))
        results = []
        for i, (workers, max_side) in enumerate(configs):
            out = base / f"out{i}"
            # The paper's split sizes at 20k images (2,000 / 1,000 / 10,000), scaled for other sizes.
            opts = PrepareOptions(dataset="mirflickr25k", input=str(raw), output=str(out), workers=workers,
                                  max_side=max_side, progress=False, shard_bytes=64 << 20,
                                  query=args.images // 10, val=args.images // 20, train=args.images // 2)
            res = None
            for _ in range(max(1, args.repeat)):
                shutil.rmtree(out, ignore_errors=True)
                r = prepare_dataset(opts)
                res = r if res is None or r.seconds < res.seconds else res
            row = {
                "workers": workers, "max_side": max_side or "-", "rows": res.rows, "seconds": res.seconds,
                "rows_per_s": res.rows / res.seconds, "in_mb_per_s": res.input_image_bytes / 1e6 / res.seconds,
                "out_mb_per_s": res.output_bytes / 1e6 / res.seconds, "shards": len(res.shards),
                "out_mb": res.output_bytes / 1e6,
            }
            results.append(row)
            print(f"workers={workers} max_side={max_side}: {res.rows} rows in {res.seconds:.1f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        print()
        print(f"Machine: {machine()}; load average during the runs: {os.getloadavg()[1]:.1f} (5 min)")
        print(f"Input: {args.images} generated {w}x{h} JPEGs ({image_bytes / 1e6:.1f} MB), raw MIRFLICKR layout; "
              f"{results[0]['rows']} pairs pass the protocol and are written.\n")
        print("| workers | max side | rows | seconds | rows/s | input MB/s | output MB/s | shards (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['workers']} | {r['max_side']} | {r['rows']} | {r['seconds']:.1f} | {r['rows_per_s']:.0f} | "
                  f"{r['in_mb_per_s']:.1f} | {r['out_mb_per_s']:.1f} | {r['shards']} ({r['out_mb']:.1f}) |")
        return results
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
