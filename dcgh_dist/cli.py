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


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with any subset of the config tree (sections model, loss, "
                                    "optim, data, train, eval, encode, index)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.bits=32 encode.batch_size=512 index.nprobe=32")


def config_from_args(args: argparse.Namespace, flags: Mapping[str, str],
                     preset: Callable[[str], Mapping[str, Any]] | None = None):
    """The validated Config of a command line. ``flags`` maps argparse dests to dotted keys
    (``{"bits": "model.bits"}``); a flag left unset (None) does not override. ``preset`` maps the
    resolved ``data.dataset`` to its preset layer."""
    from dcgh_dist.config import load_config, parse_overrides

    nested: dict[str, Any] = {}
    for dest, dotted in flags.items():
        value = getattr(args, dest, None)
        if value is not None:
            section, key = dotted.split(".")
            nested.setdefault(section, {})[key] = value
    overrides = parse_overrides(args.overrides)
    layers = {"yaml_path": args.config, "overrides": overrides, "flags": nested}
    if preset is None:
        return load_config(**layers)
    # The dataset (from any layer) picks the preset, which sits below all of them.
    dataset = load_config(**layers).data.dataset
    return load_config(**layers, preset=preset(dataset))

