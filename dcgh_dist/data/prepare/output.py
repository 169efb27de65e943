"""The output directory: which of its files this job may replace, and the record of a run.

A file is this job's own only when a record written by this job names it, with its size:

- ``dataset.json`` of a complete dataset (``extra.prepare.tool`` is this job): the shards of its
  manifest;
- ``_prepare_state.json``, the record of a run in progress: its id and the shards it finished
  (each recorded *before* it is moved to its final name, so no shard is ever unrecorded);
- temporary files ``.<name>.tmp-<run id>`` of a run whose record is here;
- ``prepare_report.json`` and ``dataset.json`` themselves when their content is this job's.

A name alone proves nothing (``part-00000.parquet`` is what Spark, pandas and
``format.write_dataset`` write too), and a listed file whose size differs from the record has
been changed since: neither is deleted, and the job refuses the output, naming the file.

A run writes its record before anything else, each shard under a temporary name, moved to its
final name only when complete (on S3, ``move`` is a server-side copy and a delete), and deletes
the record once dataset.json is written. A run that stops on an error or a signal deletes what it
wrote; one that is killed before it can leaves its record, and the next run deletes what the record
names before it starts, with or without ``--overwrite``. One run per output at a time: a second
one would take the first one's record for the leftovers of an interrupted run.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from dcgh_dist.data.format import INFO_FILE
from dcgh_dist.storage import join
from dcgh_dist.data.prepare.report import REPORT_FILE

logger = logging.getLogger(__name__)

TOOL = "jobs/prepare_data.py"
STATE_FILE = "_prepare_state.json"
SHARD_NAME = re.compile(r"part-\d{5}\.parquet")
_RUN_ID = re.compile(r"[0-9a-f]{16}")
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?P<run>[0-9a-f]{16})")
_SHOWN = 5  # foreign files named in a refusal


def new_run_id() -> str:
    return secrets.token_hex(8)


def temp_name(rel: str, run_id: str) -> str:
    """Where ``rel`` is written before it is complete: hidden, and not ``*.parquet``, so neither
    this project's readers nor pyarrow's dataset discovery ever take it for data."""
    return f".{rel}.tmp-{run_id}"


def _is_own_name(name: str) -> bool:
    return bool(SHARD_NAME.fullmatch(name)) or name in (INFO_FILE, REPORT_FILE, STATE_FILE)


def _is_recordable(rel: str) -> bool:
    """What a run record may list: shards, and temporary files of this job's names."""
    m = _TEMP_NAME.fullmatch(rel)
    return bool(SHARD_NAME.fullmatch(rel)) or bool(m and _is_own_name(m["name"]))


@dataclass
class OutputContents:
    """What an output directory holds, sorted into what this job may delete and what it may not."""

    display: str
    complete: dict | None = None  # an own dataset.json (parsed)
    interrupted: list[str] = field(default_factory=list)  # ids of runs whose record is here
    own: dict[str, int] = field(default_factory=dict)  # rel -> size: provably this job's
    foreign: dict[str, str] = field(default_factory=dict)  # rel -> why it is not provably ours

    def deletion_order(self) -> list[str]:
        """dataset.json first (once it is gone no reader takes the rest for a complete dataset),
        the record of a run last (until then it proves what is left)."""
        rank = {INFO_FILE: 0, STATE_FILE: 2}
        return sorted(self.own, key=lambda r: (rank.get(r, 1), r))

    def check(self, overwrite: bool) -> None:
        """Refuse foreign files always, and a complete dataset without ``overwrite``."""
        if self.foreign:
            shown = "; ".join(f"{r}: {why}" for r, why in sorted(self.foreign.items())[:_SHOWN])
            more = f"; and {len(self.foreign) - _SHOWN} more" if len(self.foreign) > _SHOWN else ""
            raise ValueError(
                f"output {self.display} holds {len(self.foreign)} file(s) that jobs/prepare_data.py cannot "
                f"prove it wrote ({shown}{more}); it deletes or replaces only what its own dataset.json or "
                "run record lists, with or without --overwrite: move them away or choose another output"
            )
        if self.complete is not None and not overwrite:
            n = len(self.complete["extra"]["manifest"]["shards"])
            source = self.complete["extra"]["prepare"].get("input")
            raise ValueError(
                f"output {self.display} already holds a complete prepared dataset (dataset.json and {n} "
                f"shard(s), prepared from {source}); pass --overwrite to replace it"
            )


