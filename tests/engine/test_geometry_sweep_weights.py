"""benchmarks/geometry_sweep.py's weight figure places each run at the weight its own config.json
records, and keeps plain SiD and other estimators off the lambda_irl curve."""

import json
from pathlib import Path

from benchmark_scripts import load_benchmark


def _sweep_module():
    return load_benchmark("geometry_sweep")


def _run(root: Path, name: str, config: dict, ppl: float | None, record: bool = True) -> None:
    d = root / name
    d.mkdir()
    base = {"lambda_irl": 0.25, "lambda_irl_raw": 0.0, "irl_neighbours": 3, "irl_estimator": "pairs"}
    (d / "config.json").write_text(json.dumps({**base, **config}))
    if record:
        (d / "sweep_record.json").write_text(json.dumps({"values": {"ppl": ppl}}))


def test_weight_sweep_reads_each_runs_weight_and_separates_plain_sid(tmp_path):
    sweep = _sweep_module()
    _run(tmp_path, "gsd-s0", {}, 10.0)  # placed at the weight its config.json records, 0.25
    _run(tmp_path, "gsd-s1", {}, 12.0)
    _run(tmp_path, "same-batch-s0", {"lambda_irl": 0.0}, 20.0)
    _run(tmp_path, "nbr3-1-s0", {"lambda_irl": 1.0}, 7.0)
    _run(tmp_path, "nbr3-3-s0", {"lambda_irl": 3.0}, None)  # no figure: left out, not plotted as 0
    _run(tmp_path, "nbr3-0.5-s0", {"lambda_irl": 0.5}, 9.0, record=False)  # not evaluated yet
    _run(tmp_path, "plain-sid-s0", {"lambda_irl": 0.0, "irl_neighbours": 0}, 30.0)
    _run(tmp_path, "plain-sid-s1", {"lambda_irl": 0.0, "irl_neighbours": 0}, 34.0)
    _run(tmp_path, "jvp-s0", {"irl_estimator": "jvp"}, 1.0)  # another estimator: not this curve
    _run(tmp_path, "raw-s0", {"lambda_irl": 0.0, "lambda_irl_raw": 5.0}, 2.0)  # raw weight: not this axis

    settings = ["gsd", "same-batch", "nbr3-1", "nbr3-3", "nbr3-0.5", "plain-sid", "jvp", "raw"]
    curve, plain = sweep.weight_sweep(tmp_path, settings, [0, 1], "ppl")

    assert curve == {0.0: {0: 20.0}, 0.25: {0: 10.0, 1: 12.0}, 1.0: {0: 7.0}}
    assert plain == {0: 30.0, 1: 34.0}


def test_weight_figure_is_written_once_three_weights_have_a_figure(tmp_path):
    sweep = _sweep_module()
    _run(tmp_path, "same-batch-s0", {"lambda_irl": 0.0}, 20.0)
    _run(tmp_path, "gsd-s0", {}, 10.0)
    study = sweep.STUDIES["shapes1"]
    sweep.plot_weights(study, tmp_path, ["same-batch", "gsd", "nbr3-1"], [0], tmp_path / "two.png")
    assert not (tmp_path / "two.png").exists()  # two weights are not a curve
    _run(tmp_path, "nbr3-1-s0", {"lambda_irl": 1.0}, 7.0)
    sweep.plot_weights(study, tmp_path, ["same-batch", "gsd", "nbr3-1"], [0], tmp_path / "three.png")
    assert (tmp_path / "three.png").stat().st_size > 10_000
