"""The lock (requirements/constraints.txt) is the resolution of pyproject.toml as it is now."""

from __future__ import annotations

import importlib.util
import os
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lock_module():
    spec = importlib.util.spec_from_file_location("dcgh_lock", os.path.join(ROOT, "requirements", "lock.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pins() -> dict[str, list[Requirement]]:
    """name -> the lock's pins (one per marker branch)."""
    pins: dict[str, list[Requirement]] = {}
    with open(os.path.join(ROOT, "requirements", "constraints.txt")) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            req = Requirement(line)
            pins.setdefault(canonicalize_name(req.name), []).append(req)
    return pins


def test_lock_matches_pyproject():
    lock = _lock_module()
    assert lock.recorded_hash() == lock.dependency_hash(), (
        "pyproject.toml's dependencies changed but requirements/constraints.txt was not regenerated: "
        "pip install uv && python requirements/lock.py"
    )


def test_lock_pins_every_requirement_of_every_extra():
    """Each direct requirement (base and every extra) has a pin here that satisfies its range."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    pins = _pins()
    env = default_environment()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra, items in project["optional-dependencies"].items():
        reqs += [Requirement(r) for r in items]
    checked = 0
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "dcgh-dist":  # a self-reference to other extras, themselves checked here
            continue
        applicable = [p for p in pins.get(name, []) if p.marker is None or p.marker.evaluate(env)]
        assert applicable, f"{req.name} is required by pyproject.toml but not pinned in the lock"
        for pin in applicable:
            (spec,) = pin.specifier
            assert spec.operator == "==", f"{pin}: the lock must pin exact versions"
            assert req.specifier.contains(Version(spec.version), prereleases=True), (
                f"lock pins {pin} but pyproject.toml asks for {req}; regenerate the lock"
            )
        checked += 1
    assert checked >= 20


def test_lock_detects_a_changed_pyproject(tmp_path):
    """The freshness check bites: a widened range gives another hash."""
    lock = _lock_module()
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    changed = tmp_path / "pyproject.toml"
    changed.write_text(text.replace('"pyyaml>=6"', '"pyyaml>=5"'))
    assert '"pyyaml>=6"' in text
    assert lock.dependency_hash(str(changed)) != lock.dependency_hash()


def test_ci_installs_with_the_readme_commands():
    """CI runs the README's quickstart test command, in a new virtualenv, with the lock."""
    import re

    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    quick = readme[readme.index("## Quickstart"):]
    commands = re.findall(r"^(pip install -e .*?) && (python .*)$", quick, flags=re.M)
    assert len(commands) >= 2, commands
    for install, _ in commands:
        assert "-c requirements/constraints.txt" in install, install
    test_install, test_run = next(c for c in commands if ".[test]" in c[0])
    assert test_install in ci and test_run in ci
    assert "python3 -m venv" in ci  # a fresh environment every run: a broken install fails CI
