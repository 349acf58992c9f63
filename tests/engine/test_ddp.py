"""Several processes (gloo on CPU): the DDP generator gradient equals the one-process
gradient of the concatenated batch (SiD + global-batch isometry, over random pairs and over
neighbour groups), `torchrun -m gsd.train`
trains / checkpoints / resumes, and bad world sizes fail on every rank with exit code 2."""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gsd import runs
from gsd.distill import DistillConfig, Distiller
from gsd.models.checkpoint import save_denoiser

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
PER_RANK = 4
# (irl weighting, backend, irl_neighbours, lambda_regress): the reference eager ops and the fused
# ones, random pairs over the batch (K = 0) and groups of K + 1 rows (two groups of 2 / one group of
# 4 per rank); with the regression term, one pair (REGRESS_PAIR), so that every process and the
# one-process run draw the same one and the gradients can be compared
VARIANTS = [("global", "reference", 0, 0.0), ("local", "auto", 0, 0.0), ("global", "auto", 1, 0.0),
            ("local", "reference", 3, 0.0), ("global", "auto", 1, 2.0)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(weighting, backend, batch, neighbours=0, regress=0.0):
    return DistillConfig(batch=batch, lr=1e-3, lambda_sid=1.0, lambda_irl=0.7, irl_weighting=weighting,
                         backend=backend, alpha=1.2, irl_neighbours=neighbours, lambda_regress=regress, regress_pairs=1)


REGRESS_PAIR = (torch.tensor([[0.3, -1.1]]), torch.tensor([[0.8, 0.4]]))


def _distiller(weighting, backend, batch, k, mu, init_seed):
    from factories import tiny_mlp

    d = Distiller(tiny_mlp(seed=1), _config(weighting, backend, batch, k, mu), init=tiny_mlp(seed=init_seed))
    if mu > 0:
        d.set_regression_pairs(*REGRESS_PAIR)
    return d


def _inputs(n):
    g = torch.Generator().manual_seed(1234)
    eps = torch.randn(n, 2, generator=g)
    t = torch.rand(n, generator=g) * 0.8
    noise = torch.randn(n, 2, generator=g)
    return eps, t, noise


def _generator_grads(d: Distiller, eps, t, noise):
    d.generator.zero_grad(set_to_none=True)
    d.generator.train().requires_grad_(True)
    loss, parts = d.generator_loss(eps, t=t, noise=noise)
    (loss * d.config.gen_loss_scale).backward()
    return [p.grad.detach().clone() for p in d.generator.parameters()], parts


@contextlib.contextmanager
def _gloo_rank(rank, world, port):
    """This process as rank `rank` of a gloo group, one torch thread; yields its rows of the batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    finally:
        dist.destroy_process_group()


def _grad_worker(rank, world, port, out_dir):
    with _gloo_rank(rank, world, port) as rows:
        eps, t, noise = _inputs(world * PER_RANK)
        result = {}
        for weighting, backend, k, mu in VARIANTS:
            # different init on rank 1: DDP must broadcast rank 0's weights
            d = _distiller(weighting, backend, world * PER_RANK, k, mu, init_seed=2 + rank)
            assert d.world == world and d.micro_batch == PER_RANK and d.accum == 1
            d.enable_ddp()
            grads, parts = _generator_grads(d, eps[rows], t[rows], noise[rows])
            result[f"{weighting}-{backend}-{k}-{mu}"] = {"grads": grads, "loss_irl": parts["loss_irl"],
                                                          "irl_weight": parts["irl_weight"],
                                                          "loss_regress": parts.get("loss_regress")}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_generator_gradient_equals_single_process_global_batch(tmp_path):
    from factories import tiny_mlp

    mp.spawn(_grad_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    eps, t, noise = _inputs(WORLD * PER_RANK)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for weighting, backend, k, mu in VARIANTS:
        key = f"{weighting}-{backend}-{k}-{mu}"
        d = _distiller(weighting, backend, WORLD * PER_RANK, k, mu, init_seed=2)
        want, parts = _generator_grads(d, eps, t, noise)
        for r in range(WORLD):
            got = per_rank[r][key]
            # one loss and one scale-free weight for the global batch, the same on every rank
            assert got["loss_irl"] == pytest.approx(parts["loss_irl"], rel=1e-5), key
            assert got["irl_weight"] == pytest.approx(parts["irl_weight"], rel=1e-5), key
            assert (got["loss_regress"] is None) == (mu == 0), key
            if mu > 0:
                assert got["loss_regress"] == pytest.approx(parts["loss_regress"], rel=1e-5), key
            for g, w in zip(got["grads"], want):
                assert torch.linalg.vector_norm(g - w) <= 1e-5 * torch.linalg.vector_norm(w) + 1e-12, key
        # the isometry term matters to this gradient (otherwise the test proves little)
        d0 = Distiller(tiny_mlp(seed=1), DistillConfig(batch=WORLD * PER_RANK, lr=1e-3, lambda_irl=0.0),
                       init=tiny_mlp(seed=2))
        sid_only, _ = _generator_grads(d0, eps, t, noise)
        assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(sid_only, want))
        if mu > 0:  # and so does the regression term
            without, _ = _generator_grads(_distiller(weighting, backend, WORLD * PER_RANK, k, 0.0, init_seed=2),
                                          eps, t, noise)
            assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(without, want))


def test_gradient_accumulation_equals_the_mean_of_the_micro_batches():
    """One process, batch 8 in 2 micro-batches of 4: the step's gradient is the mean of theirs."""
    from factories import tiny_mlp

    cfg = DistillConfig(batch=8, batch_per_rank=4, lr=1e-3, lambda_irl=0.0)
    d = Distiller(tiny_mlp(seed=1), cfg, init=tiny_mlp(seed=2))
    ref = Distiller(tiny_mlp(seed=1), cfg, init=tiny_mlp(seed=2))
    assert d.accum == 2 and d.micro_batch == 4
    ref.rng.set_state(d.rng.get_state())
    d.opt_g.step = lambda: None  # keep the gradients, leave the weights
    d.generator_step()
    got = [p.grad.clone() for p in d.generator.parameters()]
    ref.generator.zero_grad(set_to_none=True)
    for _ in range(2):
        eps, labels = ref._latents(4)
        loss, _ = ref.generator_loss(eps, labels)
        (loss * cfg.gen_loss_scale / 2).backward()
    for g, w in zip(got, [p.grad for p in ref.generator.parameters()]):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)
    with pytest.raises(Exception, match="batch-per-gpu"):
        DistillConfig(batch=8, batch_per_rank=3).accum_steps(1)
    with pytest.raises(Exception, match="world size"):
        DistillConfig(batch=9).accum_steps(2)


