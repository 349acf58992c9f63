"""One run-config schema (gsd.config): the flags, the saved config.json and DistillConfig agree."""

import dataclasses

from gsd import config, train
from gsd.distill import DistillConfig


def test_train_parser_defaults_are_the_schema():
    parsed = vars(train.build_parser().parse_args([]))
    assert parsed == config.RUN_DEFAULTS


def test_the_default_run_is_gsd_and_the_library_default_is_plain_sid():
    # the command's default run has the isometric term over neighbour groups ...
    assert config.RUN_DEFAULTS["lambda_irl"] > 0 and config.RUN_DEFAULTS["irl_neighbours"] > 0
    for key, value in config.GSD_DEFAULTS.items():
        assert config.RUN_DEFAULTS[key] == value, key
    for key in set(config.DISTILL_DEFAULTS) - set(config.GSD_DEFAULTS):
        assert config.RUN_DEFAULTS[key] == config.DISTILL_DEFAULTS[key], key
    d = DistillConfig.from_run_config(config.resolve_config({}))
    assert d.lambda_irl == config.GSD_DEFAULTS["lambda_irl"] and d.irl_neighbours == config.GSD_DEFAULTS["irl_neighbours"]
    # ... while a bare DistillConfig() is plain SiD
    assert DistillConfig().lambda_irl == 0 and DistillConfig().irl_neighbours == 0
    # gmm's 2-D latents: plain SiD unless asked (results/gmm/irl_sweep.md); asking still works
    gmm = config.resolve_config({"dataset": "gmm"})
    assert gmm["lambda_irl"] == 0 and gmm["irl_neighbours"] == 0
    asked = config.resolve_config({"dataset": "gmm", "lambda_irl": 0.1, "irl_neighbours": 1})
    assert asked["lambda_irl"] == 0.1 and asked["irl_neighbours"] == 1
    # shapes: weight 1 over the same groups (results/shapes/README.md § Defaults); conditional
    # digits keeps digits' weight; an explicit weight or a raw weight still wins on shapes
    shapes = config.resolve_config({"dataset": "shapes"})
    assert shapes["lambda_irl"] == 1.0 and shapes["irl_neighbours"] == config.GSD_DEFAULTS["irl_neighbours"]
    assert shapes["lambda_irl"] != config.GSD_DEFAULTS["lambda_irl"]
    assert config.resolve_config({"dataset": "digits", "conditional": True})["lambda_irl"] == config.GSD_DEFAULTS["lambda_irl"]
    assert config.resolve_config({"dataset": "shapes", "lambda_irl": 0.25})["lambda_irl"] == 0.25
    assert config.resolve_config({"dataset": "shapes", "lambda_irl_raw": 1.0})["lambda_irl"] == 0
    # every dataset's default batch holds whole anchor/neighbour groups
    for name, dd in config.DATASET_DEFAULTS.items():
        assert dd["batch"] % (config.GSD_DEFAULTS["irl_neighbours"] + 1) == 0, name


def test_gsd_defaults_step_aside_for_another_form_of_the_term():
    gsd = config.GSD_DEFAULTS
    # a raw weight, the JVP estimator or no SiD term: the scale-free default weight is dropped
    assert config.resolve_config({"lambda_irl_raw": 1.0})["lambda_irl"] == 0
    assert config.resolve_config({"lambda_sid": 0.0, "lambda_irl_raw": 1.0})["lambda_irl"] == 0
    jvp = config.resolve_config({"irl_estimator": "jvp", "lambda_irl_raw": 0.1})
    assert jvp["lambda_irl"] == 0 and jvp["irl_neighbours"] == 0
    # ... but what the user gave explicitly is kept (and refused later if it conflicts)
    both = config.resolve_config({"lambda_irl_raw": 1.0, "lambda_irl": 0.3})
    assert both["lambda_irl"] == 0.3
    assert config.resolve_config({"irl_estimator": "jvp", "irl_neighbours": 2})["irl_neighbours"] == 2
    # --lambda-irl 0 is "the same command without the regulariser": neighbour groups stay
    same = config.resolve_config({"lambda_irl": 0.0})
    assert same["lambda_irl"] == 0 and same["irl_neighbours"] == gsd["irl_neighbours"]


