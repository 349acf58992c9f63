"""The training loop of a run: iterations, log records, checkpoints, the stop rule and interrupts.

`TrainingLoop(...).run()` steps the Distiller to `iters`, logs every `log_every` iterations
(log.jsonl), checkpoints every `ckpt_every` (never a bad iteration), stops a run that goes wrong
(`StopRule`, --max-bad-iters) and turns Ctrl-C / SIGTERM into a saved, resumable stop
(`DeferredInterrupt`): a half-done iteration is never saved.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from gsd import parallel, runs
from gsd.config import EXPLODE_FACTOR, EXPLODE_WINDOW
from gsd.errors import StorageError, Terminated, TrainingStopped
from gsd.progress import progress_bar

__all__ = ["TrainingLoop", "StopRule", "DeferredInterrupt", "NullLogger", "LOGGED_MEANS"]

# log.jsonl keys averaged over the iterations of a record besides the losses (scale-free weight)
LOGGED_MEANS = ("irl_weight", "irl_gnorm_sid", "irl_gnorm_irl", "irl_floored")


class TrainingLoop:
    """One run's iterations from the Distiller's current one to `cfg["iters"]`.

    `checkpoint_state()` gives the run's part of a checkpoint besides the Distiller's (its
    settings, teacher digest); the loop adds the stop rule, RNG streams and elapsed time."""

    def __init__(self, distiller, cfg: dict, run_dir, logger, *, guard: "StopRule", run_state, saved_at,
                 elapsed_before: float, device, show: bool):
        self.d = distiller
        self.cfg = cfg
        self.run_dir = run_dir
        self.logger = logger
        self.guard = guard
        self.run_state = run_state
        self.saved_at = saved_at
        self.elapsed_before = elapsed_before
        self.device = device
        self.show = show
        self.world = parallel.world_size()
        self.main_rank = parallel.is_main()
        self.total = int(cfg["iters"])

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_train

    def checkpoint(self) -> int:
        """Collective: every rank's sampling stream goes into the state; rank 0 writes it."""
        d = self.d
        dstate = d.training_state()
        extra = {}
        if self.world > 1:
            extra["rng_ranks"] = [s.cpu() for s in parallel.all_gather_objects(d.rng.get_state())]
        if self.main_rank:
            state = {"distiller": dstate, "rng": runs.capture_rng_state(), "elapsed": self.elapsed(),
                     **self.run_state(), "stop_rule": self.guard.state(), **extra}
            try:
                runs.save_checkpoint(self.run_dir, d.iteration, d.weights(), state,
                                     keep_every=self.cfg["keep_every"] or None)
            except StorageError as exc:  # say what is kept: the previous checkpoint is intact
                kept = (f"the checkpoint of iteration {self.saved_at} is intact; free space and --resume "
                        f"{self.run_dir}" if self.saved_at is not None else "no checkpoint was written yet")
                raise StorageError(f"{exc}; {kept}") from None
        parallel.barrier()
        self.saved_at = d.iteration
        return d.iteration

    def run(self) -> float:
        """Train to `iters`; returns the training seconds (those of earlier starts included)."""
        self.t_train = time.perf_counter()
        self.bar = progress_bar(total=self.total, initial=min(self.d.iteration, self.total),
                                desc=f"distil {self.cfg['dataset']}", enabled=self.show, file=sys.stderr)
        self.interrupts = DeferredInterrupt(enabled=self.world == 1)
        self.mid_step = False
        try:
            try:
                with self.interrupts:
                    self._iterate()
            except TrainingStopped:
                self.bar.close()
                raise
            except KeyboardInterrupt as exc:
                self._interrupted(exc)
                raise
            self.bar.close()
            if self.guard.limit > 0 and self.guard.streak:  # ended in bad iterations: never save or report them
                raise TrainingStopped(self.guard.message(self.d.iteration, self.saved_at, self.run_dir, ended=True))
            seconds = self.elapsed()
            if self.saved_at != self.d.iteration:  # also over a damaged checkpoint of this step
                self.checkpoint()
            return seconds
        finally:
            self.logger.close()

    def _iterate(self) -> None:
        d, cfg, guard = self.d, self.cfg, self.guard
        self.acc, self.n_acc = {}, 0
        self.nan_since = {"nan_samples": 0, "nan_grads": 0}
        while d.iteration < self.total:
            self.mid_step = True  # an interrupt from here to the end of step() leaves a half-done iteration
            out = d.step()
            self.mid_step = False
            self._accumulate(out)
            it = d.iteration
            self.bar.update(1)
            bad = guard.update(out, self.device, self.world)  # the same verdict on every rank
            nan_now = out["nan_samples"] or out["nan_grads"]
            if it % cfg["log_every"] == 0 or it == self.total or nan_now or guard.stopped:  # same on every rank
                self._log(it)
            if nan_now and self.main_rank:
                self.bar.write(f"iteration {it}: dropped {out['nan_samples']} non-finite samples, zeroed "
                               f"{out['nan_grads']} non-finite gradient values")
            if guard.stopped:
                raise TrainingStopped(guard.message(it, self.saved_at, self.run_dir))
            if it % cfg["ckpt_every"] == 0 and it < self.total and not bad:  # never checkpoint a bad iteration
                self.checkpoint()
            if self.interrupts.requested:  # Ctrl-C or SIGTERM during this iteration: it is complete now
                raise self.interrupts.interrupt()

    def _accumulate(self, out: dict) -> None:
        self.n_acc += 1
        for k, v in out.items():
            if k.startswith("loss_") or k in LOGGED_MEANS:
                self.acc[k] = self.acc.get(k, 0.0) + v
        self.nan_since["nan_samples"] += out["nan_samples"]
        self.nan_since["nan_grads"] += out["nan_grads"]

    def _log(self, it: int) -> None:
        d = self.d
        rec = {"iteration": it, "time": round(self.elapsed(), 3), "images_seen": d.images_seen}
        acc = mean_over_ranks(self.acc, self.device)
        rec.update({k: v / self.n_acc for k, v in acc.items()})
        rec.update(self.nan_since)
        rec["nan_events_total"] = d.totals["nan_iterations"]
        self.logger.log(rec)
        self.bar.set_postfix({k[5:]: f"{v / self.n_acc:.4g}" for k, v in acc.items() if k.startswith("loss_")},
                             refresh=False)
        self.acc, self.n_acc = {}, 0
        self.nan_since = {"nan_samples": 0, "nan_grads": 0}

    def _interrupted(self, exc: KeyboardInterrupt) -> None:
        """Ctrl-C / SIGTERM: save the last complete iteration (never a half-done one) and say how to go on."""
        self.bar.close()
        self.logger.close()
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        run_dir, saved_at = self.run_dir, self.saved_at
        if self.world > 1:  # the other ranks may be anywhere: no collective checkpoint now
            if self.main_rank:
                print(f"{what}; continue from the last checkpoint with --resume {run_dir}", file=sys.stderr)
            return
        if self.mid_step:
            # part of iteration k+1 is applied (a step, Adam moments, the RNG): never save that
            print(f"{what} in iteration {self.d.iteration + 1}, which is not saved; "
                  + (f"continue from the checkpoint of iteration {saved_at} with --resume {run_dir}"
                     if saved_at is not None else f"no checkpoint yet: start it again with --out {run_dir}"),
                  file=sys.stderr)
            return
        if saved_at != self.d.iteration:
            self.checkpoint()
        print(f"{what}; checkpoint of iteration {self.d.iteration} saved, continue with --resume {run_dir}",
              file=sys.stderr)


