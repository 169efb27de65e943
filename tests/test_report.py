"""jobs/report.py: the table is metrics.json's numbers (aggregated over seeds, best marked), the
HTML opens offline with real figures in it, and runs scored on other data are refused."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from dcgh_dist.cli import run_job
from dcgh_dist.data.format import DatasetInfo, write_dataset

REPO = Path(__file__).resolve().parents[1]

LINEAR = "linear (ridge + rotation)"


# -- helpers ----------------------------------------------------------------------------------


def parse_md_table(md: str) -> tuple[list[str], list[dict[str, str]]]:
    """The first Markdown table of ``md``: header and rows as {column: cell text}."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if line.startswith("|---"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return header, rows


def cell_value(text: str) -> tuple[float, float | None, bool]:
    """(mean, std or None, bold) of a table cell such as ``**0.1234 ± 0.0100**``."""
    bold = text.startswith("**") and text.endswith("**")
    m = re.fullmatch(r"(-?\d+\.\d+)(?: ± (\d+\.\d+))?", text.strip("*"))
    assert m, text
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None), bold


COLUMN_KEYS = {"mAP": "map", "NDCG@1000": "ndcg@1000", "P@1": "p@1", "P@10": "p@10", "P@100": "p@100",
               "P@1000": "p@1000"}


def metric_key(label: str) -> str:
    name, arrow = label.rsplit(" ", 1)
    return f"{COLUMN_KEYS[name]}_{'i2t' if arrow == 'i→t' else 't2i'}"


def fake_run(path: Path, dataset: str, bits: int, seed: int, values: dict, config: dict | None = None,
             **extra) -> Path:
    """A run directory with only metrics.json and config.yaml (no checkpoint); ``config`` adds
    to the config tree, e.g. ``{"loss": {"variance_weight": 0.0}}``."""
    path.mkdir(parents=True)
    tree = {"model": {"bits": bits}, "train": {"seed": seed, "output_dir": str(path)}}
    for section, keys in (config or {}).items():
        tree.setdefault(section, {}).update(keys)
    (path / "config.yaml").write_text(yaml.safe_dump(tree))
    (path / "metrics.json").write_text(json.dumps({"dataset": dataset, "num_query": 10, "num_database": 90,
                                                   **values, **extra}))
    return path


def tiny_feature_dataset(path: Path, n: int = 120, classes: int = 5, name: str = "tiny") -> str:
    rng = np.random.default_rng(1)
    splits = ["query"] * 20 + ["val"] * 10 + ["train"] * (n - 30)
    rows = [{"id": i, "labels": [int(i % classes)], "split": splits[i],
             "image_features": rng.standard_normal(8).tolist(), "text_features": rng.standard_normal(4).tolist()}
            for i in range(n)]
    info = DatasetInfo(name, classes, tuple(f"c{c}" for c in range(classes)), "image_features", "text_features", 8, 4)
    write_dataset(str(path), info, rows)
    return str(path)


# -- plain functions (no Ray) -----------------------------------------------------------------


def test_precision_at_n_equals_precision_at_k():
    from dcgh_dist.metrics import precision_at_k, precision_at_n

    rng = np.random.default_rng(0)
    q, d = rng.standard_normal((37, 16)), rng.integers(0, 2, (150, 16))  # relaxed and {0,1} codes
    ql, dl = rng.random((37, 6)) < 0.25, rng.random((150, 6)) < 0.25
    ns = [1, 2, 7, 50, 149, 150, 400]  # ties in distance, N = N_db and N > N_db
    # brute force: rank each query's database by Hamming distance, ties in database order
    qb, db = q >= 0, d > 0
    want = []
    for n in ns:
        per_query = []
        for i in range(len(q)):
            order = sorted(range(len(d)), key=lambda j: ((qb[i] != db[j]).sum(), j))[:n]
            per_query.append(sum((ql[i] & dl[j]).any() for j in order) / min(n, len(d)))
        want.append(np.mean(per_query))
    for chunk in (None, 5):
        got = precision_at_n(q, d, ql, dl, ns, chunk_size=chunk)
        assert got == pytest.approx(want, abs=1e-12)
        assert got == pytest.approx([precision_at_k(q, d, ql, dl, n) for n in ns], abs=1e-12)


