import pytest

from dcgh_dist.config import Config, load_config, parse_overrides


def test_defaults_are_the_authors_setting():
    c = Config()
    assert (c.optim.tower_lr, c.optim.head_lr, c.optim.weight_decay) == (1e-5, 1e-3, 0.2)
    assert (c.optim.warmup_fraction, c.optim.schedule) == (0.1, "warmup_cosine")
    assert (c.data.batch_size, c.model.context_length, c.model.bits) == (128, 32, 64)
    assert (c.loss.pairwise_neg_weight, c.loss.pairwise_pos_weight, c.loss.variance_mode) == (0.8, 0.05, "reference")
    assert (c.loss.proxy_lr, c.loss.proxy_momentum, c.loss.proxy_weight_decay) == (0.02, 0.9, 5e-4)


def test_layers_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  bits: 32\noptim:\n  head_lr: 0.01\n")
    c = load_config(y, ["optim.head_lr=3e-4", "loss.variance_mode=masked", "eval.precision_k=[1,5]"],
                    preset={"model": {"bits": 16, "clip_preset": "tiny"}})
    assert c.model.bits == 32  # YAML beats preset
    assert c.model.clip_preset == "tiny"  # preset beats default
    assert c.optim.head_lr == 3e-4  # override beats YAML
    assert c.loss.variance_mode == "masked"
    assert c.eval.precision_k == (1, 5)


def test_round_trip_through_dict_and_yaml(tmp_path):
    c = load_config(overrides=["model.bits=128", "model.feature_hidden=[64,32]"])
    assert Config.from_dict(c.to_dict()) == c
    p = tmp_path / "x.yaml"
    p.write_text(c.to_yaml())
    assert load_config(p) == c


@pytest.mark.parametrize(
    "override,match",
    [
        # the message keeps the dotted path the user typed
        ("model.bitz=3", r"unknown config key\(s\) \['model.bitz'\]; valid keys under 'model'"),
        ("model.bits=12", "model.bits must be one of"),
        ("loss.variance_mode=median", "config loss.variance_mode: 'median' is not one of"),
        ("optim.head_lr=fast", "config optim.head_lr: expected a number"),
        ("train.epochs=abc", "config train.epochs: expected an integer"),
        ("train.epochs=0", "epochs"),
        ("nonsense", "section.key=value"),
    ],
)
def test_bad_values_fail_loudly(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=[override])


def test_broken_yaml_is_a_one_line_error_naming_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  bits: [32\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML") as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_train_job_takes_overrides_between_flags():
    """`jobs/train.py` as people type it: overrides before, between and after flags."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "train_job", pathlib.Path(__file__).resolve().parents[1] / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = job.parse_args(["loss.variance_mode=masked", "--dataset", "demo", "optim.head_lr=3e-4",
                           "--num-workers", "2", "train.engine=deepspeed", "train.zero_stage=2"])
    cfg = job.build_config(args)
    assert (cfg.train.num_workers, cfg.train.engine, cfg.train.zero_stage) == (2, "deepspeed", 2)
    assert cfg.loss.variance_mode == "masked" and cfg.optim.head_lr == 3e-4


def _job(name: str):
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        f"{name}_job", pathlib.Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.mark.parametrize("name", ["train", "encode", "build_index", "evaluate", "prepare_data"])
def test_every_job_flag_is_a_key_of_the_one_tree(name):
    import dataclasses

    from dcgh_dist.config import Config

    cfg = Config()
    tree = {f.name: {g.name for g in dataclasses.fields(getattr(cfg, f.name))} for f in dataclasses.fields(cfg)}
    for dest, dotted in _job(name).FLAGS.items():
        section, key = dotted.split(".")
        assert key in tree[section], f"jobs/{name}.py --{dest} maps to unknown key {dotted}"


def test_jobs_layer_yaml_flags_and_overrides_the_same_way(tmp_path):
    """defaults <- YAML <- flags <- overrides, in a job other than train (here build_index)."""
    job = _job("build_index")
    y = tmp_path / "idx.yaml"
    y.write_text("index: {index_type: ivf, nlist: 64, nprobe: 8}\n")
    base = ["--codes", "c", "--output", "o", "--config", str(y)]
    assert job.index_config(job.parse_args(base)).nlist == 64
    assert job.index_config(job.parse_args([*base, "--nlist", "32"])).nlist == 32
    cfg = job.index_config(job.parse_args(["index.nlist=16", *base, "--nlist", "32"]))
    assert (cfg.index_type, cfg.nlist, cfg.nprobe) == ("ivf", 16, 8)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['index.nlistt'\]"):
        job.index_config(job.parse_args([*base, "index.nlistt=3"]))
    enc = _job("encode")
    args = enc.parse_args(["--checkpoint", "c", "--dataset", "d", "--output", "o", "--batch-size", "8",
                           "encode.precision=bf16", "--splits", "train,db"])
    from dcgh_dist.cli import config_from_args

    e = config_from_args(args, enc.FLAGS).encode
    assert (e.batch_size, e.precision, e.splits) == (8, "bf16", ("train", "db"))
