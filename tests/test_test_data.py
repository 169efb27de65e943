"""The suite runs on a plain clone: what the tests read is in the repository, unchanged."""

from __future__ import annotations

import hashlib
import re

from conftest import REPO, TEST_DATA


def test_test_data_matches_its_recorded_digests():
    lines = (TEST_DATA / "SHA256SUMS").read_text().split("\n")
    recorded = dict(reversed(line.split("  ", 1)) for line in lines if line)
    # every data file is recorded (the READMEs and licences are what describe them)
    on_disk = {str(p.relative_to(TEST_DATA)) for p in TEST_DATA.rglob("*") if p.is_file()}
    described = {n for n in on_disk if n == "SHA256SUMS" or n.rsplit("/", 1)[-1] in ("README.md", "DAPH.md", "LICENSE")}
    assert set(recorded) == on_disk - described
    for name, digest in recorded.items():
        actual = hashlib.sha256((TEST_DATA / name).read_bytes()).hexdigest()
        assert actual == digest, f"tests/data/{name} changed (sha256 {actual}, recorded {digest})"


# What reaching out of the checkout looks like in a test: the folder above the repository, or the
# workspace's shared/ folder beside it (which a user who clones the repository does not have).
_OUTSIDE = re.compile(r"REPO\.parent|parents\[[2-9]\]|\.\./shared|REPO / ['\"]shared['\"]")


def test_no_test_reads_outside_the_repository():
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")) + [REPO / ".ci" / "run"]:
        if path.name == "test_test_data.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "tests must not read outside the repository:\n" + "\n".join(offenders)