def test_database_sample_is_deterministic_and_nested():
    from dcgh_dist.report.curves import n_grid, sample_ids

    ids = np.random.default_rng(0).permutation(10_000) * 3
    small, big = sample_ids(ids, 100), sample_ids(ids[::-1], 1000)
    assert len(small) == 100 and np.all(np.diff(small) > 0)
    assert np.array_equal(small, sample_ids(ids, 100))
    assert set(small) <= set(big)  # a larger cap keeps what a smaller one chose
    assert np.array_equal(sample_ids(ids, None), np.sort(ids))
    grid = n_grid(500, ks=(1, 10, 100, 1000))
    assert grid[0] == 1 and grid[-1] == 500 and {1, 10, 100} <= set(grid.tolist())


def test_table_aggregates_seeds_and_marks_the_best(tmp_path):
    from dcgh_dist.report.render import render_markdown, Report
    from dcgh_dist.report.runs import DatasetIdentity, load_runs
    from dcgh_dist.report.table import build_table

    ds = str(tmp_path / "ds")
    keys = ("map_i2t", "map_t2i", "p@10_i2t")
    a = fake_run(tmp_path / "a", ds, 16, 0, dict(zip(keys, (0.5, 0.4, 0.9))), untrained=dict(zip(keys, (0.1, 0.1, 0.2))))
    b = fake_run(tmp_path / "b", ds, 16, 1, dict(zip(keys, (0.7, 0.2, 0.8))), untrained=dict(zip(keys, (0.3, 0.1, 0.2))))
    # a second method, several bit lengths in one run, the method named in metrics.json
    c = fake_run(tmp_path / "c", ds, 64, 0, {}, method="daph",
                 by_bits={"16": dict(zip(keys, (0.6, 0.45, 0.1))), "32": dict(zip(keys, (0.8, 0.5, 0.3)))})
    table = build_table(load_runs([str(a), str(b), str(c)]))
    got = {(r.label, r.bits): r for r in table.rows}
    assert list(got) == [("daph", 16), ("dcgh", 16), ("untrained (dcgh)", 16), ("daph", 32)]
    dcgh = got[("dcgh", 16)]
    assert dcgh.seeds == [0, 1] and dcgh.cells["map_i2t"].mean == pytest.approx(0.6)
    assert dcgh.cells["map_i2t"].std == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert got[("daph", 32)].cells["map_i2t"].mean == 0.8 and got[("daph", 32)].cells["map_i2t"].std is None
    rows = {(r.label, r.bits): i for i, r in enumerate(table.rows)}
    assert table.best["map_i2t"] == [rows[("daph", 32)]]
    assert table.best["map_t2i"] == [rows[("daph", 32)]]
    assert table.best["p@10_i2t"] == [rows[("dcgh", 16)]]  # 0.85 mean
    md = render_markdown(Report("t", DatasetIdentity(ds, "x", 2, 10, 90, "f"), [], table))
    header, parsed = parse_md_table(md)
    assert header[:3] == ["method", "bits", "seeds"]
    row = next(r for r in parsed if r["method"] == "dcgh")
    assert row["seeds"] == "2 (0, 1)" and row["mAP i→t"] == "0.6000 ± 0.1414"
    assert row["P@10 i→t"] == "**0.8500 ± 0.0707**"