class StopRule:
    """The --max-bad-iters rule (see DEFAULT_MAX_BAD_ITERS): counts consecutive bad iterations."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0
        self.reference: float | None = None
        self.recent: list[float] = []
        self.reason = ""

    def update(self, out: dict, device, world: int) -> bool:
        losses = {k: float(v) for k, v in out.items() if k.startswith("loss_")}
        reason = None
        if not all(math.isfinite(v) for v in losses.values()):
            reason = "non-finite loss " + ", ".join(k for k, v in losses.items() if not math.isfinite(v))
        elif out.get("all_dropped"):
            reason = "a step dropped every sample (non-finite generator samples, teacher or fake-score outputs)"
        elif out.get("all_grads_zeroed"):
            reason = "every gradient value of a step was non-finite (zeroed: the step learnt nothing)"
        else:
            if self.reference is None:
                # computed before this start's first update (loss_gen of a SiD iteration follows
                # the fake-score step, which a diverging lr has already spoilt)
                first = losses["loss_fake"] if "loss_fake" in losses else losses.get("loss_gen", 0.0)
                self.reference = max(1.0, abs(first))
            self.recent = (self.recent + [abs(losses.get("loss_fake", 0.0)) + abs(losses.get("loss_gen", 0.0))])
            self.recent = self.recent[-EXPLODE_WINDOW:]
            size = sorted(self.recent)[len(self.recent) // 2]
            if size > EXPLODE_FACTOR * self.reference:
                reason = (f"the loss exploded (median |loss_fake| + |loss_gen| of the last {len(self.recent)} "
                          f"iterations {size:.3g} > {EXPLODE_FACTOR:g} x {self.reference:.3g} at the start)")
        bad = reason is not None
        if world > 1:  # one verdict for every rank, or some would stop and the others wait
            flag = torch.tensor([int(bad)], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = bool(flag.item())
            reason = reason or "a bad iteration on another process"
        self.streak = self.streak + 1 if bad else 0
        if bad:
            self.reason = reason
        return bad

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run judges its iterations as the
        uninterrupted run would (not against a new reference taken mid-divergence)."""
        return {"reference": self.reference, "recent": list(self.recent), "streak": self.streak}

    def load_state(self, state: dict) -> None:
        ref = state.get("reference")
        self.reference = float(ref) if isinstance(ref, (int, float)) else None
        self.recent = [float(v) for v in state.get("recent", [])][-EXPLODE_WINDOW:]
        self.streak = int(state.get("streak", 0))

    @property
    def stopped(self) -> bool:
        return self.limit > 0 and self.streak >= self.limit

    def message(self, iteration: int, saved_at, run_dir, ended: bool = False) -> str:
        kept = (f"its last checkpoint (iteration {saved_at}) is kept" if saved_at is not None
                else "it has no checkpoint")
        what = (f"training stopped at its last iteration ({iteration}): the last {self.streak} were bad and are "
                f"not saved" if ended else f"training stopped at iteration {iteration}: {self.streak} bad iterations in a row")
        return (f"{what} (the last: {self.reason}); lower --lr / --lr-fake, the loss weights, or check the teacher; "
                f"{kept} in {run_dir} (--max-bad-iters sets the rule)")


class DeferredInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM while training: the first one lets the current iteration
    finish (it sets `requested`, and `terminated` for SIGTERM, which batch schedulers send
    before they kill); a second one interrupts at once. Only in the main thread of a
    one-process run; the previous handlers are put back on exit."""

    def __init__(self, enabled: bool):
        import threading
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.terminated = False
        self._previous = {}

    def _handler(self, signum, frame):
        import signal
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested = True
        self.terminated = signum == signal.SIGTERM

    def interrupt(self) -> KeyboardInterrupt:
        """The exception that ends the run once the requested iteration is complete."""
        return Terminated() if self.terminated else KeyboardInterrupt()

    def __enter__(self):
        if self.enabled:
            import signal
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            import signal
            for sig, previous in self._previous.items():
                if previous is None:
                    previous = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
                signal.signal(sig, previous)
        return False


class NullLogger:
    """The log of ranks other than 0."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def mean_over_ranks(acc: dict, device) -> dict:
    """Loss sums averaged over the processes (the same keys on every rank)."""
    if parallel.world_size() <= 1 or not acc:
        return acc
    keys = sorted(acc)
    t = torch.tensor([float(acc[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    t /= parallel.world_size()
    return dict(zip(keys, t.tolist()))
