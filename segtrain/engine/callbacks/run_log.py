"""What a run leaves to read: a log line every ``log_interval`` steps (on every kind of
output), a progress bar on a terminal only (in a SLURM output file, under nohup or in CI its
carriage-return updates would pile up on one line), TensorBoard scalars and images, a
sample-prediction figure per evaluation and ``metrics.json``."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from segtrain.core.json_files import write_json
from segtrain.engine.callbacks.base import Callback, Evaluation
from segtrain.engine.callbacks.checkpoints import best_evaluation
from segtrain.eval import per_image
from segtrain.eval.metrics import SUMMARY_METRICS, format_table
from segtrain.viz import comparison_strip, write_worst

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer

log = logging.getLogger("segtrain")


class RunLog(Callback):
    """Logs and files of rank 0 in ``trainer.run_dir``: ``train.log`` lines (through the
    ``segtrain`` logger), ``tb/``, ``samples/iter_<iteration>.png``, ``metrics.json`` (and
    ``per_image.npz`` of the same evaluation with ``eval.save_per_image``, the panels of its
    worst images in ``worst/iter_<iteration>/`` with ``eval.dump_worst``).

    Args:
        class_names, palette, ignore_index: of the dataset, for the tables and figures.
        progress: show a progress bar; None: only when standard error is a terminal.
    """

    def __init__(self, class_names: Sequence[str], palette: np.ndarray | None,
                 ignore_index: int, progress: bool | None = None) -> None:
        self.class_names, self.palette, self.ignore_index = class_names, palette, ignore_index
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.writer, self.bar = None, None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(trainer.run_dir / "tb"))
        self.bar = tqdm(total=trainer.max_iters, initial=trainer.iteration, desc="train",
                        disable=not self.progress, dynamic_ncols=True, mininterval=1.0)
        saved = trainer.run_dir / "metrics.json"
        if trainer.iteration >= trainer.max_iters and saved.is_file():
            # a requeued job whose run had already finished reports the final scores
            data = json.loads(saved.read_text())
            if data.get("finished") and data.get("iteration") == trainer.iteration:
                trainer.scores = data

    def on_log(self, trainer: Trainer, terms: dict[str, float], rate: float) -> None:
        if not trainer.dist.is_main:
            return
        groups = trainer.optimizer.param_groups
        self.bar.set_postfix(loss=f"{terms['total']:.4f}", lr=f"{groups[0]['lr']:.2e}",
                             refresh=False)
        log.info("iter %d/%d  %s  lr %.3e  %.2f it/s", trainer.iteration, trainer.max_iters,
                 "  ".join(f"{k} {v:.4f}" for k, v in terms.items()), groups[0]["lr"], rate)
        for k, v in terms.items():
            self.writer.add_scalar(f"train/loss/{k}", v, trainer.iteration)
        for i, group in enumerate(groups):
            self.writer.add_scalar(f"train/lr/{group.get('name', str(i))}", group["lr"],
                                   trainer.iteration)
        self.writer.add_scalar("train/iters_per_s", rate, trainer.iteration)

    def on_step_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_evaluation(self, trainer: Trainer, evaluation: Evaluation) -> None:
        if not trainer.dist.is_main:
            return
        it, scores = evaluation.iteration, evaluation.scores
        log.info("eval at iteration %d\n%s", it, format_table(scores, self.class_names))
        for k in SUMMARY_METRICS:
            self.writer.add_scalar(f"val/{k}", scores[k], it)
        for name, iou in zip(self.class_names, scores["iou"]):
            if iou == iou:  # NaN: class absent from prediction and ground truth
                self.writer.add_scalar(f"val/iou/{name}", iou, it)
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
        best = best_evaluation(evaluation.history)
        finished = it >= trainer.max_iters
        # "finished" is what tells a final score from the partial one of a stopped run
        write_json({"iteration": it, "max_iters": trainer.max_iters, "finished": finished,
                    "status": "finished" if finished else "running",
                    "best_miou": None if best is None else best["miou"],
                    "class_names": list(self.class_names), **scores,
                    "history": evaluation.history}, trainer.run_dir / "metrics.json")

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.writer, self.bar = None, None
        path = trainer.run_dir / "metrics.json"
        if status == "finished" or not trainer.dist.is_main or not path.is_file():
            return
        # metrics.json, if written, says the run stopped before max_iters
        data = json.loads(path.read_text())
        data.update(finished=False, status=status, stopped_at=trainer.iteration)
        write_json(data, path)
