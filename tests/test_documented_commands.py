"""The command blocks of README.md and docs/ that a user pastes, run as written, so docs and code
cannot drift apart: the quickstart's training, the serving path (train, encode, build both indexes,
``serve run serve/config.yaml``, a search) and the report path.

Each block runs in a scratch copy of the repository's scripts (``jobs/``, ``serve/``: relative
paths such as ``runs/demo`` land there, never in the checkout), as subprocesses with the
environment a user has: no test cluster to join (``RAY_ADDRESS`` unset), Ray sizing itself from
the machine. The one change made to a documented command is named where it is made: training
runs one epoch instead of the demo's 16, to keep CI short.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]

# The one change to a documented training command: one epoch (the figures in README come from the
# full command).
ONE_EPOCH = "train.epochs=1"


def bash_blocks(markdown: Path) -> list[list[str]]:
    """The ```bash blocks of a Markdown file, each as its commands: continuation lines joined,
    comments dropped."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", markdown.read_text(), flags=re.S | re.M):
        commands, pending = [], ""
        for line in body.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            line = (pending + line.strip()).strip()
            pending = ""
            if line:
                commands.append(line)
        blocks.append(commands)
    return blocks


def block_with(markdown: Path, needle: str) -> list[str]:
    [block] = [b for b in bash_blocks(markdown) if any(needle in c for c in b)]
    return block


def quickstart_job() -> str:
    """The job half of the README's quickstart command 1 (its install half is CI's own step)."""
    install, job = block_with(REPO / "README.md", "pip install -e . -c")[0].split(" && ")
    assert install == "pip install -e . -c requirements/constraints.txt"
    return job


@pytest.fixture
def ray_tmp() -> Path:
    """Where the commands' Ray writes its session files, so that the test can tell its processes
    from others'. Short: Ray's socket paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dcgh-doc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def user_env(ray_tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PYTEST_"))}
    env["RAY_TMPDIR"] = str(ray_tmp)
    return env


@pytest.fixture
def workspace(tmp_path) -> Path:
    ws = tmp_path / "ws"
    for name in ("jobs", "serve"):
        shutil.copytree(REPO / name, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
    return ws


def run(command: str, cwd: Path, env: dict[str, str], timeout: float) -> None:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_quickstart_and_serving_path_answer_a_search(workspace, tmp_path, ray_tmp):
    """docs/SERVE.md's "Run it" block on a fresh 2-core machine: ``serve run`` with the config as
    shipped (Serve's default sizes would ask for 4 CPUs and never start here) answers /healthz
    within a second, every time, and a search within 3 minutes; Ctrl-C stops it and its Ray."""
    commands = block_with(REPO / "docs" / "SERVE.md", "serve run serve/config.yaml")
    assert commands[0] == quickstart_job(), "the serving path starts from the quickstart's training"
    assert commands[-1] == "serve run serve/config.yaml"
    env = user_env(ray_tmp)
    for command in commands[:-1]:
        if "jobs/train.py" in command:
            command = f"{command} {ONE_EPOCH}"
        run(command, workspace, env, timeout=600)

    log = open(tmp_path / "serve.log", "w")
    t0 = time.monotonic()
    server = subprocess.Popen(["serve", "run", "serve/config.yaml"], cwd=workspace, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        probes = []
        while time.monotonic() - t0 < 180:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-5000:]
            t = time.monotonic()
            try:
                status, body = get("http://127.0.0.1:8000/healthz", timeout=10)
            except (urllib.error.URLError, ConnectionError):  # nothing listens on the port yet
                status, body = None, b""
            probes.append((round(t - t0, 1), status, round(time.monotonic() - t, 2)))
            if status == 200:
                break
            assert status in (None, 404, 503), (status, body)  # 404: Serve's proxy before the route
            if status == 503:
                assert json.loads(body)["status"] == "starting"
            time.sleep(0.3)
        assert probes[-1][1] == 200, f"no healthy answer within 180 s: {probes[-12:]}\n" \
                                     + (tmp_path / "serve.log").read_text()[-5000:]
        # Every probe was answered within a second, except while Ray starts the frontend's process
        # and Serve's proxy holds the request (one probe, a few seconds on 2 cores).
        held = [p for p in probes if p[2] > 1.0]
        assert len(held) <= 1 and all(p[2] < 10 for p in held), probes
        assert any(p[1] == 503 for p in probes) or probes[-1][0] < 5, probes

        req = urllib.request.Request("http://127.0.0.1:8000/search", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"text": "a red car on a road", "k": 5}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert time.monotonic() - t0 < 180
        assert len(answer["results"]) == 5 and all(x["caption"] for x in answer["results"])
        assert [x["distance"] for x in answer["results"]] == sorted(x["distance"] for x in answer["results"])
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            server.wait(60)
            stopped = True
        except subprocess.TimeoutExpired:
            stopped = False
        leftovers = _processes_under(ray_tmp)
        for p in leftovers + ([psutil.Process(server.pid)] if not stopped else []):
            p.kill()
        log.close()
    assert stopped, "serve run did not exit within 60 s of Ctrl-C"
    assert not leftovers, f"Ray processes left after Ctrl-C: {[p.cmdline()[:2] for p in leftovers]}"


def _processes_under(ray_tmp: Path) -> list[psutil.Process]:
    """The processes of a Ray whose session files are under ``ray_tmp`` (this test's own)."""
    deadline, found = time.monotonic() + 15, []
    while time.monotonic() < deadline:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if any(str(ray_tmp) in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        if not found:
            break
        time.sleep(1)
    return found


def test_report_path_runs_as_documented(workspace, ray_tmp):
    """docs/REPORT.md's first block: three feature-set trainings, then the report. Two runs of one
    config (seeds 0 and 1) are one row; the 16-bit run is its own."""
    commands = block_with(REPO / "docs" / "REPORT.md", "jobs/report.py")
    env = user_env(ray_tmp)
    for command in commands:
        run(command, workspace, env, timeout=600)
    out = workspace / "reports" / "features"
    md = (out / "report.md").read_text()
    assert (out / "report.html").is_file()
    rows = [line for line in md.splitlines() if line.startswith("| dcgh |")]
    assert [r.split("|")[2].strip() for r in rows] == ["16", "32"], rows
    assert rows[1].split("|")[3].strip() == "2 (0, 1)", rows


def _documented_job_commands() -> list[tuple[str, str]]:
    """(where, command) for every `python jobs/<job>.py ...` in a bash block of README.md and docs/
    (a usage synopsis, with `a|b` and `[--opt]`, is a ```text block)."""
    out = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in bash_blocks(md):
            for command in block:
                for part in command.split(" && "):
                    part = part.split(" -- ", 1)[-1].strip()  # `ray job submit ... -- python jobs/...`
                    if re.match(r"python jobs/\w+\.py\b", part):
                        out.append((md.relative_to(REPO).as_posix(), part))
    return out


@pytest.mark.parametrize("where, command", _documented_job_commands())
def test_every_documented_job_command_parses(where, command):
    """Each documented job command line, parsed by its job's own parser and built into its config
    tree (flags, `section.key=value` overrides, keys the job reads), as the job does first: a
    renamed flag or key fails here, not on a user's machine. (Paths such as /data/... are not
    opened: parsing is the part docs and code can disagree on.)"""
    import importlib
    import shlex

    from dcgh_dist.cli import config_from_args

    argv = shlex.split(command)
    name = Path(argv[1]).stem
    job = importlib.import_module(f"dcgh_dist.jobs.{name}")  # what jobs/<name>.py runs
    args = job.parse_args(argv[2:])
    if getattr(args, "config", None) and not Path(args.config).exists():
        args.config = None  # a YAML file of the user's, shown beside the command
    if name == "train":
        job.build_config(args)
    elif hasattr(job, "READS"):
        config_from_args(args, job.FLAGS, reads=job.READS)
