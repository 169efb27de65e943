import re

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
    from dcgh_dist.jobs.train import build_config, parse_args

    args = parse_args(["loss.variance_mode=masked", "--dataset", "demo", "optim.head_lr=3e-4",
                           "--num-workers", "2", "train.engine=deepspeed", "train.zero_stage=2"])
    cfg = build_config(args)
    assert (cfg.train.num_workers, cfg.train.engine, cfg.train.zero_stage) == (2, "deepspeed", 2)
    assert cfg.loss.variance_mode == "masked" and cfg.optim.head_lr == 3e-4


def _job(name: str):
    import importlib

    return importlib.import_module(f"dcgh_dist.jobs.{name}")


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
    assert job.job_config(job.parse_args(base)).index.nlist == 64
    assert job.job_config(job.parse_args([*base, "--nlist", "32"])).index.nlist == 32
    cfg = job.job_config(job.parse_args(["index.nlist=16", *base, "--nlist", "32"])).index
    assert (cfg.index_type, cfg.nlist, cfg.nprobe) == ("ivf", 16, 8)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['index.nlistt'\]"):
        job.job_config(job.parse_args([*base, "index.nlistt=3"]))
    enc = _job("encode")
    args = enc.parse_args(["--checkpoint", "c", "--dataset", "d", "--output", "o", "--batch-size", "8",
                           "encode.precision=bf16", "--splits", "train,db"])
    from dcgh_dist.cli import config_from_args

    e = config_from_args(args, enc.FLAGS).encode
    assert (e.batch_size, e.precision, e.splits) == (8, "bf16", ("train", "db"))


# The required arguments of each job's parser, so that its config can be built without running it.
_REQUIRED = {
    "train": [], "encode": ["--checkpoint", "c", "--dataset", "d", "--output", "o"],
    "build_index": ["--codes", "c", "--output", "o"], "evaluate": ["--dataset", "d"],
    "prepare_data": ["--dataset", "coco", "--input", "i", "--output", "o"], "report": ["--runs", "r", "--output", "o"],
}


def _tree(name: str, argv: list[str]):
    from dcgh_dist.cli import config_from_args

    job = _job(name)
    args = job.parse_args([*_REQUIRED[name], *argv])
    if name == "train":
        return job.build_config(args)
    return config_from_args(args, job.FLAGS, reads=job.READS)


@pytest.mark.parametrize("name", sorted(_REQUIRED))
def test_every_job_reads_one_tree_where_flags_are_aliases_of_keys(name):
    """The S3 endpoint is one key (data.s3_endpoint) in every job, and --s3-endpoint its alias;
    the Ray settings are the ray section, --ray-address/--num-cpus/--ray-temp-dir their aliases.
    `jobs/encode.py data.s3_endpoint=...` used to be accepted and ignored."""
    endpoint = "http://127.0.0.1:9"
    assert _tree(name, [f"data.s3_endpoint={endpoint}"]).data.s3_endpoint == endpoint
    assert _tree(name, ["--s3-endpoint", endpoint]).data.s3_endpoint == endpoint
    if name not in ("prepare_data", "report"):  # the jobs that start Ray
        by_flag = _tree(name, ["--ray-address", "127.0.0.1:6379", "--num-cpus", "3", "--ray-temp-dir", "/tmp/r"]).ray
        by_key = _tree(name, ["ray.address=127.0.0.1:6379", "ray.num_cpus=3", "ray.temp_dir=/tmp/r"]).ray
        assert by_flag == by_key and (by_key.address, by_key.num_cpus, by_key.temp_dir) == ("127.0.0.1:6379", 3, "/tmp/r")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['ray.adress'\]"):
        _tree(name, ["ray.adress=x"])


@pytest.mark.parametrize("name, ignored", [("encode", "optim.head_lr=1"), ("build_index", "encode.batch_size=8"),
                                           ("evaluate", "train.epochs=3"), ("train", "index.nlist=8"),
                                           ("prepare_data", "model.bits=32"), ("report", "loss.variance_weight=0")])
def test_an_override_the_job_does_not_read_is_refused(name, ignored):
    key = ignored.split("=")[0]
    with pytest.raises(ValueError, match=rf"this job does not read {re.escape(key)}: it would be ignored"):
        _tree(name, [ignored])


def test_configs_saved_before_the_ray_section_still_load():
    """Checkpoints, code shards and manifests hold the config as it was: train.ray_address and
    train.ray_num_cpus are now ray.address and ray.num_cpus."""
    from dcgh_dist.config import Config

    old = Config().to_dict()
    del old["ray"]
    old["train"].update(ray_address="127.0.0.1:6379", ray_num_cpus=4)
    cfg = Config.from_dict(old)
    assert (cfg.ray.address, cfg.ray.num_cpus) == ("127.0.0.1:6379", 4)
    assert "ray_address" not in cfg.to_dict()["train"]
