"""The iteration-based training loop.

One step: ``iter_size`` micro-batches -> model -> loss dict -> backward (scaled for fp16) ->
optional clipping -> optimizer step -> schedule step (every iteration, as DeepLab's poly).
Evaluation, checkpoints and logs attach around it, on rank 0 only for files. Everything is
passed in as plain objects; the trainer never sees the config (``segtrain.app`` builds it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from segtrain.data.loader import train_loader
from segtrain.engine import checkpoint
from segtrain.engine.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    all_reduce_min,
)
from segtrain.engine.json_files import write_json
from segtrain.engine.precision import autocast_dtype, resolve_precision
from segtrain.errors import ConfigError, UserError, from_worker
from segtrain.eval.evaluator import Evaluator
from segtrain.eval.metrics import format_table
from segtrain.models.base import bare
from segtrain.viz import comparison_strip

log = logging.getLogger("segtrain")

class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the last good state was checkpointed."""


class ScheduleChanged(UserError):
    """A resume whose max_iters, schedule, base rate or batch differ from the checkpoint's."""


class TrainingInterrupted(UserError):
    """A stop signal arrived; last.pt holds the state to resume from. The run is unfinished:
    raising (instead of returning the scores reached so far) keeps a sweep from taking
    them for the run's result."""


# SIGTERM: kill / SLURM preemption; SIGUSR1, SIGUSR2: SLURM's warning before the time limit
# (submitit asks for USR2 and requeues the job from its own handler).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain types (checkpoints load with weights_only)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stream_seed(*keys: int) -> int:
    """A seed for the stream named by ``keys`` (seed, rank, ...): a NumPy SeedSequence, so no
    two key tuples share a stream (``seed + rank`` would: seed 1 rank 0 = seed 0 rank 1)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    """Trains ``model`` for ``max_iters`` iterations and evaluates it.

    Args:
        model: returns ``{"out": logits, ...}``; already on ``device`` (DDP-wrapped if needed).
        loss_fn: ``(outputs, batch) -> {"total": ..., term: ...}``.
        optimizer: its groups carry the per-group learning rates.
        lr_factor: iteration -> multiplier of each group's initial rate.
        train_set: the augmented training dataset.
        evaluator: scores the model on the validation set, or None.
        run_dir: where checkpoints, logs, metrics and figures go.
        max_iters: optimizer steps.
        batch_size: per-rank micro-batch; the effective batch is batch_size x iter_size x ranks.
        iter_size: micro-batches accumulated per step (DeepLab v2: 10).
        precision: fp32 | bf16 | fp16 | auto.
        clip_grad_norm: max gradient norm, or None.
        eval_interval, log_interval, checkpoint_interval: in iterations. Loss terms are
            summed on the device and read every ``log_interval`` steps, where the mean over
            the interval (and the ranks) is logged and, with a host sync, all ranks agree on
            a non-finite loss on any of them (every rank raises the same error) and on a stop
            signal; nothing is synchronised between log intervals (a single process checks
            its own stop flag after every step).
        seed: fixes initialisation, data order and augmentation.
        class_names, palette, ignore_index: for tables and figures.
        config_yaml: the resolved config, stored in checkpoints.
        dist: the distributed position.
        compile: train through ``torch.compile(model)`` (evaluation uses the eager model).
        channels_last: NHWC memory format for the model and its input batches.
        schedule: plain values that fix the learning-rate curve (max_iters, schedule, base
            rate, images per step), stored in checkpoints; resuming a checkpoint whose
            values differ is refused (``ScheduleChanged``) unless ``allow_schedule_change``,
            which continues with the new schedule at the checkpoint's iteration.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 lr_factor: Callable[[int], float], train_set: torch.utils.data.Dataset,
                 evaluator: Evaluator | None, run_dir: str | Path, *, max_iters: int,
                 batch_size: int, num_workers: int, iter_size: int, precision: str,
                 clip_grad_norm: float | None, eval_interval: int, log_interval: int,
                 checkpoint_interval: int, seed: int, device: torch.device,
                 class_names: Sequence[str], palette: np.ndarray, ignore_index: int,
                 config_yaml: str = "", dist: DistInfo | None = None,
                 show_progress: bool = True, compile: bool = False,
                 channels_last: bool = False, schedule: dict[str, Any] | None = None,
                 allow_schedule_change: bool = False) -> None:
        if iter_size < 1:
            raise ConfigError(f"trainer.iter_size must be >= 1, got {iter_size}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # the compiled module shares the parameters; checkpoints and evaluation use the eager one
        self.train_model = torch.compile(model) if compile else model
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        self.lr_factor = lr_factor
        self.schedule = schedule or {}
        self.allow_schedule_change = allow_schedule_change
        self.train_set, self.evaluator = train_set, evaluator
        self.run_dir = Path(run_dir)
        self.max_iters, self.batch_size, self.num_workers = max_iters, batch_size, num_workers
        self.iter_size, self.clip_grad_norm = iter_size, clip_grad_norm
        self.eval_interval, self.log_interval = eval_interval, log_interval
        self.checkpoint_interval = checkpoint_interval
        self.seed, self.device = seed, device
        self.precision = resolve_precision(precision, device)
        self.amp_dtype = autocast_dtype(self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.class_names, self.palette, self.ignore_index = class_names, palette, ignore_index
        self.config_yaml = config_yaml
        self.dist = dist or DistInfo()
        self.show_progress = show_progress and self.dist.is_main
        self.iteration = 0
        self.best_miou = -math.inf
        self.history: list[dict[str, Any]] = []
        self._stop_signal: int | None = None  # a stop signal this process received
        self._stopped = False  # the loop stopped early (a signal here or on another rank)
        self._rng_done: dict[str, Any] | None = None  # RNG states after the last whole step
        self.writer = None
        if self.dist.is_main:
            # kill -9 during a write leaves .last.pt.*.tmp files: this run owns the folder
            checkpoint.remove_stale_temporaries(self.run_dir / "checkpoints")
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    # -- state ---------------------------------------------------------------------------
    @property
    def _bare_model(self) -> nn.Module:
        return bare(self.model)

    def _rng_of_every_rank(self) -> list[dict[str, Any]]:
        """Every rank's RNG states, indexed by rank (a collective: every rank calls it)."""
        return all_gather_objects(rng_state()) if self.dist.enabled else [rng_state()]

    def state_dict(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """``rng``: the RNG states of ranks 0, 1, ... (default: this process's, alone)."""
        return {
            "model": self._bare_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "history": self.history,
            "rng": rng or [rng_state()],
            "config": self.config_yaml,
            "schedule": self.schedule,
        }

    def _check_schedule(self, state: dict[str, Any], source: str | Path) -> bool:
        """True when the checkpoint's schedule differs and the change is allowed; raises
        ``ScheduleChanged`` when it differs and is not."""
        old = state.get("schedule")
        if not self.schedule or old is None:
            if self.schedule:
                log.warning("checkpoint %s records no schedule (written before segtrain "
                            "stored it): trainer.max_iters and the lr schedule are not "
                            "checked against it", source)
            return False
        changed = [f"{k} {old.get(k)!r} -> {self.schedule.get(k)!r}"
                   for k in sorted(set(old) | set(self.schedule))
                   if old.get(k) != self.schedule.get(k)]
        if not changed:
            return False
        if not self.allow_schedule_change:
            raise ScheduleChanged(
                f"resume from {source} refused: its schedule differs ({'; '.join(changed)}), "
                f"which would bend its learning-rate curve; start a new run, or set "
                f"trainer.resume_allow_schedule_change=true to continue with the new one")
        log.warning("resuming %s with a changed schedule (trainer.resume_allow_schedule_"
                    "change=true): %s", source, "; ".join(changed))
        return True

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "") -> None:
        changed = self._check_schedule(state, source)
        base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        checkpoint.load_model_state(self._bare_model, state, source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best_miou = float(state["best_miou"])
        self.history = list(state.get("history", []))
        self._load_rng(state["rng"], source)
        if changed:  # the new base rates and curve from this iteration on
            self.scheduler.base_lrs = base_lrs
            for group, base in zip(self.optimizer.param_groups, base_lrs):
                group["initial_lr"] = base
                group["lr"] = base * self.lr_factor(self.iteration)

    def _load_rng(self, states: list[dict[str, Any]] | dict[str, Any], source) -> None:
        """This rank's RNG states from the checkpoint's list (one dict: a checkpoint of one
        process, or of a segtrain before per-rank states)."""
        states = [states] if isinstance(states, dict) else list(states)
        rank = self.dist.rank
        if rank < len(states):
            set_rng_state(states[rank])
            return
        # resumed on more ranks than saved: a fresh stream, still a function of seed, rank
        # and iteration (dropout differs from an uninterrupted run on this many ranks)
        log.warning("%s holds the RNG states of %d rank(s); rank %d starts a new stream from "
                    "(seed, rank, iteration)", source or "the checkpoint", len(states), rank)
        seed_everything(stream_seed(self.seed, rank, self.iteration))

    def resume(self, source: str | Path) -> None:
        state = checkpoint.load(source, map_location="cpu")
        self.load_state_dict(state, checkpoint.resolve(source))
        log.info("resumed from %s at iteration %d", checkpoint.resolve(source), self.iteration)

    def save(self, name: str = "last.pt", state: dict[str, Any] | None = None) -> Path | None:
        """Rank 0 writes ``state`` (default: the full training state, with every rank's RNG
        states: then every rank must call it)."""
        rng = self._rng_of_every_rank() if state is None else None
        if not self.dist.is_main:
            return None
        return checkpoint.save_atomic(state or self.state_dict(rng),
                                      self.run_dir / "checkpoints" / name)

    # -- loop ----------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self._stop_signal = signum

    def fit(self) -> dict[str, Any]:
        """Train from ``self.iteration`` to ``max_iters``; returns the final metrics with
        ``"finished": True``. A stop signal raises ``TrainingInterrupted``; any other
        exception first saves last.pt of the last completed step (when its weights are
        finite) and says so."""
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            metrics = self._fit()
        except NonFiniteLossError:
            self._mark_unfinished("failed")
            raise  # it kept the last good checkpoint itself
        except (Exception, KeyboardInterrupt) as err:
            clean = self._save_after_failure(err)
            if clean is err:
                raise
            raise clean from err
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.writer is not None:
                self.writer.flush()
        if self._stopped and self.iteration < self.max_iters:
            self._mark_unfinished("interrupted")
            # hand the signal on (submitit's handler requeues the job and exits), then make
            # sure the run does not look finished
            handler = previous.get(self._stop_signal)
            if callable(handler):
                handler(self._stop_signal, None)
            cause = f"signal {self._stop_signal}" if self._stop_signal is not None else \
                "a stop signal on another rank"
            if os.environ.get("SUBMITIT_FOLDER"):
                # a submitit job (Hydra's SLURM launcher) that SLURM preempts is requeued by
                # SLURM itself: ending without a result keeps the waiting launcher waiting for
                # the requeued job's result, instead of recording this unfinished one
                log.warning("stopped by %s at iteration %d: exiting without a result; the "
                            "requeued job resumes from last.pt", cause, self.iteration)
                sys.exit(1)
            raise TrainingInterrupted(
                f"stopped by {cause} at iteration {self.iteration}; "
                f"resume with trainer.resume={self.run_dir}")
        return {**metrics, "finished": True}

    def _save_after_failure(self, err: BaseException) -> BaseException:
        """Save last.pt of the last completed step; the error to raise says what was kept."""
        if isinstance(err, UserError):
            err = from_worker(err)  # the worker's message, not its traceback
        last = self.run_dir / "checkpoints" / "last.pt"
        if self._rng_done is None:  # no step completed since the start (or the resume)
            note = None
        elif not self._weights_finite():
            note = f"last.pt not saved: the weights after iteration {self.iteration} are " \
                   f"not finite"
        else:
            try:
                # no collective here (another rank may be gone): this rank's RNG states only
                self.save("last.pt", self.state_dict(rng=[self._rng_done]))
                note = f"saved {last} at iteration {self.iteration} (the last completed " \
                       f"step): resume with trainer.resume={self.run_dir}"
            except Exception as save_err:  # noqa: BLE001 - report the first error
                note = f"could not save last.pt ({save_err})"
        self._mark_unfinished("failed")
        if note and self.dist.is_main:
            log.error("training stopped by %s at iteration %d; %s", type(err).__name__,
                      self.iteration, note)
            if isinstance(err, UserError) and len(err.args) == 1:
                # the one or two lines the entry point prints
                err.args = (f"{err.args[0]}\n{note}",)
        return err

    def _mark_unfinished(self, status: str) -> None:
        """metrics.json, if written, says the run stopped before max_iters."""
        path = self.run_dir / "metrics.json"
        if not self.dist.is_main or not path.is_file():
            return
        data = json.loads(path.read_text())
        data.update(finished=False, status=status, stopped_at=self.iteration)
        write_json(data, path)

    def _fit(self) -> dict[str, Any]:
        if self.iteration >= self.max_iters:
            log.info("nothing to do: the run is at iteration %d of trainer.max_iters=%d "
                     "(raise max_iters to train further)", self.iteration, self.max_iters)
            # a requeued job whose run had already finished reports the final scores
            saved = self.run_dir / "metrics.json"
            if saved.is_file():
                data = json.loads(saved.read_text())
                if data.get("finished") and data.get("iteration") == self.iteration:
                    return data
            return {}
        loader = train_loader(self.train_set, self.batch_size, self.num_workers, self.seed,
                              start_iter=self.iteration * self.iter_size,
                              rank=self.dist.rank, world_size=self.dist.world_size,
                              pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        self.model.train()
        tic, done_since_log = time.perf_counter(), 0
        metrics: dict[str, Any] = {}
        self._rng_done = None  # no step of this process completed yet: nothing new to save
        # loss terms summed on the device since the last log, and the first iteration whose
        # loss was not finite (-1: none); both are read only at log/eval/checkpoint time
        self._sums: dict[str, torch.Tensor] = {}
        self._bad_iter = torch.full((), -1, dtype=torch.long, device=self.device)
        # the context closes the bar even when a step raises (non-finite loss, Ctrl-C)
        with tqdm(total=self.max_iters, initial=self.iteration, desc="train",
                  disable=not self.show_progress, dynamic_ncols=True, mininterval=1.0) as bar:
            while self.iteration < self.max_iters:
                self._step(batches)
                self.iteration += 1
                self._rng_done = rng_state()
                done_since_log += 1
                bar.update(1)
                last = self.iteration == self.max_iters
                if self.iteration % self.log_interval == 0 or last:
                    rate = done_since_log / max(time.perf_counter() - tic, 1e-9)
                    terms = self._read_terms(done_since_log)
                    self._check_finite(weights=False, terms=terms)
                    bar.set_postfix(loss=f"{terms['total']:.4f}",
                                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                    refresh=False)
                    self._log_train(terms, rate)
                    tic, done_since_log = time.perf_counter(), 0
                due = self.iteration % self.eval_interval == 0 or last
                if self.evaluator is not None and due:
                    self._check_finite(weights=False)
                    metrics = self.evaluate()
                if self.iteration % self.checkpoint_interval == 0 or last:
                    self._check_finite(weights=True)
                    self.save("last.pt")
                if not self.dist.enabled:
                    # one process: a host flag, no sync; several ranks agree on it at the
                    # log, evaluation and checkpoint points (_check_finite), sync-free between
                    self._stopped = self._stop_signal is not None
                if self._stopped:
                    self.save("last.pt")
                    if self.dist.is_main:
                        log.warning("%s: saved checkpoints/last.pt at iteration %d; resume "
                                    "with trainer.resume=%s", f"signal {self._stop_signal} "
                                    f"received" if self._stop_signal is not None else
                                    "another rank received a stop signal", self.iteration,
                                    self.run_dir)
                    break
        return metrics

    def _step(self, batches) -> None:
        """One optimizer step; adds its loss terms to ``self._sums`` without a host sync."""
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for micro in range(self.iter_size):
            batch = next(batches)
            image = batch["image"].to(self.device, non_blocking=True,
                                      memory_format=self.memory_format)
            batch["mask"] = batch["mask"].to(self.device, non_blocking=True)
            sync = micro == self.iter_size - 1 or not isinstance(self.model, DDP)
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    outputs = self.train_model(image)
                    terms = self.loss_fn(outputs, batch)
                loss = terms["total"] / self.iter_size
                self.scaler.scale(loss).backward()
            for k, v in terms.items():
                v = v.detach().float() / self.iter_size
                self._sums[k] = self._sums[k] + v if k in self._sums else v
            total = loss.detach() if total is None else total + loss.detach()
        # remember the first non-finite step on the device (no sync); _check_finite reads it
        self._bad_iter = torch.where((self._bad_iter < 0) & ~torch.isfinite(total),
                                     self.iteration, self._bad_iter)
        if self.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def _read_terms(self, steps: int) -> dict[str, float]:
        """Mean loss terms over the last ``steps`` steps and over the ranks: the one host sync
        of a log interval (one all-reduce of every term under DDP)."""
        if not self._sums:
            return {}
        values = all_reduce_mean(torch.stack(list(self._sums.values())))
        terms = {k: v / steps for k, v in zip(self._sums, values.tolist())}
        self._sums = {}
        return terms

    def _weights_finite_flag(self) -> torch.Tensor:
        """One fused check of every floating tensor of the model, as a device bool: the
        max-abs (infinity) norm of a tensor is NaN or inf exactly when one of its values is,
        and a multi-tensor kernel computes all of them at once."""
        tensors = [t for t in self._bare_model.state_dict().values()
                   if t.is_floating_point() and t.numel()]
        flags = []
        for dtype in {t.dtype for t in tensors}:  # _foreach_norm wants one dtype per call
            norms = torch._foreach_norm([t for t in tensors if t.dtype == dtype], math.inf)
            flags.append(torch.isfinite(torch.stack(norms)).all())
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)

    def _weights_finite(self) -> bool:
        return bool(self._weights_finite_flag())

    # the codes of _agree: a non-finite loss at step i is i (the earliest wins)
    _FINITE, _WEIGHTS_NOT_FINITE = 2**62, 2**62 - 1

    def _agree(self, weights: bool) -> tuple[int, bool]:
        """What every rank decides together: the earliest non-finite step on any rank (or
        _WEIGHTS_NOT_FINITE, or _FINITE) and whether any rank received a stop signal. One
        all-reduce (min) of two integers under DDP, one host sync."""
        bad = torch.where(self._bad_iter >= 0, self._bad_iter, self._FINITE)
        if weights:
            flag = self._weights_finite_flag().to(bad.device)
            bad = torch.where((bad == self._FINITE) & ~flag, self._WEIGHTS_NOT_FINITE, bad)
        stop = torch.full((), -int(self._stop_signal is not None), device=bad.device)
        code, stop = all_reduce_min(torch.stack([bad, stop.to(bad.dtype)])).tolist()
        return code, stop < 0

    def _check_finite(self, weights: bool, terms: dict[str, float] | None = None) -> None:
        """Raise NonFiniteLossError on every rank if a loss since the start on any rank (or
        the weights, when ``weights``) is not finite. Several ranks also agree here whether
        to stop after this step (a stop signal on any of them)."""
        code, stop = self._agree(weights)
        if self.dist.enabled:
            self._stopped = stop
        if code == self._WEIGHTS_NOT_FINITE:
            self._non_finite(self._read_terms(1) if terms is None else terms, "weights")
        elif code != self._FINITE:
            self._non_finite(self._read_terms(1) if terms is None else terms, "loss",
                             at=code + 1)

    def _non_finite(self, terms: dict, what: str = "loss", at: int | None = None) -> None:
        """Every rank calls it together (the ranks agreed in _agree) and raises the same
        error; rank 0 keeps the last finite state."""
        values = {k: float(v) for k, v in terms.items()}
        last = self.run_dir / "checkpoints" / "last.pt"
        finite = bool(all_reduce_min(self._weights_finite_flag().long()))  # same on all ranks
        if finite:
            self.save("last.pt")  # the weights after the last good step
            kept = f"The state after iteration {self.iteration} is saved in {last}."
        elif last.is_file():
            # NaN/inf already reached the weights or the BatchNorm statistics: keep the last
            # checkpoint, which was checked finite when it was written
            kept = (f"The weights are no longer finite; {last} from iteration "
                    f"{checkpoint.load(last)['iteration']} is kept.")
        else:
            kept = "The weights are no longer finite and no checkpoint was written yet."
        at = at if at is not None else self.iteration + (1 if what == "loss" else 0)
        raise NonFiniteLossError(
            f"non-finite {what} at iteration {at} (loss terms {values}). {kept} Try a lower "
            f"optim.lr, trainer.clip_grad_norm, or trainer.precision=fp32.")

    # -- logging and evaluation ----------------------------------------------------------
    def _log_train(self, terms: dict[str, float], rate: float) -> None:
        if not self.dist.is_main:
            return
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        log.info("iter %d/%d  %s  lr %.3e  %.2f it/s", self.iteration, self.max_iters,
                 "  ".join(f"{k} {v:.4f}" for k, v in terms.items()),
                 self.optimizer.param_groups[0]["lr"], rate)
        for k, v in terms.items():
            self.writer.add_scalar(f"train/loss/{k}", v, self.iteration)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"train/lr/{name}", lr, self.iteration)
        self.writer.add_scalar("train/iters_per_s", rate, self.iteration)

    def evaluate(self) -> dict[str, Any]:
        # at eval.precision (fp32 by default), not the training autocast: the scores that
        # pick best.pt and fill metrics.json are those segtrain.evaluate reproduces
        scores = self.evaluator.run(self.model, self.device)
        if not self.dist.is_main:
            return scores
        summary = {k: scores[k] for k in ("miou", "pixel_acc", "mean_acc", "fwiou")}
        summary["iteration"] = self.iteration
        self.history.append(summary)
        log.info("eval at iteration %d\n%s", self.iteration,
                 format_table(scores, self.class_names))
        for k in ("miou", "pixel_acc", "mean_acc", "fwiou"):
            self.writer.add_scalar(f"val/{k}", scores[k], self.iteration)
        for name, iou in zip(self.class_names, scores["iou"]):
            if iou == iou:  # NaN: class absent from prediction and ground truth
                self.writer.add_scalar(f"val/iou/{name}", iou, self.iteration)
        if self.evaluator.samples:
            strip = comparison_strip(self.evaluator.samples, self.palette, self.ignore_index)
            self.writer.add_image("val/image_gt_pred", strip, self.iteration, dataformats="HWC")
            samples = self.run_dir / "samples"
            samples.mkdir(exist_ok=True)
            Image.fromarray(strip).save(samples / f"iter_{self.iteration:07d}.png")
        if scores["miou"] > self.best_miou:
            self.best_miou = scores["miou"]
            self.save("best.pt", {"model": self._bare_model.state_dict(),
                                  "iteration": self.iteration, "metrics": summary,
                                  "config": self.config_yaml})
        finished = self.iteration >= self.max_iters
        # "finished" is what tells a final score from the partial one of a stopped run
        result = {"iteration": self.iteration, "max_iters": self.max_iters,
                  "finished": finished, "status": "finished" if finished else "running",
                  "best_miou": self.best_miou,
                  "class_names": list(self.class_names), **scores, "history": self.history}
        write_json(result, self.run_dir / "metrics.json")
        return scores
