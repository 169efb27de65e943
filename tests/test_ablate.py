"""jobs/ablate.py: each variant applies exactly its overrides, mistakes are one error line before
Ray starts, variants are rows of their own in the report, and ablation.md is the runs' metrics.json."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml

from dcgh_dist.cli import run_job

REPO = Path(__file__).resolve().parents[1]

from dcgh_dist.jobs import ablate  # noqa: E402

EXPECTED = {
    "full": {},
    "proxy-only": {"pairwise_pos_weight": 0, "pairwise_neg_weight": 0, "variance_weight": 0},
    "pairwise-only": {"proxy_weight": 0, "variance_weight": 0},
    "no-variance": {"variance_weight": 0},
    "gather-local": {"gather": "local"},
    "variance-masked": {"variance_mode": "masked"},
}


def md_rows(md: str) -> list[dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def mean_std(text: str) -> tuple[float, float | None]:
    m = re.fullmatch(r"\**(-?\d+\.\d+)(?: ± (\d+\.\d+))?\**", text)
    assert m, text
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None)


# -- the variant table (no Ray) ---------------------------------------------------------------


def test_variants_apply_exactly_their_overrides():
    from dcgh_dist.config import Config, load_config
    from dcgh_dist.report.ablation import VARIANTS

    assert list(VARIANTS) == list(EXPECTED)
    defaults = Config().loss.__dict__
    for name, changes in EXPECTED.items():
        loss = load_config(overrides=list(VARIANTS[name])).loss.__dict__
        assert {k: v for k, v in loss.items() if defaults[k] != v} == changes, name
    # the reference really is the defaults, and each ablated term is on by default
    assert all(defaults[k] not in (0, "local", "masked") for changes in EXPECTED.values() for k in changes)


def test_unknown_variant_is_one_error_line_listing_the_valid_ones(capsys):
    import ray

    from dcgh_dist.report.ablation import variant_overrides

    ray_before = ray.is_initialized()  # the session's cluster may be up already (test order)
    rc = run_job(ablate.main, ["--dataset", "demo-features", "--output", "/nonexistent/abl",
                               "--variants", "full", "no-proxies"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1, err
    assert "no-proxies" in err[0] and all(name in err[0] for name in EXPECTED)
    assert ray.is_initialized() == ray_before  # refused before any Ray was started
    with pytest.raises(ValueError, match="valid variants: full, proxy-only"):
        variant_overrides("proxy")
    assert run_job(ablate.main, ["--dataset", "demo-features", "--output", "/nonexistent/abl",
                                 "--variants", "full", "full"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_run_command_lines(tmp_path, capsys):
    from dcgh_dist.jobs.train import build_config, parse_args

    args = ablate.parse_args(["--dataset", "demo-features", "--output", str(tmp_path), "--bits", "16",
                              "loss.variance_weight=0.5", "optim.head_lr=3e-4"])
    assert args.num_workers == 2 and args.seeds == [0] and args.variants == list(EXPECTED)
    for variant, seed in (("full", 0), ("no-variance", 3), ("gather-local", 1)):
        argv = ablate.train_argv(args, str(tmp_path / "r"), variant, seed)
        cfg = build_config(parse_args(argv))
        assert (cfg.model.bits, cfg.train.num_workers, cfg.train.seed) == (16, 2, seed)
        assert cfg.optim.head_lr == 3e-4 and cfg.train.output_dir == str(tmp_path / "r")
        # the user's override stays for the full run; the variant wins on the key it ablates
        assert cfg.loss.variance_weight == (0 if variant == "no-variance" else 0.5)
        assert cfg.loss.gather == ("local" if variant == "gather-local" else "global")
    # the ablation sets the seed and the run directory itself
    for override, flag in (("train.seed=4", "--seeds"), ("train.output_dir=/x", "--output")):
        assert run_job(ablate.main, ["--dataset", "demo-features", "--output", str(tmp_path), override]) == 2
        assert flag in capsys.readouterr().err


def test_finished_runs_are_refused_or_kept_never_overwritten(tmp_path, capsys):
    from dcgh_dist.jobs.train import build_config, parse_args

    out = tmp_path / "abl"
    argv = ["--dataset", str(tmp_path / "no-such-dataset"), "--output", str(out), "--variants", "no-variance"]
    run_dir = out / "runs" / "no-variance-s0"
    run_dir.mkdir(parents=True)
    cfg = build_config(parse_args(ablate.train_argv(ablate.parse_args(argv), str(run_dir),
                                                                "no-variance", 0)))
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "metrics.json").write_text(json.dumps({"map_i2t": 0.5}))
    assert run_job(ablate.main, argv) == 2
    assert "--reuse" in capsys.readouterr().err
    # with --reuse the run is kept; the next check is the dataset (here: missing), still before Ray
    assert run_job(ablate.main, argv + ["--reuse"]) == 2
    assert "no-such-dataset" in capsys.readouterr().err
    # a finished run of another config is never kept (nor deleted)
    (run_dir / "config.yaml").write_text(cfg.to_yaml().replace("variance_weight: 0.0", "variance_weight: 1.0"))
    assert run_job(ablate.main, argv + ["--reuse"]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "loss.variance_weight 0.0 vs 1.0" in err
    assert (run_dir / "metrics.json").exists()


def test_variants_are_rows_of_their_own_sharing_the_baselines(tmp_path):
    from dcgh_dist.report.ablation import ablation_markdown
    from dcgh_dist.report.runs import load_runs
    from dcgh_dist.report.table import build_table

    ds = str(tmp_path / "ds")
    values = {("full", 0): (0.60, 0.50), ("full", 1): (0.64, 0.52), ("no-variance", 0): (0.55, 0.51),
              ("no-variance", 1): (0.57, 0.49)}
    paths = []
    for (variant, seed), (i2t, t2i) in values.items():
        p = tmp_path / f"{variant}-s{seed}"
        p.mkdir()
        (p / "config.yaml").write_text(yaml.safe_dump({"model": {"bits": 32}, "train": {"seed": seed}}))
        (p / "metrics.json").write_text(json.dumps({
            "dataset": ds, "num_query": 10, "num_database": 90, "method": "dcgh", "variant": variant,
            "map_i2t": i2t, "map_t2i": t2i, "untrained": {"map_i2t": 0.1 + seed, "map_t2i": 0.2}}))
        paths.append(str(p))
    table = build_table(load_runs(paths))
    assert [(r.kind, r.label) for r in table.rows] == [("method", "full"), ("method", "no-variance"),
                                                       ("untrained", "untrained")]
    assert all(r.method == "dcgh" for r in table.rows[:2])
    assert table.rows[2].seeds == [0, 1]  # one baseline per seed, shared by the variants
    rows = {r["variant"]: r for r in md_rows(ablation_markdown(table, ["full", "no-variance"], 32,
                                                               {"full": [0, 1], "no-variance": [0, 1]}))}
    assert rows["full"]["mAP i→t"] == f"0.6200 ± {statistics.stdev([0.60, 0.64]):.4f}"
    assert rows["full"]["Δ i→t vs full"] == "(reference)" and rows["full"]["overrides"] == "(defaults)"
    assert rows["no-variance"]["overrides"] == "`loss.variance_weight=0`"
    assert rows["no-variance"]["Δ i→t vs full"] == "-0.0600" and rows["no-variance"]["Δ t→i vs full"] == "-0.0100"
    assert rows["no-variance"]["seeds"] == "0, 1"
    # without the variant key a run is its method's row, as before
    plain = json.loads(Path(paths[0], "metrics.json").read_text())
    del plain["variant"]
    Path(paths[0], "metrics.json").write_text(json.dumps(plain))
    assert [r.label for r in build_table(load_runs(paths[:1])).rows] == ["dcgh", "untrained"]


# -- a real ablation ----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ablation_table_is_the_runs_metrics(ray_cluster, demo_features, tmp_path, capsys):
    out = tmp_path / "abl"
    result = ablate.main(["--dataset", demo_features, "--output", str(out), "--variants", "full", "no-variance",
                          "--seeds", "0", "--epochs", "2", "--bits", "16", "--batch-size", "64",
                          "--tsne-points", "0"])
    printed = capsys.readouterr().out
    md = (out / "ablation.md").read_text()
    assert md_rows(md) == md_rows(printed[printed.index("| variant"):])
    rows = {r["variant"]: r for r in md_rows(md)}
    assert list(rows) == ["full", "no-variance"]
    metrics = {v: json.loads((out / "runs" / f"{v}-s0" / "metrics.json").read_text()) for v in rows}
    for v, m in metrics.items():
        assert m["variant"] == v and m["method"] == "dcgh"
        cfg = yaml.safe_load((out / "runs" / f"{v}-s0" / "config.yaml").read_text())
        assert cfg["model"]["bits"] == 16 and cfg["train"]["num_workers"] == 2 and cfg["train"]["epochs"] == 2
        assert cfg["loss"]["variance_weight"] == (0 if v == "no-variance" else 1.0)
        for key, col in (("map_i2t", "mAP i→t"), ("map_t2i", "mAP t→i")):
            mean, std = mean_std(rows[v][col])
            assert std is None and mean == pytest.approx(m[key], abs=5e-5)
    # the untrained model is evaluated once per seed: the loss does not change where training starts
    assert metrics["full"]["untrained"] and metrics["no-variance"]["untrained"] is None
    for key, col in (("map_i2t", "Δ i→t vs full"), ("map_t2i", "Δ t→i vs full")):
        assert float(rows["no-variance"][col]) == pytest.approx(metrics["no-variance"][key] - metrics["full"][key],
                                                                abs=5e-5)
    # the report: one row per variant, one shared untrained row, the linear baseline
    report = (out / "report" / "report.md").read_text()
    assert result["report"] == str(out / "report" / "report.md") and (out / "report" / "report.html").exists()
    labels = [r["method"] for r in md_rows(report)[:4]]
    assert labels == ["full", "no-variance", "untrained", "linear (ridge + rotation)"]
    table = json.loads((out / "report" / "report.json").read_text())["table"]
    full = next(r for r in table["rows"] if r["label"] == "full")
    assert math.isclose(full["cells"]["map_i2t"]["mean"], metrics["full"]["map_i2t"], rel_tol=0, abs_tol=0)
