"""The iteration-based training loop.

One step: ``iter_size`` micro-batches -> model -> loss dict -> backward (scaled for fp16) ->
optional clipping -> optimizer step -> schedule step (every iteration, as DeepLab's poly).
It keeps exact resume (model, optimizer, schedule, scaler, RNG, data position), non-finite
checks agreed by every rank, the checkpoints (last.pt every ``checkpoint_interval``, on a stop
and after an error; best.pt by the best-model policy; ``segtrain.engine.checkpoint_files``),
the run record (``segtrain.engine.run_record``: evaluations, best, metrics.json) and the stop
state; evaluation, logs and signals are callbacks (``segtrain.engine.callbacks``), none of
which reads what another writes. ``segtrain.app`` builds it from the config.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from segtrain.core import checkpoint, distributed
from segtrain.core.checkpoint import ScheduleChanged
from segtrain.core.distributed import DistInfo
from segtrain.core.precision import autocast_dtype, resolve_precision
from segtrain.core.rng import load_rank_state, rng_state, set_rng_state
from segtrain.engine import checkpoint_files, finite
from segtrain.engine.callbacks.base import Callback, Evaluation
from segtrain.engine.ema import WeightEMA
from segtrain.engine.finite import NonFiniteLossError
from segtrain.engine.run_record import RunRecord
from segtrain.engine.stop_state import FAILED, FINISHED, PRUNED, STOPPED, StopState
from segtrain.errors import UserError, from_worker
from segtrain.models.base import bare

__all__ = ["FAILED", "FINISHED", "NonFiniteLossError", "PRUNED", "STOPPED", "ScheduleChanged",
           "StopState", "Trainer", "TrainingInterrupted", "set_rng_state"]

log = logging.getLogger("segtrain")


class TrainingInterrupted(UserError):
    """A second Ctrl-C (KeyboardInterrupt) ended the run at once, mid-step: nothing was
    saved, the last.pt on disk (written atomically) is the state to resume from."""

    exit_status = 130  # what a shell reports for a process ended by SIGINT


class OutOfMemory(UserError):
    """A training step ran out of memory (CPU or GPU)."""


def out_of_memory(err: BaseException, batch_shape: tuple[int, ...] | None,
                  iteration: int) -> OutOfMemory | None:
    """``err`` as one line naming the batch and crop when it is an out-of-memory error
    (torch.OutOfMemoryError on a GPU, a RuntimeError of the CPU allocator), else None."""
    text = str(err)
    if not (isinstance(err, torch.OutOfMemoryError) or isinstance(err, RuntimeError) and (
            "out of memory" in text.lower() or "can't allocate memory" in text)):
        return None
    what = "a batch" if batch_shape is None else \
        f"a batch of {batch_shape[0]} images, crop {batch_shape[-2]}x{batch_shape[-1]}"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return OutOfMemory(f"out of memory in the step after iteration {iteration} with {what} "
                       f"({first}); lower trainer.batch_size (with trainer.iter_size to keep "
                       f"the images per step) or the crop (dataset.crop_size)")


def with_lines(error: UserError, lines: list[str]) -> UserError:
    """A copy of ``error`` (same type) whose message has ``lines`` added."""
    longer = type(error).__new__(type(error))
    longer.args = ("\n".join([str(error), *lines]),)
    return longer


class Trainer:
    """Trains ``model`` for ``max_iters`` iterations on ``batches``, calling ``callbacks``.

    Args:
        model: returns ``{"out": logits, ...}``; already on ``device`` (DDP-wrapped if needed);
            called as ``model(image)``, or ``model(image, rows=batch["rows"])`` where the
            batches carry source rows (``dataset.source_rows``, models with ``TAKES_ROWS``).
        loss_fn: ``(outputs, batch) -> {"total": ..., term: ...}``.
        optimizer: its groups carry their rates. lr_factor: iteration -> their multiplier.
        batches: ``start -> the endless stream of training micro-batches from number start
            on``; ``fit`` starts it at ``iteration x iter_size``, so a resumed run continues
            the data where it stopped (``segtrain.data.loader.train_loader``).
        run_dir: where checkpoints, metrics.json (and the callbacks' files) go.
        max_iters: optimizer steps. iter_size: micro-batches per step (DeepLab v2: 10).
        precision: fp32 | bf16 | fp16 | auto. clip_grad_norm: max gradient norm, or None.
        log_interval: every ``log_interval`` steps the loss terms summed on the device are
            read (their means go to ``on_log``) and all ranks agree on a non-finite loss and a
            stop request on any of them, in one host sync; none in between.
        seed: seeds the streams of ranks a resumed run has and its checkpoint has not.
        checkpoint_interval: write last.pt every this many iterations and at the last (after
            every callback's ``on_step_end``, so it holds an evaluation of the same
            iteration); None: only on a stop and after an error.
        keep_checkpoints: also keep the newest N periodic copies of last.pt
            (``segtrain.engine.checkpoint_files``); 0: last.pt and best.pt only.
        class_names: of the dataset, for metrics.json.
        callbacks: called in this order at each hook (``segtrain.engine.callbacks.base``);
            none depends on another's place in the list.
        config_yaml: the resolved config, stored in checkpoints. dist: the rank's position.
        compile: train through ``torch.compile(model)`` (evaluation uses the eager model).
        channels_last: NHWC memory format for the model and its input batches.
        schedule: plain values that fix the learning-rate curve, stored in checkpoints; a
            resume whose values differ is refused (``ScheduleChanged``) unless
            ``allow_schedule_change``: then it continues on the new curve.
        ema_decay: keep an exponential moving average of the weights, updated after every
            optimizer step (``segtrain.engine.ema``), saved in last.pt; it is ``eval_model``,
            the network evaluations score and best.pt holds. None: off.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 lr_factor: Callable[[int], float], batches: Callable[[int], Iterable[dict]],
                 run_dir: str | Path, *, max_iters: int, iter_size: int, precision: str,
                 clip_grad_norm: float | None, log_interval: int, seed: int,
                 device: torch.device, callbacks: Sequence[Callback] = (),
                 config_yaml: str = "", dist: DistInfo | None = None, compile: bool = False,
                 channels_last: bool = False, schedule: dict[str, Any] | None = None,
                 allow_schedule_change: bool = False, ema_decay: float | None = None,
                 checkpoint_interval: int | None = None, keep_checkpoints: int = 0,
                 class_names: Sequence[str] = ()) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # the compiled module shares the parameters; checkpoints and evaluation use the eager one
        self.train_model = torch.compile(model) if compile else model
        self.lr_factor = lr_factor
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        self.schedule, self.allow_schedule_change = schedule or {}, allow_schedule_change
        self.batches, self.run_dir = batches, Path(run_dir)
        self.max_iters, self.iter_size, self.clip_grad_norm = max_iters, iter_size, clip_grad_norm
        self.log_interval, self.seed, self.device = log_interval, seed, device
        self.checkpoint_interval, self.keep_checkpoints = checkpoint_interval, keep_checkpoints
        self.precision = resolve_precision(precision, device)
        self.amp_dtype = autocast_dtype(self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.callbacks, self.config_yaml = list(callbacks), config_yaml
        self.dist, self.iteration = dist or DistInfo(), 0
        self.record = RunRecord(self.run_dir, class_names)
        self.stop = StopState()
        # the BatchNorm statistics before the step in progress (a forward pass changes them
        # before the optimizer step): an error mid-step restores them, so the state saved
        # after it is that of the last completed step; None between steps and once the
        # optimizer step has begun (the state of neither step: nothing is saved then)
        self._buffers_before: list[torch.Tensor] | None = None
        self.at_step_boundary = True
        self._batch_shape: tuple[int, ...] | None = None  # of the step in progress
        # the RNG states after the last completed step (None: none since the start or resume)
        self.rng_after_step: dict[str, Any] | None = None
        # loss terms summed on the device, the first non-finite step (-1: none): read at checks
        self._sums: dict[str, torch.Tensor] = {}
        self._bad_iter = torch.full((), -1, dtype=torch.long, device=device)
        self.ema = None if ema_decay is None else WeightEMA(self.bare_model, ema_decay)

    @property
    def bare_model(self) -> nn.Module:
        return bare(self.model)

    @property
    def eval_model(self) -> nn.Module:
        """What evaluations score and best.pt holds: the weights' average with
        ``ema_decay``, else the trained network."""
        return self.model if self.ema is None else self.ema.module

    def due(self, interval: int) -> bool:
        """Whether an every-``interval`` action is due now (always at the last iteration)."""
        return self.iteration % interval == 0 or self.iteration == self.max_iters

    @property
    def scores(self) -> dict[str, Any]:
        """The last evaluation's scores (``self.record``)."""
        return self.record.scores

    def request_stop(self, signum: int) -> None:
        """Stop after this step, saving last.pt (a signal handler may call it)."""
        self.stop.request(signum)

    def check_finite(self) -> None:
        """Every rank: raise NonFiniteLossError on all if a loss on any was not finite."""
        self._check_finite(weights=False)

    def checkpoint(self, periodic: bool = False) -> None:
        """Every rank: agree that the loss and weights are finite, then save last.pt (and
        with ``periodic`` its copy that ``keep_checkpoints`` keeps)."""
        self._check_finite(weights=True)
        last = self.save("last.pt")
        if periodic and last is not None:
            checkpoint_files.keep_periodic(last.parent, last, self.iteration,
                                           self.keep_checkpoints)

    def publish(self, evaluation: Evaluation) -> None:
        """Record a new evaluation (every rank): best.pt when it is the run's best,
        metrics.json; then hand it to every callback with the run's history."""
        if self.record.add(evaluation.iteration, evaluation.scores):
            # the weights that were scored: the average with trainer.ema.decay
            self.save("best.pt", {"model": bare(self.eval_model).state_dict(),
                                  "iteration": evaluation.iteration,
                                  "metrics": self.record.history[-1],
                                  "config": self.config_yaml})
        evaluation.history = self.record.history
        if self.dist.is_main:
            self.record.write(self.max_iters)
        self._call("on_evaluation", evaluation)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _call_each(self, hook: str, *args: Any) -> list[Any]:
        return [getattr(callback, hook)(self, *args) for callback in self.callbacks]

    def state_dict(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """``rng``: the RNG states of ranks 0, 1, ... (default: this process's, alone)."""
        state = {"model": self.bare_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "iteration": self.iteration, "rng": rng or [rng_state()],
                 "config": self.config_yaml, "schedule": self.schedule}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        state.update(self.record.state_dict())
        for callback in self.callbacks:
            state.update(callback.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "") -> None:
        changed = checkpoint.check_schedule(state.get("schedule"), self.schedule,
                                            self.allow_schedule_change, source)
        base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        checkpoint.load_model_state(self.bare_model, state, source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self._load_ema(state, source)
        self.record.load_state_dict(state)
        for callback in self.callbacks:
            callback.load_state_dict(state)
        load_rank_state(state["rng"], self.dist.rank, self.seed, self.iteration, source)
        if changed:  # the new base rates and curve from this iteration on
            self.scheduler.base_lrs = base_lrs
            for group, base in zip(self.optimizer.param_groups, base_lrs):
                group["initial_lr"] = base
                group["lr"] = base * self.lr_factor(self.iteration)

    def _load_ema(self, state: dict[str, Any], source: str | Path) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:
            log.warning("%s holds no weight average (trainer.ema.decay was null): the "
                        "average starts at iteration %d", source, self.iteration)
        elif "ema" in state:
            log.warning("%s holds a weight average, which trainer.ema.decay=null drops: "
                        "evaluations from here on score the trained weights", source)

    def save(self, name: str = "last.pt", state: dict[str, Any] | None = None) -> Path | None:
        """Rank 0 writes ``state``; without one, the training state (every rank calls it)."""
        rng = None if state is not None else \
            distributed.all_gather_objects(rng_state()) if self.dist.enabled else [rng_state()]
        if not self.dist.is_main:
            return None
        return checkpoint.save_atomic(state or self.state_dict(rng),
                                      self.run_dir / "checkpoints" / name)

    def fit(self) -> str:
        """Train from ``self.iteration`` to ``max_iters``; returns FINISHED, or the stop's
        status when a stop request ended it at a step boundary (STOPPED for a signal, PRUNED
        when a search's pruner did, ``self.stop.prune``; last.pt saved, ``self.stop.text``
        says so); the entry point turns it into the exit status. An error saves the last
        completed step (``_save_after_error``) and goes to the callbacks' ``on_exception``,
        then up; a KeyboardInterrupt (a second Ctrl-C) becomes ``TrainingInterrupted``. The
        last evaluation's scores are ``self.scores``."""
        status = FAILED
        try:
            if self.dist.is_main:
                # kill -9 during a write leaves .last.pt.*.tmp files: this run owns the folder
                checkpoint.remove_stale_temporaries(self.run_dir / "checkpoints",
                                                    checkpoint_files.ALL_NAMES)
            self._call("on_fit_start")
            if self.iteration >= self.max_iters:
                self.record.read_back(self.iteration)  # a requeued job of a finished run
                log.info("nothing to do: the run is at iteration %d of trainer.max_iters=%d "
                         "(raise max_iters to train further)", self.iteration, self.max_iters)
            else:
                self._loop(iter(self.batches(self.iteration * self.iter_size)))
            if self.iteration >= self.max_iters:
                self._call("on_train_end")  # the final evaluation, if it is missing
            status = self.stop.ended_as if self.stop.now and self.iteration < self.max_iters \
                else FINISHED
        except NonFiniteLossError:
            raise  # it kept the last good checkpoint itself
        except KeyboardInterrupt:
            # a second Ctrl-C: at once, no save (it may have cut the stop's own save short,
            # which left the earlier last.pt whole)
            raise TrainingInterrupted(
                f"interrupted again (Ctrl-C) after iteration {self.iteration}: stopped at once "
                f"without saving; resume from the last saved checkpoint with "
                f"trainer.resume={self.run_dir}") from None
        except Exception as err:
            self._restore_step_start()
            error = out_of_memory(err, self._batch_shape, self.iteration) or \
                (from_worker(err) if isinstance(err, UserError) else err)  # not its traceback
            notes = [note for note in [self._save_after_error(error),
                                       *self._call_each("on_exception", error)] if note]
            if isinstance(error, UserError) and notes:  # the lines the entry point prints
                error = with_lines(error, notes)
            if error is err:
                raise
            raise error from err
        finally:
            if status != FINISHED and self.dist.is_main:
                self.record.close(status, self.iteration)  # before on_fit_end reads it
            self._call("on_fit_end", status)
        return status

    def _save_after_error(self, error: BaseException) -> str | None:
        """last.pt of the last completed step after ``error``, when its weights are finite;
        the line that says what was kept. No collective (another rank may be gone): this
        rank's RNG states only."""
        if self.rng_after_step is None:  # no step completed since the start (or resume)
            return None
        last = self.run_dir / "checkpoints" / "last.pt"
        if not self.at_step_boundary:
            note = f"last.pt not saved: the step after iteration {self.iteration} was " \
                   f"interrupted in its optimizer update"
        elif not self._weights_finite():
            note = f"last.pt not saved: the weights after iteration {self.iteration} are " \
                   f"not finite"
        else:
            try:
                self.save("last.pt", self.state_dict(rng=[self.rng_after_step]))
                note = f"saved {last} at iteration {self.iteration} (the last completed " \
                       f"step): resume with trainer.resume={self.run_dir}"
            except Exception as save_err:  # noqa: BLE001 - report the first error
                log.error("could not save last.pt either: %s", save_err)
                return None
        if self.dist.is_main:
            log.error("training stopped by %s at iteration %d; %s", type(error).__name__,
                      self.iteration, note)
        return note

    def _restore_step_start(self) -> None:
        """After an error inside a step's forward/backward: put back the BatchNorm statistics
        of the last completed step (the weights are still its)."""
        if self._buffers_before is not None:
            with torch.no_grad():
                for buffer, before in zip(self.bare_model.buffers(), self._buffers_before):
                    buffer.copy_(before)
            self._buffers_before, self.at_step_boundary = None, True

    def _loop(self, batches: Iterator[dict]) -> None:
        self.model.train()
        tic, done_since_log = time.perf_counter(), 0
        while self.iteration < self.max_iters:
            self._step(batches)
            self.iteration += 1
            self.rng_after_step = rng_state()
            self.at_step_boundary = True
            done_since_log += 1
            if self.due(self.log_interval):
                rate = done_since_log / max(time.perf_counter() - tic, 1e-9)
                terms = self._read_terms(done_since_log)
                self._check_finite(weights=False, terms=terms)
                self._call("on_log", terms, rate)
                tic, done_since_log = time.perf_counter(), 0
            self._call("on_step_end")
            if not self.dist.enabled or self.stop.pruned_at is not None:
                # one process: a host flag, no sync; several ranks agree on a signal at the
                # log, evaluation and checkpoint points (_check_finite), sync-free between;
                # a prune is decided on rank 0 and handed to every rank at the same step
                self.stop.now = self.stop.requested
            periodic = bool(self.checkpoint_interval) and self.due(self.checkpoint_interval)
            if periodic or self.stop.now:
                self.checkpoint(periodic)  # after the callbacks: it holds their evaluation
            if self.stop.now:
                if self.dist.is_main or self.stop.signal is not None:  # and the rank signalled
                    log.warning("%s", self.stop.text(self.iteration, self.run_dir))
                return

    def _step(self, batches: Iterator[dict]) -> None:
        """One optimizer step; adds its loss terms to ``self._sums`` without a host sync."""
        self.at_step_boundary = False
        self._buffers_before = [b.detach().clone() for b in self.bare_model.buffers()]
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for micro in range(self.iter_size):
            batch = next(batches)
            self._batch_shape = tuple(batch["image"].shape)
            image = batch["image"].to(self.device, non_blocking=True,
                                      memory_format=self.memory_format)
            batch["mask"] = batch["mask"].to(self.device, non_blocking=True)
            sync = micro == self.iter_size - 1 or not isinstance(self.model, DDP)
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with torch.autocast(self.device.type, self.amp_dtype,
                                    enabled=self.amp_dtype is not None):
                    if "rows" in batch:  # dataset.source_rows: models with TAKES_ROWS
                        rows = batch["rows"].to(self.device, non_blocking=True)
                        outputs = self.train_model(image, rows=rows)
                    else:
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
        self._buffers_before = None  # from here on the state is of neither step
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.bare_model)

    def _read_terms(self, steps: int) -> dict[str, float]:
        """Mean loss terms over the last ``steps`` steps and over the ranks: the one host sync
        of a log interval (one all-reduce of every term under DDP)."""
        if not self._sums:
            return {}
        values = distributed.all_reduce_mean(torch.stack(list(self._sums.values())))
        terms = {k: v / steps for k, v in zip(self._sums, values.tolist())}
        self._sums = {}
        return terms

    def _weights_finite(self) -> bool:
        return bool(finite.weights_finite_flag(self.bare_model))

    def _check_finite(self, weights: bool, terms: dict[str, float] | None = None) -> None:
        """Every rank together: if a loss (or, with ``weights``, a weight) on any rank is not
        finite, rank 0 keeps the last finite state and all raise the same NonFiniteLossError.
        Several ranks also agree here on a stop request on any of them."""
        flag = finite.weights_finite_flag(self.bare_model) if weights else None
        code, stop = finite.agree(self._bad_iter, flag, self.stop.requested)
        if self.dist.enabled:
            self.stop.now = stop
        if code == finite.FINITE:
            return
        terms = self._read_terms(1) if terms is None else terms
        last = self.run_dir / "checkpoints" / "last.pt"
        ok = torch.tensor(int(self._weights_finite()), device=self.device)
        if distributed.all_reduce_min(ok):  # the same on all ranks
            self.save("last.pt")  # the weights after the last good step
            kept = f"The state after iteration {self.iteration} is saved in {last}."
        else:
            kept = finite.kept_checkpoint(last)
        if code == finite.WEIGHTS_NOT_FINITE:
            raise finite.non_finite_error("weights", self.iteration, terms, kept)
        raise finite.non_finite_error("loss", code + 1, terms, kept)
