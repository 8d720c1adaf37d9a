"""The trainer as a loop with callbacks: the batch stream it asks for, the hooks in order, the
learning rate it sets per group and step, the best-model policy, the evaluation record across
a resume, the progress bar only on a terminal, and the preemption callback's signal hand-on
and submitit exit. Tiny in-memory models and batches; no config."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from segtrain.core import checkpoint
from segtrain.engine.callbacks.base import Callback
from segtrain.engine.callbacks.evaluation import PeriodicEvaluation
from segtrain.engine.callbacks.preemption import Preemption
from segtrain.engine.callbacks.run_log import RunLog
from segtrain.engine.run_record import best_evaluation
from segtrain.engine.schedules import poly
from segtrain.engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return {"out": self.head(self.backbone(x))}


def _stream(start: int):
    """Micro-batch ``i`` (from ``start`` on) is filled with the value ``i``."""
    i = start
    while True:
        yield {"image": torch.full((1, 3, 2, 2), float(i)),
               "mask": torch.zeros(1, 2, 2, dtype=torch.long)}
        i += 1


def _trainer(run_dir: Path, callbacks=(), max_iters=4, iter_size=1, loss=None, groups=None,
             batches=_stream, log_interval=2, checkpoint_interval=None) -> Trainer:
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(groups(model) if groups else model.parameters(), lr=0.01)
    return Trainer(model, loss or (lambda o, b: {"total": o["out"].mean()}), opt,
                   poly(max_iters, 0.9), batches, run_dir, max_iters=max_iters,
                   iter_size=iter_size, precision="fp32", clip_grad_norm=None,
                   log_interval=log_interval, seed=0, device=torch.device("cpu"),
                   callbacks=callbacks, checkpoint_interval=checkpoint_interval)


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_fit_start(self, trainer):
        self.calls.append(("start", trainer.iteration))

    def on_log(self, trainer, terms, rate):
        self.calls.append(("log", trainer.iteration))

    def on_step_end(self, trainer):
        self.calls.append(("step", trainer.iteration))

    def on_exception(self, trainer, error):
        self.calls.append(("exception", type(error).__name__))

    def on_fit_end(self, trainer, status):
        self.calls.append(("end", status))


class FakeEvaluator:
    """Returns the next mIoU of ``mious`` at each call, with one sample for the figures."""

    def __init__(self, mious: list[float]) -> None:
        self.mious = list(mious)
        self.samples: list[dict] = []
        self.per_image, self.worst = None, []  # eval.save_per_image, eval.dump_worst: off

    def run(self, model, device):
        miou = self.mious.pop(0)
        self.samples = [{"image": np.zeros((2, 2, 3), np.uint8),
                         "mask": np.zeros((2, 2), np.int64), "pred": np.ones((2, 2), np.int64)}]
        return {"miou": miou, "pixel_acc": 0.9, "mean_acc": 0.8, "fwiou": 0.7,
                "iou": [miou, math.nan], "acc": [0.9, math.nan]}


def test_a_resumed_trainer_asks_the_stream_for_its_next_micro_batch(tmp_path):
    starts, seen = [], []

    def batches(start):
        starts.append(start)
        for batch in _stream(start):
            seen.append(int(batch["image"][0, 0, 0, 0]))
            yield batch

    first = _trainer(tmp_path, max_iters=6, iter_size=2, batches=batches)
    first.iteration = 3  # as a checkpoint of iteration 3 would set it
    state = first.state_dict()
    resumed = _trainer(tmp_path, max_iters=6, iter_size=2, batches=batches)
    resumed.load_state_dict(state)
    resumed.fit()
    assert starts == [6]  # 3 steps x 2 micro-batches already consumed
    assert seen[:6] == [6, 7, 8, 9, 10, 11]  # micro-batches 6..11: steps 4, 5 and 6


def test_hooks_run_in_order_and_a_failure_reaches_on_exception(tmp_path):
    rec = Recorder()
    _trainer(tmp_path, [rec], max_iters=3).fit()
    assert rec.calls == [("start", 0), ("step", 1), ("log", 2), ("step", 2), ("log", 3),
                         ("step", 3), ("end", "finished")]

    def loss(outputs, batch):
        if float(batch["image"][0, 0, 0, 0]) == 1:  # the second step
            raise RuntimeError("boom")
        return {"total": outputs["out"].mean()}

    rec = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [rec], loss=loss).fit()
    assert rec.calls == [("start", 0), ("step", 1), ("exception", "RuntimeError"),
                         ("end", "failed")]


def test_the_rate_of_each_group_follows_poly_per_optimizer_step(tmp_path):
    """What the optimizer really uses in each step: base x mult x (1 - it/max)^0.9, once
    per optimizer step whatever the number of micro-batches."""
    used = []

    def groups(model):
        return [{"params": model.backbone.parameters(), "lr": 0.01, "name": "backbone"},
                {"params": model.head.parameters(), "lr": 0.1, "name": "head"}]

    trainer = None

    def loss(outputs, batch):
        used.append([g["lr"] for g in trainer.optimizer.param_groups])
        return {"total": outputs["out"].mean()}

    trainer = _trainer(tmp_path, max_iters=5, iter_size=2, loss=loss, groups=groups)
    trainer.fit()
    expected = [base * (1 - it / 5) ** 0.9 for it in range(5) for _ in range(2)
                for base in (0.01, 0.1)]
    assert [lr for rates in used for lr in rates] == pytest.approx(expected, rel=1e-12)


def test_best_evaluation_is_the_first_highest_miou_and_never_nan():
    history = [{"miou": 0.3, "iteration": 1}, {"miou": math.nan, "iteration": 2},
               {"miou": 0.5, "iteration": 3}, {"miou": 0.5, "iteration": 4}]
    assert best_evaluation(history)["iteration"] == 3
    assert best_evaluation([{"miou": math.nan, "iteration": 1}]) is None
    assert best_evaluation([]) is None


def test_best_pt_metrics_and_the_history_survive_a_resume(tmp_path):
    run = tmp_path / "run"

    def callbacks(mious):
        return [PeriodicEvaluation(FakeEvaluator(mious), interval=2),
                RunLog(["a", "b"], np.array([[0, 0, 0], [255, 0, 0]], np.uint8), 255,
                       progress=False)]

    _trainer(run, callbacks([0.4, 0.6]), max_iters=4, checkpoint_interval=2).fit()
    assert checkpoint.load(run / "checkpoints" / "best.pt")["iteration"] == 4
    # a longer run resumed from last.pt: its evaluations are worse than iteration 4's
    later = callbacks([0.5, 0.55])
    resumed = _trainer(run, later, max_iters=8, checkpoint_interval=2)
    resumed.load_state_dict(checkpoint.load(run))
    resumed.fit()
    saved = json.loads((run / "metrics.json").read_text())
    assert [h["iteration"] for h in saved["history"]] == [2, 4, 6, 8]
    assert saved["best_miou"] == 0.6 and saved["miou"] == 0.55 and saved["finished"]
    assert saved["iou"] == [0.55, None]  # strict JSON: an undefined IoU is null
    best = checkpoint.load(run / "checkpoints" / "best.pt")
    assert best["iteration"] == 4 and best["metrics"]["miou"] == 0.6
    assert checkpoint.load(run)["history"] == saved["history"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        f"iter_000000{i}.png" for i in (2, 4, 6, 8)]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, bar", [(io.StringIO, False), (_Terminal, True)])
def test_the_progress_bar_only_on_a_terminal_the_log_lines_always(tmp_path, monkeypatch,
                                                                  caplog, stream, bar):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    with caplog.at_level(logging.INFO, logger="segtrain"):
        _trainer(tmp_path, [RunLog(["a", "b"], None, 255)], max_iters=4).fit()
    assert ("train:" in err.getvalue()) is bar
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]


def test_a_stop_signal_saves_last_pt_and_gives_the_signal_back(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
    before = signal.getsignal(signal.SIGUSR1)

    def loss(outputs, batch):
        if float(batch["image"][0, 0, 0, 0]) == 1:  # during the second step
            os.kill(os.getpid(), signal.SIGUSR1)
        return {"total": outputs["out"].mean()}

    trainer = _trainer(tmp_path, [Preemption()], max_iters=6, loss=loss, log_interval=100)
    assert trainer.fit() == "stopped"
    assert trainer.stop.text(trainer.iteration, tmp_path).startswith(
        "signal 10 received (SIGUSR1): saved checkpoints/last.pt at iteration 2")
    assert checkpoint.load(tmp_path)["iteration"] == 2
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_second_ctrl_c_ends_at_once_and_keeps_the_last_checkpoint(tmp_path):
    before = signal.getsignal(signal.SIGINT)

    def loss(outputs, batch):
        if float(batch["image"][0, 0, 0, 0]) == 4:  # in the fifth step: Ctrl-C twice
            os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop at the boundary
            os.kill(os.getpid(), signal.SIGINT)  # the second ends now, mid-step
        return {"total": outputs["out"].mean()}

    trainer = _trainer(tmp_path, [Preemption()], max_iters=8, loss=loss,
                       checkpoint_interval=3)
    with pytest.raises(TrainingInterrupted, match="interrupted again .* after iteration 4: "
                                                  "stopped at once without saving") as err:
        trainer.fit()
    assert err.value.exit_status == 130
    assert checkpoint.load(tmp_path)["iteration"] == 3  # the earlier last.pt, whole
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    assert signal.getsignal(signal.SIGINT) is before


def test_under_submitit_the_signal_reaches_its_handler_and_the_job_exits(tmp_path,
                                                                         monkeypatch):
    from segtrain.__main__ import exit_stopped

    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path / "submitit"))
    handed = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: handed.append(signum))
    try:
        def loss(outputs, batch):
            if float(batch["image"][0, 0, 0, 0]) == 2:
                os.kill(os.getpid(), signal.SIGUSR2)
            return {"total": outputs["out"].mean()}

        assert _trainer(tmp_path, [Preemption()], max_iters=6, loss=loss).fit() == "stopped"
        with pytest.raises(SystemExit) as exit_:  # what the entry point does with it
            exit_stopped(signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert exit_.value.code == 1  # no result: the launcher waits for the requeued job
    assert handed == [signal.SIGUSR2]  # submitit's own handler requeues the job
    assert checkpoint.load(tmp_path)["iteration"] == 3


def test_a_stop_after_the_weights_went_nan_keeps_the_last_good_checkpoint(tmp_path):
    """A stop between two log points used to save whatever weights there were: NaN ones
    overwrote the last good last.pt. The stop now checks them first."""
    trainer = None

    def loss(outputs, batch):
        step = int(batch["image"][0, 0, 0, 0])
        if step == 3:  # NaN gradients in step 4, then a stop signal
            trainer.request_stop(signal.SIGTERM)
            return {"total": outputs["out"].mean() * math.nan}
        return {"total": outputs["out"].mean()}

    trainer = _trainer(tmp_path, [], max_iters=8, loss=loss, log_interval=100,
                       checkpoint_interval=3)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 4"):
        trainer.fit()
    state = checkpoint.load(tmp_path)
    assert state["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_log_lines_give_the_elapsed_time_and_the_eta_of_this_process(tmp_path, monkeypatch,
                                                                     caplog):
    """Each step takes 60 s on a fake clock: the ETA is the steps left at that pace; after a
    resume at iteration 4 the pace is of the steps this process did, not of iteration 0 on."""
    now, first = [1000.0], None
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    def loss(outputs, batch):
        now[0] += 60.0
        if first is not None and int(batch["image"][0, 0, 0, 0]) == 3:
            first.request_stop(signal.SIGTERM)  # the first process stops at iteration 4
        return {"total": outputs["out"].mean()}

    def lines() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")]
        caplog.clear()
        return [" ".join(line.split()[-4:]) for line in found]

    with caplog.at_level(logging.INFO, logger="segtrain"):
        first = _trainer(tmp_path, [RunLog(["a", "b"], None, 255, progress=False)],
                         max_iters=8, loss=loss)
        assert first.fit() == "stopped" and first.iteration == 4
        assert lines() == ["elapsed 0:02:00 eta 0:06:00", "elapsed 0:04:00 eta 0:04:00"]
        now[0] += 3600.0  # an hour before the resumed process starts
        first = None
        resumed = _trainer(tmp_path, [RunLog(["a", "b"], None, 255, progress=False)],
                           max_iters=8, loss=loss)
        resumed.load_state_dict(checkpoint.load(tmp_path))
        resumed.fit()
    assert lines() == ["elapsed 0:02:00 eta 0:02:00", "elapsed 0:04:00 eta 0:00:00"]


def test_keep_checkpoints_keeps_the_newest_periodic_copies_of_last_pt(tmp_path):
    _trainer(tmp_path / "plain", max_iters=8, checkpoint_interval=2).fit()
    assert sorted(p.name for p in (tmp_path / "plain" / "checkpoints").iterdir()) == [
        "last.pt"]
    trainer = _trainer(tmp_path / "kept", max_iters=8, checkpoint_interval=2)
    trainer.keep_checkpoints = 2
    trainer.fit()
    folder = tmp_path / "kept" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "iter_0000006.pt", "iter_0000008.pt", "last.pt"]
    six = checkpoint.load(folder / "iter_0000006.pt")
    assert six["iteration"] == 6 and checkpoint.load(folder / "last.pt")["iteration"] == 8
    assert not torch.equal(six["model"]["head.weight"], trainer.model.head.weight)


def test_the_callbacks_order_is_free_the_trainer_records_before_them(tmp_path):
    """A callback listed before the evaluation still gets a last.pt that holds the
    evaluation of the same iteration, and one listed first reads the final metrics.json
    at on_fit_end (the old Checkpoints and RunLog callbacks had to come in one order)."""
    seen = []

    class ReadsTheRecord(Callback):
        def on_fit_end(self, trainer, status):
            seen.append(json.loads((trainer.run_dir / "metrics.json").read_text())["status"])

    def run(folder, stop_in_step=None):
        trainer = None

        def loss(outputs, batch):
            if int(batch["image"][0, 0, 0, 0]) + 1 == stop_in_step:
                trainer.request_stop(signal.SIGTERM)
            return {"total": outputs["out"].mean()}

        palette = np.array([[0, 0, 0], [255, 0, 0]], np.uint8)
        trainer = _trainer(folder, [ReadsTheRecord(), RunLog(["a", "b"], palette, 255, False),
                                    PeriodicEvaluation(FakeEvaluator([0.4, 0.6]), 2)],
                           max_iters=4, loss=loss, checkpoint_interval=2)
        return trainer.fit()

    assert run(tmp_path / "a") == "finished"
    assert [h["iteration"] for h in checkpoint.load(tmp_path / "a")["history"]] == [2, 4]
    assert run(tmp_path / "b", stop_in_step=3) == "stopped"
    assert seen == ["finished", "stopped"]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["stopped_at"] == 3