def test_runs_that_differ_in_config_are_rows_of_their_own_labelled_by_the_difference(tmp_path, capsys):
    """The first ablation a user runs: loss.variance_weight 1.0 vs 0.0, both seed 0. They are two
    experiments, not two seeds of one; a second seed of one of them joins its row."""
    from dcgh_dist.report.runs import RunError, load_runs
    from dcgh_dist.report.table import build_table

    ds = str(tmp_path / "ds")
    full = fake_run(tmp_path / "full", ds, 64, 0, {"map_i2t": 0.80, "map_t2i": 0.78},
                    config={"loss": {"variance_weight": 1.0}})
    novar = fake_run(tmp_path / "novar", ds, 64, 0, {"map_i2t": 0.70, "map_t2i": 0.66},
                     config={"loss": {"variance_weight": 0.0}})
    novar1 = fake_run(tmp_path / "novar1", ds, 64, 1, {"map_i2t": 0.72, "map_t2i": 0.68},
                      config={"loss": {"variance_weight": 0.0}})
    rows = {r.label: r for r in build_table(load_runs([str(full), str(novar)])).rows}
    assert set(rows) == {"dcgh (loss.variance_weight=1.0)", "dcgh (loss.variance_weight=0.0)"}
    assert rows["dcgh (loss.variance_weight=0.0)"].cells["map_i2t"].values == [0.70]  # its own mAP
    assert rows["dcgh (loss.variance_weight=1.0)"].cells["map_i2t"].std is None
    rows = {r.label: r for r in build_table(load_runs([str(full), str(novar), str(novar1)])).rows}
    assert rows["dcgh (loss.variance_weight=0.0)"].seeds == [0, 1]
    assert rows["dcgh (loss.variance_weight=0.0)"].cells["map_i2t"].mean == pytest.approx(0.71)
    # where a run wrote its outputs is not part of what it trained: seeds still join
    again = fake_run(tmp_path / "elsewhere" / "x", ds, 64, 1, {"map_i2t": 0.82, "map_t2i": 0.8},
                     config={"loss": {"variance_weight": 1.0}, "train": {"run_name": "other"}})
    [row] = [r for r in build_table(load_runs([str(full), str(again)])).rows if r.kind == "method"]
    assert row.label == "dcgh" and row.seeds == [0, 1]
    # the same experiment and seed twice is one result, never two seeds
    twin = fake_run(tmp_path / "twin", ds, 64, 0, {"map_i2t": 0.79, "map_t2i": 0.77},
                    config={"loss": {"variance_weight": 1.0}})
    with pytest.raises(RunError, match=r"same config and the same seed \(0\)"):
        load_runs([str(full), str(twin)])
    from dcgh_dist.jobs import report as report_job

    assert run_job(report_job.main, ["--runs", str(full), str(twin), "--output", str(tmp_path / "r")]) == 2
    assert "same config and the same seed" in capsys.readouterr().err