def _read_json(fs: pafs.FileSystem, path: str) -> object:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _own_dataset(d: object) -> dict | None:
    """``d`` if it is a dataset.json written by this job with a manifest of shard names."""
    try:
        shards = d["extra"]["manifest"]["shards"]
        ok = d["extra"]["prepare"]["tool"] == TOOL and all(
            isinstance(s["path"], str) and SHARD_NAME.fullmatch(s["path"]) and isinstance(s["bytes"], int)
            for s in shards
        )
    except (KeyError, TypeError):
        return None
    return d if ok else None


def _own_state(d: object, run_id: str | None = None) -> dict | None:
    """``d`` if it is a run record of this job (of run ``run_id`` when given)."""
    try:
        ok = (d["tool"] == TOOL and isinstance(d["run_id"], str) and _RUN_ID.fullmatch(d["run_id"])
              and (run_id is None or d["run_id"] == run_id)
              and all(isinstance(p, str) and _is_recordable(p) and isinstance(n, int) for p, n in d["files"].items()))
    except (KeyError, TypeError, AttributeError):
        return None
    return d if ok else None


def _own_report(d: object) -> bool:
    return isinstance(d, dict) and d.get("status") in ("ok", "failed") and isinstance(d.get("reasons"), dict)


def inspect_output(fs: pafs.FileSystem, root: str, display: str) -> OutputContents:
    """Sort the files under ``root`` (recursively) into own and foreign; reads only the records."""
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    base = root.rstrip("/")
    files = {i.path[len(base) + 1:]: int(i.size or 0) for i in fs.get_file_info(sel) if i.type == pafs.FileType.File}
    out = OutputContents(display)
    recorded: dict[str, list[tuple[int, str]]] = {}  # file -> (size, the record that lists it)

    if INFO_FILE in files:
        info = _own_dataset(_read_json(fs, join(root, INFO_FILE)))
        if info is not None:
            out.complete = info
            out.own[INFO_FILE] = files[INFO_FILE]
            for s in info["extra"]["manifest"]["shards"]:
                recorded.setdefault(s["path"], []).append((s["bytes"], "dataset.json's manifest"))

    for rel in sorted(files):
        m = _TEMP_NAME.fullmatch(rel)
        if rel == STATE_FILE or (m and m["name"] == STATE_FILE):
            # A record's temporary file names its run: once complete, it proves itself.
            state = _own_state(_read_json(fs, join(root, rel)), m["run"] if m else None)
            if state is not None:
                out.own[rel] = files[rel]
                if state["run_id"] not in out.interrupted:
                    out.interrupted.append(state["run_id"])
                for path, size in state["files"].items():
                    recorded.setdefault(path, []).append((size, f"the record of run {state['run_id']}"))

    for rel, size in sorted(files.items()):
        if rel in out.own:
            continue
        m = _TEMP_NAME.fullmatch(rel)
        if rel in recorded:
            if any(size == want for want, _ in recorded[rel]):
                out.own[rel] = size
            else:
                want, where = recorded[rel][0]
                out.foreign[rel] = f"{size} bytes, but {where} says {want}: changed since this job wrote it"
        elif SHARD_NAME.fullmatch(rel):
            out.foreign[rel] = ("not listed in a dataset.json manifest or run record of this job (another "
                                "tool's file, or the leftover of an older version of this job)")
        elif m and _is_own_name(m["name"]) and m["run"] in out.interrupted:
            out.own[rel] = size
        elif rel == INFO_FILE:
            out.foreign[rel] = "not a dataset.json written by jobs/prepare_data.py (no manifest of its shards)"
        elif rel == STATE_FILE or (m and m["name"] == STATE_FILE):
            out.foreign[rel] = "not a (complete) run record of jobs/prepare_data.py"
        elif rel == REPORT_FILE and _own_report(_read_json(fs, join(root, rel))):
            out.own[rel] = size
        else:
            out.foreign[rel] = "not a file that jobs/prepare_data.py writes"
    return out


