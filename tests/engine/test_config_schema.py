"""One run-config schema (gsd.config): the flags, the saved config.json and DistillConfig agree."""

import dataclasses

from gsd import config, train
from gsd.distill import DistillConfig


def test_train_parser_defaults_are_the_schema():
    parsed = vars(train.build_parser().parse_args([]))
    assert parsed == config.RUN_DEFAULTS


def test_distill_defaults_feed_the_schema():
    for key, value in config.DISTILL_DEFAULTS.items():
        assert config.RUN_DEFAULTS[key] == value, key


def test_from_run_config_maps_every_flag_named_field():
    # distinct non-default values, so a field that is not copied (or copied from the wrong key) shows
    given = dict(alpha=0.7, sigma_init=1.5, tmax=500, lambda_sid=0.5, lambda_irl=0.3, irl_estimator="pairs",
                 irl_neighbours=3, irl_radius=0.25, dropout=0.1, irl_weighting="local", irl_bandwidth=2.0,
                 irl_scale=4.0, batch=8, lr=1e-3, lr_fake=2e-3, adam_betas=[0.5, 0.9], ema_halflife=7.0,
                 gen_loss_scale=3.0, seed=11, batch_per_gpu=4, precision="bf16", compile=True, grad_checkpoint=True,
                 fused=True)
    cfg = config.resolve_config(given)
    d = DistillConfig.from_run_config(cfg)
    renamed = {"adam_betas": "betas", "batch_per_gpu": "batch_per_rank"}
    for key, value in given.items():
        if key == "fused":
            continue
        got = getattr(d, renamed.get(key, key))
        assert (list(got) if key == "adam_betas" else got) == value, key
    assert d.backend == "auto"
    assert DistillConfig.from_run_config(config.resolve_config({})).backend == "reference"
    # every run-config key that names a DistillConfig field (flag name == field name) is mapped
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    same_named = fields & set(config.RUN_DEFAULTS)
    assert same_named <= set(given) | {"lambda_irl_raw", "irl_estimator"}


def test_resolve_config_refuses_unknown_keys():
    import pytest

    from gsd.errors import UsageError

    with pytest.raises(UsageError, match="unknown config keys: nope"):
        config.resolve_config({"nope": 1})