def _drop_worker(rank, world, port, out_dir):
    """K = 1 with rank 1's first generated row made non-finite: a group is dropped there."""
    from factories import tiny_mlp
    import gsd_kernels

    with _gloo_rank(rank, world, port) as rows:
        eps, t, noise = _inputs(world * PER_RANK)
        d = Distiller(tiny_mlp(seed=1), _config("global", "reference", world * PER_RANK, 1), init=tiny_mlp(seed=2))
        d.enable_ddp()

        def poison(phase, x):
            if phase == "generator" and rank == 1:
                x = x.clone()
                x[0] = float("nan")
            return x
        d.nan_hook = poison
        _, parts = _generator_grads(d, eps[rows], t[rows], noise[rows])
        # what this rank's own groups give (rows of whole finite groups only), by the reference op
        with torch.no_grad():
            x = d._gen(d.generator, eps[rows])
        keep = slice(2, 4) if rank == 1 else slice(0, 4)
        own = gsd_kernels.isometry_loss(x[keep].double(), (d.config.sigma_init * eps[rows][keep]).double(),
                                        groups=2, backend="reference")
        torch.save({"loss_irl": parts["loss_irl"], "own": float(own), "irl_weight": parts["irl_weight"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_falls_back_to_each_ranks_own_groups_when_a_rank_drops_one(tmp_path):
    """A non-finite sample on one rank: no global loss that iteration (the ranks would disagree on
    the rows), every rank takes its own whole groups, and the weight is still one number. Rank 0
    keeps its two groups; rank 1 keeps one group of two rows, whose single pair gives loss 0."""
    mp.spawn(_drop_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in range(WORLD):
        assert got[r]["loss_irl"] == pytest.approx(got[r]["own"], rel=2e-4, abs=1e-6)  # fp32 run vs float64
    assert got[0]["loss_irl"] != pytest.approx(got[1]["loss_irl"], rel=1e-3)  # per-rank, not one global value
    assert got[0]["irl_weight"] == got[1]["irl_weight"] > 0


# ------------------------------------------------------------------ the command line

def _env(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GSD_CACHE": str(tmp_path / "cache")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def _teacher(tmp_path):
    from factories import tiny_mlp

    path = tmp_path / "tiny_gmm.safetensors"
    save_denoiser(path, tiny_mlp(seed=3))
    return str(path)


FAST = ["--no-progress", "--device", "cpu", "--latency-repeats", "1", "--classifier-epochs", "1"]


def _torchrun(tmp_path, args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "gsd.train", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def _ranks(tmp_path, args, timeout=120):
    """Start the WORLD ranks by hand, as torchrun would, to see each one's exit code."""
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = {**_env(tmp_path), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "gsd.train", *args], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def test_torchrun_trains_checkpoints_and_resumes(tmp_path):
    teacher = _teacher(tmp_path)
    out = tmp_path / "ddp_run"
    args = ["--dataset", "gmm", "--teacher", teacher, "--exact-teacher", "--iters", "3", "--batch", "8",
            "--batch-per-gpu", "2", "--precision", "bf16", "--grad-checkpoint", "--lambda-irl", "0.5",
            "--irl-neighbours", "0",  # the global-batch random-pair loss across ranks
            "--eval-samples", "200", "--ckpt-every", "2", "--log-every", "1", "--out", str(out), *FAST]
    p = _torchrun(tmp_path, args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert runs.latest_step(out) == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == WORLD and cfg["batch"] == 8 and cfg["batch_per_gpu"] == 2  # 2 accumulation steps
    assert cfg["precision"] == "bf16" and cfg["grad_checkpoint"] is True  # DDP + accumulation + checkpointing
    log = runs.read_log(out)
    assert [r["iteration"] for r in log] == [1, 2, 3]  # one writer: rank 0
    assert log[-1]["images_seen"] == 3 * 8 and "loss_irl" in log[-1]
    assert (out / "metrics.json").exists() and p.stdout.count("run directory") == 1
    _, state = runs.load_checkpoint(out)
    assert len(state["rng_ranks"]) == WORLD and not torch.equal(state["rng_ranks"][0], state["rng_ranks"][1])

    # one process cannot continue a 2-process run: a clear error, nothing written
    before = {q: q.read_bytes() for q in out.rglob("*") if q.is_file()}
    p1 = subprocess.run([sys.executable, "-m", "gsd.train", "--resume", str(out), "--iters", "4", *FAST],
                        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p1.returncode == 2 and "same world size" in p1.stderr and "Traceback" not in p1.stderr, p1.stderr
    assert {q: q.read_bytes() for q in out.rglob("*") if q.is_file()} == before

    p2 = _torchrun(tmp_path, ["--resume", str(out), "--iters", "4", "--eval-samples", "0", *FAST])
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert runs.latest_step(out) == 4 and runs.read_log(out)[-1]["iteration"] == 4


@pytest.mark.parametrize("extra, needle", [
    (["--batch", "7", "--irl-neighbours", "0"], "world size"),
    (["--batch", "8", "--batch-per-gpu", "3"], "--batch-per-gpu"),
])
def test_bad_world_size_fails_on_every_rank(tmp_path, extra, needle):
    out = tmp_path / "never"
    results = _ranks(tmp_path, ["--dataset", "gmm", "--teacher", _teacher(tmp_path), "--iters", "2",
                                "--out", str(out), *extra, *FAST])
    for code, err in results:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not out.exists()


# ------------------------------------------------------------------ precision / compile

@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_runs_without_nan(precision):
    """A few CPU iterations under autocast: finite losses and weights, fp32 parameters."""
    from factories import tiny_unet

    cfg = DistillConfig(batch=4, lr=1e-3, lambda_irl=0.5, precision=precision)
    d = Distiller(tiny_unet(seed=1), cfg, init=tiny_unet(seed=2))
    for _ in range(2):
        out = d.step()
        assert out["nan_samples"] == 0
        for k in ("loss_fake", "loss_sid", "loss_irl", "loss_gen"):
            assert torch.isfinite(torch.tensor(out[k])), (k, out)
    assert out["nan_grads"] == 0 or precision == "fp16"  # fp16 may skip an overflowing step
    for v in d.weights().values():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
    state = d.training_state()
    assert bool(state["scaler_g"]) == (precision == "fp16")
    with pytest.raises(Exception, match="precision"):
        DistillConfig(precision="fp8").validate()