class Run:
    """One run's record (``_prepare_state.json``) and its writes into the output."""

    def __init__(self, fs: pafs.FileSystem, root: str, display: str):
        self.fs, self.root, self.display = fs, root, display
        self.id = new_run_id()
        self.files: dict[str, int] = {}  # files under other names than this run's temporary ones that it may delete
        self._writing = False  # whether this run has begun to write into the output
        self._recorded = False  # whether this run's record is in the output

    def start(self, overwrite: bool) -> None:
        """Check the output again (it may have changed during the metadata stage), take what is to
        be deleted over into this run's record, then delete it."""
        contents = inspect_output(self.fs, self.root, self.display)
        contents.check(overwrite)
        if not isinstance(self.fs, pafs.S3FileSystem):
            self.fs.create_dir(self.root, recursive=True)
        if contents.interrupted:
            logger.warning("output %s holds the leftovers of an interrupted run of jobs/prepare_data.py (run %s): "
                           "deleting the %d file(s) its record lists", self.display, ", ".join(contents.interrupted),
                           len(contents.own))
        elif contents.complete is not None:
            logger.info("replacing the prepared dataset at %s (--overwrite)", self.display)
        # This run's record first, replacing an old one: from now on it proves what is left.
        self.files = {r: s for r, s in contents.own.items() if _is_recordable(r)}
        self._save()
        for rel in contents.deletion_order():
            if rel != STATE_FILE:
                self._delete(rel)

    def temp(self, rel: str) -> str:
        return temp_name(rel, self.id)

    def record(self, rel: str, nbytes: int) -> None:
        """Record ``rel`` as this run's before it appears under that name."""
        self.files[rel] = nbytes
        self._save()

    def write_text(self, rel: str, text: str) -> None:
        """Whole or not at all: a PUT on S3 (atomic there), else a temporary file and a rename."""
        data = text.encode("utf-8")
        if isinstance(self.fs, pafs.S3FileSystem):
            with self.fs.open_output_stream(join(self.root, rel)) as f:
                f.write(data)
            return
        tmp = join(self.root, self.temp(rel))
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, join(self.root, rel))

    def finish(self) -> None:
        """dataset.json is written: its manifest lists the shards now."""
        self._delete(STATE_FILE)
        self._recorded = False

    def abort(self) -> None:
        """Delete what this run wrote, but the report; the record last. Best effort, on the way out
        of a failure: whatever is left stays recorded, and the next run deletes it."""
        if not self._writing:
            return
        try:
            base = self.root.rstrip("/")
            sel = pafs.FileSelector(base, recursive=False, allow_not_found=True)
            for i in self.fs.get_file_info(sel):
                m = _TEMP_NAME.fullmatch(i.path[len(base) + 1:])
                if m and m["run"] == self.id:
                    self._delete(m[0])
            # Until its record is in place, the record there (if any) is an older run's, and the
            # files it lists are not yet this run's to delete.
            if self._recorded:
                # start() deleted any older dataset.json: one there now is this run's, complete
                # (stopped just before finish()), and its shards are the dataset's, not leftovers.
                if self.fs.get_file_info(join(self.root, INFO_FILE)).type == pafs.FileType.NotFound:
                    for rel in sorted(self.files):
                        self._delete(rel)
                self._delete(STATE_FILE)
                self._recorded = False
        except OSError as e:
            logger.warning("could not delete everything run %s wrote in %s (%s): the next run will", self.id,
                           self.display, e)

    def _save(self) -> None:
        state = {"tool": TOOL, "run_id": self.id, "files": dict(sorted(self.files.items()))}
        self._writing = True
        self.write_text(STATE_FILE, json.dumps(state, indent=1) + "\n")
        self._recorded = True

    def _delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(join(self.root, rel))
        except OSError as e:
            if self.fs.get_file_info(join(self.root, rel)).type != pafs.FileType.NotFound:
                raise OSError(f"{self.display}/{rel}: cannot delete ({e})") from e
