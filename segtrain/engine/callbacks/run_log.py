"""What a run leaves to read: a log line every ``log_interval`` steps (on every kind of
output), a progress bar on a terminal only (in a SLURM output file, under nohup or in CI its
carriage-return updates would pile up on one line), TensorBoard scalars and images and a
sample-prediction figure per evaluation. ``metrics.json`` is the trainer's run record
(``segtrain.engine.run_record``)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from segtrain.engine.callbacks.base import Callback, Evaluation, train_scalars, val_scalars
from segtrain.eval import per_image
from segtrain.eval.metrics import format_table
from segtrain.viz import comparison_strip, write_worst

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer

log = logging.getLogger("segtrain")


def clock(seconds: float) -> str:
    """``seconds`` as h:mm:ss."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class RunLog(Callback):
    """Logs and files of rank 0 in ``trainer.run_dir``: ``train.log`` lines (through the
    ``segtrain`` logger), ``tb/``, ``samples/iter_<iteration>.png`` (and ``per_image.npz``
    of the same evaluation with ``eval.save_per_image``, beside metrics.json, the panels of
    its worst images in ``worst/iter_<iteration>/`` with ``eval.dump_worst``).

    Args:
        class_names, palette, ignore_index: of the dataset, for the tables and figures.
        progress: show a progress bar; None: only when standard error is a terminal.
    """

    def __init__(self, class_names: Sequence[str], palette: np.ndarray | None,
                 ignore_index: int, progress: bool | None = None) -> None:
        self.class_names, self.palette, self.ignore_index = class_names, palette, ignore_index
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.writer, self.bar = None, None
        self.started = (time.perf_counter(), 0)  # the time and iteration of this start

    def on_fit_start(self, trainer: Trainer) -> None:
        self.started = (time.perf_counter(), trainer.iteration)
        if not trainer.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(trainer.run_dir / "tb"))
        self.bar = tqdm(total=trainer.max_iters, initial=trainer.iteration, desc="train",
                        disable=not self.progress, dynamic_ncols=True, mininterval=1.0)

    def on_log(self, trainer: Trainer, terms: dict[str, float], rate: float) -> None:
        if not trainer.dist.is_main:
            return
        groups = trainer.optimizer.param_groups
        self.bar.set_postfix(loss=f"{terms['total']:.4f}", lr=f"{groups[0]['lr']:.2e}",
                             refresh=False)
        # the time since this process started training and the time left at its mean pace
        # (evaluations and checkpoints included; a resumed run: the steps done since it)
        elapsed = time.perf_counter() - self.started[0]
        done = max(trainer.iteration - self.started[1], 1)
        left = (trainer.max_iters - trainer.iteration) * elapsed / done
        log.info("iter %d/%d  %s  lr %.3e  %.2f it/s  elapsed %s  eta %s", trainer.iteration,
                 trainer.max_iters, "  ".join(f"{k} {v:.4f}" for k, v in terms.items()),
                 groups[0]["lr"], rate, clock(elapsed), clock(left))
        for name, value in train_scalars(trainer, terms, rate).items():
            self.writer.add_scalar(name, value, trainer.iteration)

    def on_step_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_evaluation(self, trainer: Trainer, evaluation: Evaluation) -> None:
        if not trainer.dist.is_main:
            return
        it, scores = evaluation.iteration, evaluation.scores
        log.info("eval at iteration %d\n%s", it, format_table(scores, self.class_names))
        for name, value in val_scalars(scores, self.class_names).items():
            self.writer.add_scalar(name, value, it)
        if evaluation.samples:
            strip = comparison_strip(evaluation.samples, self.palette, self.ignore_index)
            self.writer.add_image("val/image_gt_pred", strip, it, dataformats="HWC")
            (trainer.run_dir / "samples").mkdir(exist_ok=True)
            Image.fromarray(strip).save(trainer.run_dir / "samples" / f"iter_{it:07d}.png")
        if evaluation.per_image is not None:  # eval.save_per_image: beside metrics.json
            per_image.save(evaluation.per_image, self.class_names,
                           trainer.run_dir / "per_image.npz")
        if evaluation.worst:  # eval.dump_worst
            write_worst(evaluation.worst, trainer.run_dir / "worst" / f"iter_{it:07d}",
                        self.palette, self.ignore_index)

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.writer, self.bar = None, None