def test_from_run_config_maps_every_flag_named_field():
    # distinct non-default values, so a field that is not copied (or copied from the wrong key) shows
    given = dict(alpha=0.7, sigma_init=1.5, tmax=500, lambda_sid=0.5, lambda_irl=0.3, irl_estimator="pairs",
                 irl_neighbours=3, irl_radius=0.25, dropout=0.1, irl_weighting="local", irl_bandwidth=2.0,
                 irl_scale=4.0, batch=8, lr=1e-3, lr_fake=2e-3, adam_betas=[0.5, 0.9], ema_halflife=7.0,
                 ema_rampup=0.3, gen_loss_scale=3.0, seed=11, batch_per_gpu=4, precision="bf16", compile=True, grad_checkpoint=True,
                 lambda_regress=2.5, regress_pairs=99, regress_ratio=3, fused=True, lambda_adv=0.4,
                 adv_loss_scale_g=0.02, adv_loss_scale_d=1.5, adv_g_warmup=10, adv_mix_warmup=20, adv_clip=0.5)
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


def test_ema_rampup_defaults_per_dataset_and_for_old_runs():
    from gsd import runs
    assert config.resolve_config({"dataset": "digits"})["ema_rampup"] == config.DATASET_DEFAULTS["digits"]["ema_rampup"]
    assert config.resolve_config({"dataset": "gmm"})["ema_rampup"] == 0.05
    assert config.resolve_config({"dataset": "digits", "ema_rampup": 0.0})["ema_rampup"] == 0.0
    # a digits run saved before the flag existed had 0.05 (or 0.1, kept by its checkpoint), not
    # today's digits default
    old = config.resolve_config({"dataset": "digits"})
    del old["ema_rampup"]
    assert config.upgrade_config(old)["ema_rampup"] == 0.05


PROBE = '''
    Setting("probe_knob", 7, "a setting added by a test, as one row", group="train", type=positive_int),
    Setting("probe_field", 0.5, "a setting the Distiller reads, as one row", type=positive_float,
            field="probe_field"),
'''


def test_a_new_setting_is_one_row(tmp_path):
    """A setting declared by one row in gsd.config.SETTINGS (nothing else edited) has its flag and
    --help line, lands in config.json, is compared on --resume, and a DistillConfig field."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import gsd.config
    src = Path(gsd.config.__file__).read_text()
    marker = "    # ------------------------------------------------------------------ testing / experiment knobs"
    assert marker in src
    patched = tmp_path / "config_with_probe.py"
    patched.write_text(src.replace(marker, PROBE + marker))
    teacher = tmp_path / "t.safetensors"
    from factories import tiny_mlp
    from gsd.models.checkpoint import save_denoiser
    save_denoiser(teacher, tiny_mlp(seed=5))
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gsd.config', {str(patched)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['gsd.config'] = module\n"
        "spec.loader.exec_module(module)\n"
        "if sys.argv[1] == 'field':\n"
        "    from gsd.distill import DistillConfig\n"
        "    print(DistillConfig().probe_field, DistillConfig.from_run_config(module.resolve_config({'probe_field': 2.0})).probe_field)\n"
        "    sys.exit(0)\n"
        "from gsd import train\n"
        "from gsd.cli import run_main\n"
        "sys.exit(run_main(train.main, sys.argv[1:]))\n")
    repo = Path(__file__).resolve().parents[2]
    env = {**__import__("os").environ, "PYTHONPATH": str(repo)}

    def launch(*argv):
        return subprocess.run([sys.executable, str(launcher), *argv], env=env, capture_output=True, text=True,
                              timeout=300)

    helped = launch("--help")
    assert helped.returncode == 0 and "--probe-knob" in helped.stdout and "a setting added by a test" in helped.stdout
    out = tmp_path / "run"
    base = ["--dataset", "gmm", "--teacher", str(teacher), "--exact-teacher", "--batch", "16", "--iters", "2",
            "--eval-samples", "0", "--no-progress", "--device", "cpu", "--out", str(out)]
    done = launch(*base, "--probe-knob", "9")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["probe_knob"] == 9
    refused = launch("--resume", str(out), "--iters", "3", "--probe-knob", "10", "--no-progress")
    assert refused.returncode == 2 and "probe_knob" in refused.stderr, refused.stderr
    field = launch("field")
    assert field.returncode == 0 and field.stdout.split() == ["0.5", "2.0"], field.stderr
