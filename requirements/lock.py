"""Regenerate ``requirements/constraints.txt``: the tested set of every dependency, pinned.

    pip install uv && python requirements/lock.py          # after any change to pyproject.toml

``pyproject.toml`` keeps ranges, for users who install dcgh-dist into an environment of their own;
this file pins one consistent resolution of every extra, for CI, the container images and the
README's quickstart (``pip install -e ".[test]" -c requirements/constraints.txt``), so an install
never backtracks and every machine tests the same set. The lock is universal (any platform,
Python 3.10+): pip skips the lines whose markers do not apply.

The header records a hash of pyproject.toml's dependency tables; ``tests/test_lock.py`` fails when
they change without a new lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
LOCK = os.path.join(ROOT, "requirements", "constraints.txt")
HASH_PREFIX = "# pyproject-dependencies-sha256: "


def dependency_hash(pyproject: str = PYPROJECT) -> str:
    """sha256 of what the lock is resolved from: requires-python, dependencies, every extra."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    tables = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def recorded_hash(lock: str = LOCK) -> str | None:
    with open(lock) as f:
        for line in f:
            if line.startswith(HASH_PREFIX):
                return line[len(HASH_PREFIX):].strip()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upgrade", action="store_true", help="newest versions, not the locked ones")
    args = p.parse_args(argv)
    uv = shutil.which("uv")
    if uv is None:
        print("error: uv is not installed (pip install uv)", file=sys.stderr)
        return 2
    cmd = [uv, "pip", "compile", "pyproject.toml", "--all-extras", "--universal",
           "--python-version", "3.10", "--no-header", "--quiet", "-o", "requirements/constraints.txt"]
    if args.upgrade:
        cmd.append("--upgrade")
    # The previous lock is uv's starting point (without --upgrade): only what pyproject changed moves.
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(LOCK) as f:
        body = f.read()
    header = (
        "# The tested set of dcgh-dist's dependencies, every extra, pinned. Generated; do not edit.\n"
        "# Regenerate after changing pyproject.toml: pip install uv && python requirements/lock.py\n"
        f"{HASH_PREFIX}{dependency_hash()}\n"
    )
    with open(LOCK, "w") as f:
        f.write(header + "".join(l for l in body.splitlines(keepends=True) if not l.startswith("# pyproject-")
                                 and not l.startswith("# The tested set") and not l.startswith("# Regenerate")))
    print(f"wrote {os.path.relpath(LOCK, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
