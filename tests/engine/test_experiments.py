"""`python -m gsd.experiments` at a tiny (hidden --tiny) size: runs, tables, figures, reuse; and the
guarded sections that call other modules (gsd.evaluation.guidance, gsd.edit)."""

import json

from gsd import experiments, runs, study
from gsd.cli import run_main

PNG = b"\x89PNG\r\n\x1a\n"


def test_tiny_experiments_end_to_end(tmp_path, capsys, monkeypatch):
    from factories import tiny_unet
    from gsd.models.checkpoint import save_denoiser

    teacher = tmp_path / "tiny_teacher.safetensors"
    save_denoiser(teacher, tiny_unet())
    root = tmp_path / "exp"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-inception"))  # no Inception weights: FID is not computed
    argv = ["--tiny", "--root", str(root), "--teacher", str(teacher), "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "--seed", "0", "--latency-repeats", "1"]
    code = run_main(experiments.main, argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    text = (root / "results.md").read_text()
    assert "## Table 1" in text and "## Table 2" in text
    assert "MSA: teacher Heun" in text and "GSD one-step (full loss)" in text
    for row in ("full loss (SiD + isometric)", "without the isometric loss", "plain SiD (--lambda-irl 0 --irl-neighbours 0)",
                "without the distillation loss"):
        assert row in text
    assert "Inference time reduction" in text and "PPL" in text and "isometry defect" in text
    assert "torch" in text and "cores" in text and "seed 0" in text
    assert "FID: **not computed**" in text and "pt_inception" in text
    assert "DSG guidance" in text and "Latent editing" in text
    for name in ("loss_curves.png", "fd_over_training.png", "latency.png", "samples.png"):
        assert (root / name).read_bytes()[:8] == PNG, name
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(dirs) == len(study.VARIANTS) == 4
    for d in dirs:
        assert runs.latest_step(d) == 3
        ev = json.loads((d / "eval.json").read_text())
        assert ev["step"] == 3 and ev["one_step"]["nfe"] == 1
        curve = json.loads((d / "fd_curve.json").read_text())["curve"]
        assert [c["iteration"] for c in curve] == [0, 1, 2, 3]
    cfg = {d.name[len("digits-"):].rsplit("-", 1)[0]: json.loads((d / "config.json").read_text()) for d in dirs}
    assert set(cfg) == set(study.VARIANTS)
    assert cfg["full"]["lambda_irl"] > 0 and cfg["full"]["lambda_sid"] == 1
    assert cfg["no-irl"]["lambda_irl"] == 0 and cfg["no-irl"]["irl_neighbours"] == cfg["full"]["irl_neighbours"]
    assert cfg["plain-sid"]["lambda_irl"] == 0 and cfg["plain-sid"]["irl_neighbours"] == 0
    assert cfg["no-sid"]["lambda_sid"] == 0 and cfg["no-sid"]["lambda_irl_raw"] == 1
    assert all(c["lambda_irl_raw"] == 0 for v, c in cfg.items() if v != "no-sid")

    # a second invocation reuses the three runs (no training) and rewrites the results, also when
    # a folder's name no longer carries the current settings hash (its config.json decides)
    full = next(d for d in dirs if d.name.startswith("digits-full-"))
    full.rename(full.with_name("digits-full-renamed"))
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    mtimes = {d: (d / "log.jsonl").stat().st_mtime_ns for d in dirs}
    code = run_main(experiments.main, argv)
    capsys.readouterr()
    assert code == 0
    assert {d: (d / "log.jsonl").stat().st_mtime_ns for d in dirs} == mtimes
    text = (root / "results.md").read_text()
    assert text.count("reused in this invocation") == 4 and "digits-full-renamed" in text
    assert text.count("eval.json reused") == 4
    assert sorted(p for p in root.iterdir() if p.is_dir()) == dirs


def test_bad_input_is_one_line(tmp_path, capsys):
    for argv, needle in ((["--fid-weights", str(tmp_path / "none.pth")], "--fid-weights"),
                         (["--teacher", str(tmp_path / "none.safetensors")], "--teacher"),
                         (["--scale", "0"], "--scale")):
        try:
            code = run_main(experiments.main, ["--tiny", "--root", str(tmp_path / "r"), *argv])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, err
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0]


def test_guidance_section_reports_and_survives_failures(monkeypatch):
    calls = {}

    def measure_guidance(teacher, dataset, *, num, steps, seed, device, cache_dir=None):
        calls.update(num=num, steps=steps, seed=seed)
        return {"rows": 1}

    monkeypatch.setattr(study, "measure_guidance", measure_guidance)
    monkeypatch.setattr(study, "format_guidance_table", lambda r: "| w | FD |\n|---|---|\n| 1 | 2 |")
    status, md = study.guidance_section(None, None, num=8, steps=18, seed=3, device="cpu")
    assert status == "ok" and "| 1 | 2 |" in md and calls == {"num": 8, "steps": 18, "seed": 3}

    monkeypatch.setattr(study, "format_guidance_table", lambda r: 1 / 0)  # crashes: reported, not fatal
    status, md = study.guidance_section(None, None, num=8, steps=18, seed=3, device="cpu")
    assert status == "failed" and "ZeroDivisionError" in md


def test_edit_section_reports_and_survives_failures(monkeypatch, tmp_path):
    monkeypatch.setattr(study, "edit_metrics",
                        lambda run_dir, device="cpu", seed=0: {"smoothness": 0.5, "nested": {"a": 1}, "arr": [1]})
    status, md = study.edit_section({"full": tmp_path, "no-irl": tmp_path}, device="cpu", seed=0)
    assert status == "ok" and "| smoothness | 0.5 | 0.5 |" in md and "nested.a" in md and "arr" not in md
    monkeypatch.setattr(study, "edit_metrics", lambda run_dir, device="cpu", seed=0: 1 / 0)
    status, md = study.edit_section({"full": tmp_path}, device="cpu", seed=0)
    assert status == "failed" and "ZeroDivisionError" in md


def test_root_and_seed_are_checked_first(tmp_path, capsys, monkeypatch):
    # review D9: --root FILE was a traceback (mkdir on a file)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    monkeypatch.setattr(experiments, "run_experiments", lambda args: (_ for _ in ()).throw(AssertionError("ran")))
    for argv, needle in ((["--root", str(afile)], "--root"),
                         (["--root", str(afile / "sub")], "--root"),
                         (["--root", "/proc/exp"], "/proc"),
                         (["--root", str(tmp_path / "r"), "--seed", str(10 ** 20)], "--seed")):
        try:
            code = run_main(experiments.main, ["--tiny", *argv])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, err
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert afile.read_text() == "keep"


def test_fused_runs_without_a_fused_backend_stop_before_writing(tmp_path, capsys, monkeypatch):
    """Training runs are `gsd.train --fused` subprocesses: where no fused backend can serve the
    device, the command says so in one line before it creates the results folder."""
    def unavailable(device):
        raise ValueError("no fused backend can run on cpu: cpu: gsd_kernels._C is stale (...)")

    monkeypatch.setattr(study.gsd_kernels, "fused_backend", unavailable)
    root = tmp_path / "results"
    code = run_main(experiments.main, ["--tiny", "--root", str(root), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "no fused backend" in lines[0] and "stale" in lines[0]
    assert not root.exists()


def test_teacher_flag_accepts_and_refuses_what_gsd_train_does(tmp_path, capsys):
    """--teacher goes through gsd.teachers.loading in both commands: a pickle needs --trust-pickle, a folder
    must be a diffusers model, and the messages are the same (experiments took files only)."""
    from gsd import train

    pkl = tmp_path / "snap.pkl"
    pkl.write_bytes(b"not read")
    folder = tmp_path / "not-diffusers"
    folder.mkdir()
    for teacher, needle in ((pkl, "--trust-pickle"), (folder, "not a diffusers")):
        errs = []
        for main, extra in ((experiments.main, ["--tiny", "--root", str(tmp_path / "r")]),
                            (train.main, ["--iters", "1", "--out", str(tmp_path / "t")])):
            code = run_main(main, [*extra, "--teacher", str(teacher), "--device", "cpu"])
            err = capsys.readouterr().err
            assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
            errs.append(err)
        assert errs[0] == errs[1]
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()
    # the pickle gate opens with --trust-pickle in experiments too (then the unreadable file is refused)
    code = run_main(experiments.main, ["--tiny", "--root", str(tmp_path / "r"), "--teacher", str(pkl),
                                       "--trust-pickle", "--device", "cpu", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "--trust-pickle" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()  # refused before the root folder is made
