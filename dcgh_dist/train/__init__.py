"""Training: the per-worker loop (Ray Train), the driver that launches it, and the experiment
around it (train, evaluate, write the run's outputs).

    from dcgh_dist.train import run_experiment, run_sweep
"""

_EXPERIMENT = ("Result", "run_experiment", "run_sweep")


def __getattr__(name: str):
    # Resolved on first use: a Ray Train worker imports dcgh_dist.train.loop and must not pay for
    # the experiment's evaluation and plotting imports (nor import anything at package import).
    if name in _EXPERIMENT:
        from dcgh_dist.train import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
