"""What the benchmarks share: the machine line every table carries, and argument parsing."""

from __future__ import annotations

import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def machine() -> str:
    """Cores, CPU model, memory, GPU and the library versions the figures depend on."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        mem = "? GiB"
    versions = []
    for mod in ("torch", "pyarrow", "faiss", "ray"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    gpu = "no GPU"
    if "torch" in sys.modules:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else gpu
    return f"{os.cpu_count()} cores ({cpu}), {mem}, {gpu}, Python {platform.python_version()}, " + ", ".join(versions)


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation over runs (seeds), to 3 decimals."""
    import statistics

    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def parse_n(text: str) -> int:
    """A count as people write it on the command line: ``10M``, ``2.5K``, ``1B``, ``5000``."""
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KMB" else text) * mult)
