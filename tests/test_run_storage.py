"""Runs own their directories: a run never deletes what it did not create (storage shared or not)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dcgh_dist.config import Config, load_config
from dcgh_dist.train.runner import choose_run_name, export_checkpoint, read_run_record, run_directory

REPO = Path(__file__).resolve().parents[1]


def test_fresh_runs_get_distinct_names_and_resume_finds_its_own(tmp_path):
    cfg = Config()
    storage = str(tmp_path / "store")
    names = {choose_run_name(cfg, str(tmp_path / "o"), storage, resume=False, dataset="/data/coco")
             for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("coco-") for n in names)
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"run_name": "coco-1", "storage_path": storage,
                                              "run_dir": f"{storage}/coco-1"}))
    assert choose_run_name(cfg, str(out), storage, resume=True, dataset="/data/coco") == "coco-1"
    # another storage path: not that run
    other = choose_run_name(cfg, str(out), str(tmp_path / "elsewhere"), resume=True, dataset="/data/coco")
    assert other != "coco-1"
    assert run_directory(str(out)) == f"{storage}/coco-1"


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "../victim", ".hidden", ""])
def test_run_name_must_be_one_safe_component(bad):
    with pytest.raises(ValueError, match="train.run_name"):
        load_config(overrides={"train": {"run_name": bad}})


def test_broken_run_record_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="run.json"):
        read_run_record(str(tmp_path))


def test_export_replaces_only_an_earlier_export(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.pt").write_bytes(b"w")
    (src / "train_state.pt").write_bytes(b"optimizer")
    dest = tmp_path / "checkpoint"
    dest.mkdir()
    (dest / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="not a checkpoint this job exported"):
        export_checkpoint(str(src), str(dest))
    assert (dest / "thesis.tex").read_text() == "mine"


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_runs_sharing_a_storage_path_keep_each_others_files(tmp_path, demo_small, ray_cluster):
    """The README recommends one shared storage path on clusters: two runs there, a user's file
    beside them, and a directory named like the old fixed run name all survive."""
    from dcgh_dist.jobs import train as train_job

    storage = tmp_path / "shared"
    (storage / "train" / "mydata").mkdir(parents=True)
    (storage / "train" / "mydata" / "results.csv").write_text("a,b\n1,2\n")
    common = ["--dataset", demo_small, "--epochs", "1", "--bits", "16", "--batch-size", "64",
              "--skip-baseline", "model.clip_preset=tiny", f"train.storage_path={storage}"]
    train_job.main([*common, "--output-dir", str(tmp_path / "a")])
    train_job.main([*common, "--output-dir", str(tmp_path / "b")])
    run_a, run_b = run_directory(str(tmp_path / "a")), run_directory(str(tmp_path / "b"))
    assert run_a != run_b
    for run in (run_a, run_b):
        assert list(Path(run).glob("checkpoint_*/meta.json")), run
    assert (storage / "train" / "mydata" / "results.csv").read_text() == "a,b\n1,2\n"
    # a fresh run naming an existing directory is refused, and deletes nothing
    with pytest.raises(ValueError, match="already exists"):
        train_job.main([*common, "--output-dir", str(tmp_path / "c"), "train.run_name=train"])
    assert (storage / "train" / "mydata" / "results.csv").exists()


def test_export_to_s3_writes_meta_last(tmp_path, s3_server, monkeypatch):
    """A checkpoint exported to an s3:// output directory: every exported file, meta.json (which
    makes it loadable) written after the weights, no optimizer state."""
    from dcgh_dist import storage
    from dcgh_dist.config import ModelConfig, TrainConfig
    from dcgh_dist.data.format import DatasetInfo
    from dcgh_dist.models.checkpoint import save_untrained, verified_meta

    endpoint, make_bucket = s3_server
    dest = f"{make_bucket('dcgh-export')}/runs/r1/checkpoint"
    info = DatasetInfo(name="t", num_classes=3, class_names=("a", "b", "c"))
    src = save_untrained(str(tmp_path / "src"), Config(model=ModelConfig(clip_preset="tiny", bits=16)), info)
    (Path(src) / "train_state.pt").write_bytes(b"optimizer")
    writes = []
    real = storage.write_bytes_atomic
    monkeypatch.setattr(storage, "write_bytes_atomic", lambda fs, path, data: (writes.append(path), real(fs, path, data)))
    export_checkpoint(src, dest, endpoint)
    assert sorted(w.rsplit("/", 1)[1] for w in writes) == ["meta.json", "model.pt", "proxies.pt"]
    assert writes[-1].endswith("checkpoint/meta.json")
    assert verified_meta(dest, endpoint).fingerprint == verified_meta(src).fingerprint
    # a resumed run's new export replaces the old one whole
    other = save_untrained(str(tmp_path / "other"), Config(model=ModelConfig(clip_preset="tiny", bits=16),
                                                           train=TrainConfig(seed=1)), info)
    export_checkpoint(other, dest, endpoint)
    assert verified_meta(dest, endpoint).fingerprint == verified_meta(other).fingerprint


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_train_writes_every_output_to_s3_and_resumes_from_there(tmp_path, demo_small, ray_cluster, s3_server):
    """`jobs/train.py --output-dir s3://...`, as the RayJob runs it: checkpoint, metrics, plots,
    config and run.json land under the prefix (metrics.json last: it marks a finished run), the
    Ray Train checkpoints under <prefix>/ray_results, and --resume finds the run from there."""
    import pyarrow.fs as pafs
    from dcgh_dist.jobs import train as train_job
    import yaml

    from dcgh_dist import storage
    from dcgh_dist.models.checkpoint import verified_meta

    endpoint, make_bucket = s3_server
    out = f"{make_bucket('dcgh-train-out')}/runs/r1"
    common = ["--dataset", demo_small, "--epochs", "1", "--bits", "16", "--batch-size", "64", "--skip-baseline",
              "model.clip_preset=tiny", f"data.s3_endpoint={endpoint}", "--output-dir", out]
    result = train_job.main(common).metrics
    fs, base = storage.resolve_filesystem(out, endpoint)
    names = {i.path[len(base) + 1:] for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if i.type == pafs.FileType.File and "/ray_results/" not in f"/{i.path[len(base) + 1:]}"}
    assert {"config.yaml", "metrics.json", "run.json", "pr_curve.png", "loss_curve.png", "checkpoint/meta.json",
            "checkpoint/model.pt"} <= names, names
    assert json.loads(storage.read_text(fs, f"{base}/metrics.json"))["map_i2t"] == result["map_i2t"]
    assert yaml.safe_load(storage.read_text(fs, f"{base}/config.yaml"))["train"]["output_dir"] == out
    assert storage.read_bytes(fs, f"{base}/pr_curve.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert verified_meta(f"{out}/checkpoint", endpoint).config.model.bits == 16
    run_dir = run_directory(out, endpoint)
    assert run_dir.startswith(f"{out}/ray_results/")
    # another run over a published model is refused before Ray starts, and changes nothing
    with pytest.raises(ValueError, match="never replaced by another run"):
        train_job.main([*common, "train.seed=1"])
    assert run_directory(out, endpoint) == run_dir
    # --resume reads run.json from the prefix and continues that run (one more epoch)
    resumed = train_job.main([*common, "--resume", "--epochs", "2"]).metrics
    assert run_directory(out, endpoint) == run_dir and resumed["epochs_run"] == 2
    assert verified_meta(f"{out}/checkpoint", endpoint).epoch == resumed["selected_epoch"]


def _tiny_dataset(root: Path, splits: list[str]) -> str:
    import io

    from PIL import Image

    from dcgh_dist.data.format import DatasetInfo, write_dataset

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    info = DatasetInfo(name="t", num_classes=2, class_names=("a", "b"))
    write_dataset(str(root), info, [{"id": i, "labels": [i % 2], "split": s, "image": buf.getvalue(),
                                     "text": f"t{i}"} for i, s in enumerate(splits)])
    return str(root)


def test_dataset_without_queries_fails_before_any_training(tmp_path):
    from dcgh_dist.train.runner import plan_run

    uri = _tiny_dataset(tmp_path / "d", ["train"] * 40 + ["db"] * 10)
    cfg = load_config(overrides={"data": {"dataset": uri, "batch_size": 8},
                                 "train": {"output_dir": str(tmp_path / "o")}})
    with pytest.raises(ValueError, match=r"0 'query' rows"):
        plan_run(cfg)


def test_resume_with_other_model_settings_names_them(tmp_path):
    from dcgh_dist.data.format import read_dataset_info
    from dcgh_dist.models.checkpoint import CheckpointMeta
    from dcgh_dist.train.runner import plan_run

    uri = _tiny_dataset(tmp_path / "d", ["train"] * 40 + ["query"] * 5 + ["db"] * 5)
    out = tmp_path / "o"
    storage = out / "ray_results"
    ckpt = storage / "run1" / "checkpoint_000000"
    ckpt.mkdir(parents=True)
    trained = load_config(overrides={"data": {"dataset": uri}, "model": {"bits": 64}})
    (ckpt / "meta.json").write_text(CheckpointMeta(trained, read_dataset_info(uri), epoch=1).to_json())
    (out / "run.json").write_text(json.dumps({"run_name": "run1", "storage_path": str(storage),
                                              "run_dir": str(storage / "run1")}))
    cfg = load_config(overrides={"data": {"dataset": uri, "batch_size": 8}, "model": {"bits": 32},
                                 "train": {"output_dir": str(out)}})
    with pytest.raises(ValueError, match=r"model.bits: 64 -> 32"):
        plan_run(cfg, resume=True)
    # the same settings resume
    same = load_config(overrides={"data": {"dataset": uri, "batch_size": 8}, "model": {"bits": 64},
                                  "train": {"output_dir": str(out)}})
    assert plan_run(same, resume=True).resume_ckpt.path.endswith("checkpoint_000000")


def test_train_job_mistakes_are_one_line_before_ray(tmp_path):
    import subprocess
    import time

    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--dataset", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dataset ")
    assert "Traceback" not in proc.stderr and time.time() - t0 < 60
    debug = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--dataset", str(tmp_path / "missing"),
                            "--debug"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_publish_dir_appears_whole_and_leaves_no_staging(tmp_path):
    """One way to publish a directory: a lost race keeps the winner's, ``replace`` swaps, a build
    that fails leaves nothing behind, and no staging directory survives any of them."""
    from dcgh_dist.storage import publish_dir

    final = tmp_path / "out"

    def writer(name):
        return lambda staging: (Path(staging) / name).write_text(name)

    publish_dir(str(final), writer("first"))
    publish_dir(str(final), writer("second"))  # another publisher came first: theirs stands
    assert sorted(p.name for p in final.iterdir()) == ["first"]
    publish_dir(str(final), writer("third"), replace=True)
    assert sorted(p.name for p in final.iterdir()) == ["third"]

    def broken(staging):
        (Path(staging) / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_dir(str(tmp_path / "never"), broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a directory in the way that lacks the marker is no one's finished copy: refused, kept
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "leftover").write_text("x")
    with pytest.raises(OSError):
        publish_dir(str(tmp_path / "partial"), writer("dataset.json"), marker="dataset.json")
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == ["leftover"]
    publish_dir(str(final), writer("other"), marker="third")  # holds the marker: published
    assert sorted(p.name for p in final.iterdir()) == ["third"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "partial"]
