"""The run record, owned by the trainer: every evaluation's summary (``history``, saved in
last.pt), the scores of the last one, the best by the best-model policy (the first
evaluation with the highest mIoU; an undefined mIoU, NaN, never wins), and ``metrics.json``,
the record on disk (written by rank 0 after each evaluation and once more when a run ends
before ``max_iters``, so every callback's ``on_fit_end`` finds it final)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segtrain.core.json_files import write_json
from segtrain.eval.metrics import SUMMARY_METRICS

#: the score the best-model policy ranks evaluations by (best.pt, ``best_miou``)
BEST_METRIC = "miou"


def best_evaluation(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best model of a run: the first evaluation with the highest ``BEST_METRIC``
    (NaN never wins); None before any evaluation."""
    best, best_score = None, -math.inf
    for entry in history:
        if entry[BEST_METRIC] > best_score:
            best, best_score = entry, entry[BEST_METRIC]
    return best


class RunRecord:
    """The evaluations of one run (the same on every rank: the scores are all-reduced).

    Args:
        run_dir: where ``metrics.json`` goes.
        class_names: of the dataset, written beside the per-class scores.
    """

    def __init__(self, run_dir: str | Path, class_names: Sequence[str] = ()) -> None:
        self.path = Path(run_dir) / "metrics.json"
        self.class_names = list(class_names)
        self.history: list[dict[str, Any]] = []  # summaries, oldest first
        self.scores: dict[str, Any] = {}  # of the last evaluation

    @property
    def best(self) -> dict[str, Any] | None:
        return best_evaluation(self.history)

    def add(self, iteration: int, scores: dict[str, Any]) -> bool:
        """Record an evaluation; True when it is the run's best so far (best.pt is due)."""
        self.scores = scores
        self.history.append({**{k: scores[k] for k in SUMMARY_METRICS},
                             "iteration": iteration})
        return self.best is self.history[-1]

    def evaluated_at(self, iteration: int) -> bool:
        return bool(self.history) and self.history[-1]["iteration"] == iteration

    def write(self, max_iters: int) -> None:
        """metrics.json of the last evaluation (rank 0). ``finished`` is what tells a final
        score from the partial one of a run still going or stopped."""
        it = self.history[-1]["iteration"]
        best = self.best
        finished = it >= max_iters
        write_json({"iteration": it, "max_iters": max_iters, "finished": finished,
                    "status": "finished" if finished else "running",
                    "best_miou": None if best is None else best[BEST_METRIC],
                    "class_names": self.class_names, **self.scores,
                    "history": self.history}, self.path)

    def close(self, status: str, iteration: int) -> None:
        """A run that ended with ``status`` other than finished: metrics.json, if written,
        says so and where it stopped (rank 0)."""
        if not self.path.is_file():
            return
        data = json.loads(self.path.read_text())
        data.update(finished=False, status=status, stopped_at=iteration)
        write_json(data, self.path)

    def read_back(self, iteration: int) -> None:
        """A run resumed at its end (a requeued job whose run had finished): the final
        scores from metrics.json, when it holds those of ``iteration``."""
        if self.scores or not self.path.is_file():
            return
        data = json.loads(self.path.read_text())
        if data.get("finished") and data.get("iteration") == iteration:
            self.scores = data

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
