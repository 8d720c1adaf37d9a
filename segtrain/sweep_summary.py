"""The summary a sweep (``python -m segtrain -m ...``) ends with: each job's number, overrides,
status and mIoU, one line each, on stdout.

A Hydra callback (``hydra.callbacks.sweep_summary`` in conf/config.yaml). Each job's line is
read from its folder (``<sweep>/<job>/.hydra/overrides.yaml``, ``metrics.json``), so jobs a
cluster launcher ran elsewhere are there as well; a job that failed before writing either is
named with the overrides and error its ``JobReturn`` carried where the job ran in this process.
Hydra's basic sweeper re-raises a failed job's error after the last job, before
``on_multirun_end``: ``python -m segtrain`` (``segtrain.__main__.cli``) then prints the
summary itself (``print_unprinted``)::

    sweep outputs/multirun/2026-12-06/23-20-00: 2 jobs, 1 finished, 1 failed
    job  overrides            status                                        mIoU
    0    trainer.max_iters=2  finished                                      16.15
    1    trainer.max_iters=0  failed: trainer.max_iters=0: expected an ...  n/a
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from segtrain.eval.metrics import percent

#: the summaries of sweeps started in this process and not printed yet
_UNPRINTED: list[SweepSummary] = []


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.returns: dict[int, JobReturn] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: ARG002
        self.sweep_dir, self.returns = Path(str(config.hydra.sweep.dir)), {}
        _UNPRINTED.append(self)

    def on_job_end(self, config: DictConfig, job_return: JobReturn,
                   **kwargs: Any) -> None:  # noqa: ARG002
        if self.sweep_dir is not None:  # a job of this process's sweep
            self.returns[int(config.hydra.job.num)] = job_return

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: ARG002
        self.print()

    def print(self) -> None:
        if self in _UNPRINTED:
            _UNPRINTED.remove(self)
        # a sweep refused before its first job (a sweeper option, say) has its error only;
        # a job run elsewhere (SLURM) left its folder, a refused one too (its log says why)
        started = self.sweep_dir is not None and (
            bool(self.returns) or self.sweep_dir.is_dir() and any(
                p.is_dir() for p in self.sweep_dir.iterdir()))
        if started:
            print(summary(self.sweep_dir, self.returns), flush=True)


def print_unprinted() -> None:
    """Print the summary of a sweep that ended before ``on_multirun_end`` (a failed job)."""
    for sweep in list(_UNPRINTED):
        sweep.print()


def job_row(folder: Path, job_return: JobReturn | None) -> tuple[str, str, str]:
    """(overrides, status, mIoU) of one job folder."""
    saved = folder / ".hydra" / "overrides.yaml"
    if saved.is_file():
        overrides = yaml.safe_load(saved.read_text()) or []
    else:
        overrides = list(job_return.overrides) if job_return is not None else ["?"]
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    failed = job_return is not None and job_return.status == JobStatus.FAILED
    if failed:
        error = job_return._return_value  # the exception; .return_value would raise it
        status = f"failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    elif metrics:
        status = "finished" if metrics.get("finished") else str(metrics.get("status"))
    else:
        status = "failed (no metrics.json)"
    score = percent(metrics.get("miou")) if metrics.get("finished") and not failed else "n/a"
    return " ".join(overrides) or "(none)", status, score


def summary(sweep_dir: Path, returns: dict[int, JobReturn] | None = None) -> str:
    """The table of the jobs in ``sweep_dir`` (its numbered folders, and jobs of ``returns``
    that made none)."""
    returns = returns or {}
    numbers = sorted({int(p.name) for p in sweep_dir.glob("*") if p.name.isdigit()}
                     | set(returns))
    rows = [(str(n), *job_row(sweep_dir / str(n), returns.get(n))) for n in numbers]
    finished = sum(row[2] == "finished" for row in rows)
    failed = sum(row[2].startswith("failed") for row in rows)
    counts = f"{len(rows)} job{'s' if len(rows) != 1 else ''}, {finished} finished"
    counts += f", {failed} failed" if failed else ""
    others = len(rows) - finished - failed
    counts += f", {others} other (stopped, pruned)" if others else ""
    header = ("job", "overrides", "status", "mIoU")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [f"sweep {sweep_dir}: {counts}"]
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
    return "\n".join(lines)
