"""What every job's entry point shares: the config tree from the command line, and a user's
mistake as one line and exit code 2.

    p = argparse.ArgumentParser(...); p.add_argument("--bits", type=int); add_config_arguments(p)
    cfg = config_from_args(p.parse_intermixed_args(argv), {"bits": "model.bits"})
    ...
    if __name__ == "__main__":
        sys.exit(run_job(main))

Every job takes ``--config FILE.yaml`` (any subset of the tree) and ``section.key=value``
overrides the same way; its named flags are shorthands for keys of the tree. Layers, later
winning: defaults, the dataset's preset, the YAML file, the flags, the overrides.

Bad input (a missing dataset, a malformed manifest, a wrong config key, broken YAML, a checkpoint
whose weights do not match its fingerprint) raises ValueError or OSError with a message that says
what and where; a traceback adds nothing for the user. ``--debug`` (or ``DCGH_DEBUG=1``) shows it.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Mapping, Sequence

# OSError covers FileNotFoundError, PermissionError, IsADirectoryError: paths the user gave.
USER_ERRORS = (ValueError, OSError)


def run_job(main: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DCGH_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def setup_job_process(*, torch: bool = True) -> None:
    """What a job's process sets before it imports Ray: a local cluster bound to loopback only,
    no Hub downloads, INFO logging; and, for jobs that run models (``torch``), torch's native
    libraries loaded first: loaded after pyarrow's and Ray's (as in a `ray job submit` driver) they
    can fail with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"."""
    import logging

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if torch:
        import torch as _  # noqa: F401

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# The flags every job that runs on Ray or reads s3:// takes, as shorthands for the same keys.
COMMON_FLAGS = {"ray_address": "ray.address", "num_cpus": "ray.num_cpus", "ray_temp_dir": "ray.temp_dir",
                "s3_endpoint": "data.s3_endpoint"}


def add_config_arguments(p: argparse.ArgumentParser, *, ray: bool = True) -> None:
    """``--config``, the overrides, and the common flags (``--s3-endpoint``; with ``ray``, also
    ``--ray-address``, ``--num-cpus``, ``--ray-temp-dir``)."""
    p.add_argument("--config", help="YAML file with any subset of the config tree (sections model, loss, "
                                    "optim, data, train, eval, encode, index, prepare, daph, ray)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint of every s3:// URI (data.s3_endpoint)")
    if ray:
        p.add_argument("--ray-address", help="join this cluster (ray.address; default: RAY_ADDRESS, else start "
                                             "a local one)")
        p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (ray.num_cpus; default "
                                                    "max(4, cores))")
        p.add_argument("--ray-temp-dir", help="session directory of a local cluster (ray.temp_dir)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.bits=32 encode.batch_size=512 index.nprobe=32")


def config_from_args(args: argparse.Namespace, flags: Mapping[str, str],
                     preset: Callable[[str], Mapping[str, Any]] | None = None,
                     reads: Sequence[str] | None = None):
    """The validated Config of a command line. ``flags`` maps argparse dests to dotted keys
    (``{"bits": "model.bits"}``; COMMON_FLAGS are added); a flag left unset (None) does not
    override. ``preset`` maps the resolved ``data.dataset`` to its preset layer. ``reads``: the
    sections (``"encode"``) and keys (``"data.s3_endpoint"``) the job uses; an override of any
    other key is refused rather than silently ignored (a YAML file may hold the whole tree)."""
    from dcgh_dist.config import load_config, parse_overrides

    nested: dict[str, Any] = {}
    for dest, dotted in {**COMMON_FLAGS, **flags}.items():
        value = getattr(args, dest, None)
        if value is not None:
            section, key = dotted.split(".")
            nested.setdefault(section, {})[key] = value
    overrides = parse_overrides(args.overrides)
    layers = {"yaml_path": args.config, "overrides": overrides, "flags": nested}
    cfg = load_config(**layers)  # a key the tree does not have fails here, named
    if reads is not None:
        _check_read(overrides, reads)
    if preset is None:
        return cfg
    # The dataset (from any layer) picks the preset, which sits below all of them.
    return load_config(**layers, preset=preset(cfg.data.dataset))



def _check_read(overrides: Mapping[str, Any], reads: Sequence[str]) -> None:
    ignored = []
    for section, keys in overrides.items():
        for key in (keys if isinstance(keys, Mapping) else {None: keys}):
            dotted = section if key is None else f"{section}.{key}"
            if section not in reads and dotted not in reads:
                ignored.append(dotted)
    if ignored:
        raise ValueError(f"this job does not read {', '.join(sorted(ignored))}: it would be ignored; the job "
                         f"reads {', '.join(r if '.' in r else r + '.*' for r in reads)}")