def test_refuses_what_is_not_a_finished_run(tmp_path, capsys):
    from dcgh_dist.jobs import report as report_job

    (tmp_path / "empty").mkdir()
    rc = run_job(report_job.main, ["--runs", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {tmp_path / 'empty'}: not a finished training run: no metrics.json"), err
    rc = run_job(report_job.main, ["--runs", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert rc == 2 and "missing: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_runs_on_other_splits_and_changed_datasets(tmp_path):
    from dcgh_dist.report.runs import RunError, check_comparable, load_runs

    ds = tiny_feature_dataset(tmp_path / "ds")
    vals = {"map_i2t": 0.5, "map_t2i": 0.5}
    a = fake_run(tmp_path / "a", ds, 16, 0, vals, num_query=20, num_database=100)
    b = fake_run(tmp_path / "b", ds, 16, 1, vals, num_query=20, num_database=80)
    with pytest.raises(RunError, match=rf"runs {a} and {b} were evaluated on different datasets or splits: "
                                       r"num_database 100 vs 80$"):
        check_comparable(load_runs([str(a), str(b)]))
    # the same content at another URI is the same dataset; other content is not
    copy = shutil.copytree(ds, tmp_path / "copy")
    c = fake_run(tmp_path / "c", str(copy), 16, 1, vals, num_query=20, num_database=100)
    identity, notes = check_comparable(load_runs([str(a), str(c)]))
    assert identity.num_query == 20 and notes == [f"{copy} (run {c}) holds the same dataset as {ds}"]
    other = tiny_feature_dataset(tmp_path / "other", classes=4, name="tiny")
    d = fake_run(tmp_path / "d", other, 16, 1, vals, num_query=20, num_database=100)
    with pytest.raises(RunError, match=r"dataset URI .*; dataset.json num_classes 5 vs 4; fingerprint"):
        check_comparable(load_runs([str(a), str(d)]))
    # a dataset rewritten since the run was scored on it
    e = fake_run(tmp_path / "e", ds, 16, 0, vals, num_query=25, num_database=95)
    with pytest.raises(RunError, match=rf"the dataset at {ds} has changed since run {e} .*num_query 25 vs 20"):
        check_comparable(load_runs([str(e)]))


# -- two real runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_features, ray_cluster) -> dict[str, Path]:
    """Two tiny runs on the feature demo (16 and 32 bits, 2 epochs), and a copy of the 32-bit
    one as if trained with seed 1 (other numbers), so that a row aggregates two seeds."""
    from dcgh_dist.jobs import train as train_job

    root = tmp_path_factory.mktemp("report_runs")
    out = {}
    for bits in (16, 32):
        out[bits] = root / f"dcgh-{bits}"
        train_job.main(["--dataset", demo_features, "--output-dir", str(out[bits]), "--bits", str(bits),
                        "--epochs", "2"])
    seed1 = root / "dcgh-32-seed1"
    shutil.copytree(out[32], seed1, ignore=shutil.ignore_patterns("ray_results"))
    cfg = yaml.safe_load((seed1 / "config.yaml").read_text())
    cfg["train"]["seed"] = 1
    (seed1 / "config.yaml").write_text(yaml.safe_dump(cfg))
    m = json.loads((seed1 / "metrics.json").read_text())

    def shift(d: dict, by: float) -> dict:
        return {k: (v + by if k.startswith(("map", "ndcg", "p@")) else v) for k, v in d.items()}

    m = {**shift(m, -0.03), "untrained": shift(m["untrained"], 0.01), "linear": shift(m["linear"], 0.02)}
    (seed1 / "metrics.json").write_text(json.dumps(m))
    out["32s1"] = seed1
    return out


@pytest.fixture(scope="module")
def report_dir(runs, tmp_path_factory) -> Path:
    from dcgh_dist.jobs import report as report_job

    out = tmp_path_factory.mktemp("report")
    report_job.main(["--runs", str(runs[16]), str(runs[32]), str(runs["32s1"]), "--output", str(out),
                     "--tsne-points", "600"])
    return out


def _expected_rows(runs) -> dict[tuple[str, int], list[dict]]:
    m = {k: json.loads((p / "metrics.json").read_text()) for k, p in runs.items()}
    return {("dcgh", 16): [m[16]], ("untrained", 16): [m[16]["untrained"]], (LINEAR, 16): [m[16]["linear"]],
            ("dcgh", 32): [m[32], m["32s1"]], ("untrained", 32): [m[32]["untrained"], m["32s1"]["untrained"]],
            (LINEAR, 32): [m[32]["linear"], m["32s1"]["linear"]]}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_table_is_the_runs_metrics(runs, report_dir):
    header, rows = parse_md_table((report_dir / "report.md").read_text())
    expected = _expected_rows(runs)
    assert [(r["method"], int(r["bits"])) for r in rows] == list(expected)
    columns = header[3:]
    assert columns[:4] == ["mAP i→t", "mAP t→i", "NDCG@1000 i→t", "NDCG@1000 t→i"]
    assert {"P@1 i→t", "P@10 t→i", "P@100 i→t", "P@1000 t→i"} <= set(columns)
    means = {}
    for r in rows:
        samples = expected[(r["method"], int(r["bits"]))]
        assert r["seeds"] == ("1 (0)" if len(samples) == 1 else "2 (0, 1)")
        for col in columns:
            values = [s[metric_key(col)] for s in samples]
            mean, std, _ = cell_value(r[col])
            assert mean == pytest.approx(math.fsum(values) / len(values), abs=5e-5), (r["method"], col)
            if len(values) > 1:
                assert std == pytest.approx(statistics.stdev(values), abs=5e-5)
            else:
                assert std is None
            means[(r["method"], int(r["bits"]), col)] = math.fsum(values) / len(values)
    # bold exactly where the highest mean of the column is
    for col in columns:
        top = max(v for (_, _, c), v in means.items() if c == col)
        for r in rows:
            assert cell_value(r[col])[2] == (means[(r["method"], int(r["bits"]), col)] == top), (r["method"], col)
    # report.json keeps the exact values: a single run's are metrics.json's own
    table = json.loads((report_dir / "report.json").read_text())["table"]
    row16 = next(r for r in table["rows"] if r["label"] == "dcgh" and r["bits"] == 16)
    m16 = json.loads((runs[16] / "metrics.json").read_text())
    assert all(row16["cells"][k]["mean"] == m16[k] for k in row16["cells"])


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_html_is_self_contained_with_real_figures(report_dir, tmp_path):
    from plots import line_pixels, read_plot

    page = (report_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), [r[:40] for r in refs]
    figures = re.findall(r'<figure id="([^"]+)" data-kind="([^"]+)">\s*<figcaption>[^<]*</figcaption>\s*'
                         r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    kinds = [k for _, k, _ in figures]
    assert kinds.count("curves") == 2 and kinds.count("tsne") == 2 and kinds.count("training") == 3, kinds
    for name, kind, data in figures:
        png = tmp_path / f"{name}.png"
        png.write_bytes(base64.b64decode(data, validate=True))
        rgb = read_plot(png)
        if kind == "curves":  # trained, untrained and linear: a colour each
            assert len(line_pixels(rgb)) >= 3, name
        elif kind == "training":  # val mAP, loss, the selected epoch
            assert len(line_pixels(rgb)) >= 3, name
        assert (report_dir / "figures" / f"{name}.png").read_bytes() == png.read_bytes()
    md = (report_dir / "report.md").read_text()
    assert md.count("](figures/") == len(figures)
    assert "Database: all 2,173 items" in md


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_reencoded_codes_are_the_runs_codes(runs, demo_features):
    """The curves come from codes equal to the ones the run was scored with."""
    from dcgh_dist.data.format import read_dataset_info
    from dcgh_dist.metrics import retrieval_metrics
    from dcgh_dist.models.encoder import Encoder
    from dcgh_dist.report.codes import choose_rows, encode_rows

    info = read_dataset_info(demo_features)
    rows = choose_rows(demo_features, None, None)
    codes, ok = encode_rows(demo_features, info, None, rows,
                            {"m": Encoder.from_checkpoint(str(runs[16] / "checkpoint"), device="cpu")})
    assert all(v.all() for v in ok.values())
    m = json.loads((runs[16] / "metrics.json").read_text())
    got = retrieval_metrics(codes["m"]["query"]["image"], codes["m"]["db"]["text"], rows.labels["query"],
                            rows.labels["db"])
    assert got == pytest.approx({k.removesuffix("_i2t"): v for k, v in m.items() if k.endswith("_i2t")}, abs=1e-9)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_database_cap_is_said(runs, tmp_path):
    from dcgh_dist.jobs import report as report_job

    report_job.main(["--runs", str(runs[16]), "--output", str(tmp_path), "--max-items", "500", "--tsne-points", "0"])
    md = (tmp_path / "report.md").read_text()
    assert "The database is capped at 500 of its 2,173 items (--max-items 500" in md
    assert "Code maps" not in md


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_refuses_a_run_on_another_dataset(runs, tmp_path, capsys):
    from dcgh_dist.jobs import report as report_job

    other = tiny_feature_dataset(tmp_path / "other")
    fake = tmp_path / "fake"
    shutil.copytree(runs[16], fake, ignore=shutil.ignore_patterns("ray_results"))
    m = json.loads((fake / "metrics.json").read_text())
    (fake / "metrics.json").write_text(json.dumps({**m, "dataset": other, "num_query": 20, "num_database": 100}))
    rc = run_job(report_job.main, ["--runs", str(runs[16]), str(fake), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    msg = err[0]
    assert msg.startswith(f"error: runs {runs[16]} and {fake} were evaluated on different datasets or splits: "), msg
    uri = json.loads((runs[16] / "metrics.json").read_text())["dataset"]
    for part in (f"dataset URI {uri} vs {other}",
                 "dataset.json name demo-features vs tiny", "dataset.json num_classes 10 vs 5",
                 "num_query 693 vs 20", "num_database 2173 vs 100"):
        assert part in msg, (part, msg)
    assert not (tmp_path / "out" / "report.md").exists()
