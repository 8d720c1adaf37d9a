"""Turn a Hydra sweep folder into the paper's table: ours, the paper's and the difference.

    python scripts/ablation_table.py outputs/multirun/<date>/<time>

Each run folder of the sweep holds ``.hydra/overrides.yaml`` (and ``.hydra/hydra.yaml``),
``.hydra/config.yaml`` and, once it has evaluated, ``metrics.json``. The experiment a run
belongs to (``experiment=<name>``) names the paper file
``conf/experiment/paper/<name>.yml``; its rows say which sweep overrides identify them
(``{lr: poly}`` -> 63.42). A row goes to the run whose overrides contain all of the row's,
the most specific row winning. The table has one line per run: the overrides that vary
across the sweep, the run's status, then for mIoU (and each other metric the paper reports)
ours, the paper's and ours minus the paper's, in percent. Paper rows no run matched are
listed as ``not run``.

Status: ``failed`` when a run has no metrics.json; ``unfinished`` when its metrics.json says
``"finished": false`` or ``"interrupted": true``, or its last evaluation is before
``trainer.max_iters``; ``ok`` otherwise.

The table is printed as Markdown and written to ``<sweep>/ablation_table.md`` and
``<sweep>/ablation_table.csv``.

A hyper-parameter search (``hydra/sweeper=optuna_miou``; its sweep folder holds the
sweeper's ``optimization_results.yaml``, or pass ``--trials``) is shown as its trials
instead: best score first, failed and unfinished trials last, without a score.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import yaml

PAPER_DIR = Path(__file__).resolve().parents[1] / "conf" / "experiment" / "paper"
METRIC_NAMES = {"miou": "mIoU", "pixel_acc": "pixel acc", "mean_acc": "mean acc",
                "fwiou": "fwIoU"}


def _norm(value) -> str:
    """Overrides compare as text without spaces: ``[256, 512]`` == ``[256,512]``."""
    if isinstance(value, bool):
        value = str(value).lower()
    return str(value).replace(" ", "")


def _read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def run_status(metrics: dict | None, max_iters: int | None) -> str:
    if metrics is None:
        return "failed (no metrics.json)"
    iteration = metrics.get("iteration")
    if metrics.get("finished") is False or metrics.get("interrupted"):
        return f"unfinished (iteration {iteration} of {max_iters})"
    if max_iters is not None and iteration is not None and iteration < max_iters:
        return f"unfinished (iteration {iteration} of {max_iters})"
    return "ok"


def collect(sweep: Path) -> list[dict]:
    """One dict per run folder: name, overrides, experiment, metrics (or None), status."""
    runs = []
    # recursive: an override with a path (dataset.root=/data/VOC) nests Hydra's subdir name;
    # folders inside a run (segtrain.evaluate's eval/<...>/.hydra) are not runs of the sweep
    found = sorted(f.parent.parent for f in sweep.glob("**/.hydra/overrides.yaml"))
    run_dirs = [r for r in found if not any(o != r and o in r.parents for o in found)]
    for run in run_dirs:
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = dict(o.split("=", 1) for o in _read_yaml(overrides_file) or [] if "=" in o)
        overrides = {k.lstrip("+~"): v for k, v in overrides.items()}
        hydra_cfg = _read_yaml(run / ".hydra" / "hydra.yaml") or {}
        choices = hydra_cfg.get("hydra", {}).get("runtime", {}).get("choices", {})
        experiment = overrides.get("experiment") or choices.get("experiment")
        config = _read_yaml(run / ".hydra" / "config.yaml") or {}
        max_iters = config.get("trainer", {}).get("max_iters")
        metrics_file = run / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        runs.append({"run": str(run.relative_to(sweep)), "overrides": overrides,
                     "experiment": experiment, "metrics": metrics,
                     "status": run_status(metrics, max_iters)})
    if not runs:
        raise SystemExit(f"{sweep}: no run folders with .hydra/overrides.yaml found; pass the "
                         f"sweep folder Hydra printed (outputs/multirun/<date>/<time>)")
    return runs


def load_paper(experiment: str | None, paper_dir: Path) -> list[dict]:
    """The rows of ``<paper_dir>/<experiment>.yml``; none when there is no such file."""
    if not experiment:
        return []
    data = _read_yaml(paper_dir / f"{experiment}.yml") or {}
    rows = data.get("rows") or []
    for row in rows:
        row["overrides"] = {k: _norm(v) for k, v in (row.get("overrides") or {}).items()}
    return rows


def match(run: dict, rows: list[dict]) -> list[dict]:
    """The paper rows of ``run``: all rows with the most specific matching override set."""
    ours = {k: _norm(v) for k, v in run["overrides"].items()}
    hits = [r for r in rows if all(ours.get(k) == v for k, v in r["overrides"].items())]
    if not hits:
        return []
    best = max(len(r["overrides"]) for r in hits)
    return [r for r in hits if len(r["overrides"]) == best]


def _pct(value) -> str:
    return "" if value is None else f"{value:.2f}"


def table(runs: list[dict], paper_dir: Path = PAPER_DIR) -> tuple[list[str], list[list[str]]]:
    papers = {r["experiment"]: load_paper(r["experiment"], paper_dir) for r in runs}
    matched = [match(r, papers[r["experiment"]]) for r in runs]
    metrics = ["miou"] + sorted({row["metric"] for rows in matched for row in rows} - {"miou"})
    keys = sorted({k for r in runs for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1] or keys
    header = ["run", *varying, "status"]
    for m in metrics:
        name = METRIC_NAMES.get(m, m)
        header += [name, f"paper {name}", f"diff {name}"]
    header.append("paper source")

    body = []
    for run, rows in zip(runs, matched):
        line = [run["run"], *(run["overrides"].get(k, "") for k in varying), run["status"]]
        for m in metrics:
            value = (run["metrics"] or {}).get(m)
            ours = None if value is None else 100.0 * value
            paper = next((float(r["value"]) for r in rows if r["metric"] == m), None)
            diff = None if ours is None or paper is None else ours - paper
            line += ["n/a" if ours is None else _pct(ours), _pct(paper),
                     "" if diff is None else f"{diff:+.2f}"]
        line.append("; ".join(sorted({f"{r['paper']}, {r['table']}" for r in rows})))
        body.append(line)

    # paper rows that no run of the sweep reproduces
    for experiment, rows in papers.items():
        used = {id(r) for rs in matched for r in rs}
        for row in rows:
            if id(row) in used:
                continue
            label = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or experiment
            line = [label, *("" for _ in varying), "not run"]
            for m in metrics:
                line += ["", _pct(float(row["value"])) if row["metric"] == m else "", ""]
            line.append(f"{row['paper']}, {row['table']}")
            body.append(line)
    return header, body


def search_table(runs: list[dict], results: dict | None) -> tuple[list[str], list[list[str]]]:
    """The trials of a search sorted by final mIoU, best first; a trial that failed or did not
    finish has no score (the Optuna sweeper counted it as a failure) and comes last.
    ``results``: the sweeper's ``optimization_results.yaml`` (best_params, best_value)."""
    keys = sorted({k for r in runs for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1] or keys

    def score(run: dict) -> float | None:
        return (run["metrics"] or {}).get("miou") if run["status"] == "ok" else None

    ranked = sorted(runs, key=lambda r: (score(r) is None, -(score(r) or 0.0), r["run"]))
    best = {k: _norm(v) for k, v in ((results or {}).get("best_params") or {}).items()}
    header = ["rank", "run", *varying, "status", "mIoU", "sweeper's best"]
    body = []
    for rank, run in enumerate(ranked, 1):
        value = score(run)
        body.append([str(rank) if value is not None else "-", run["run"],
                     *(run["overrides"].get(k, "") for k in varying), run["status"],
                     "n/a" if value is None else _pct(100.0 * value),
                     "yes" if best and all(_norm(run["overrides"].get(k)) == v
                                           for k, v in best.items()) else ""])
    return header, body


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([header, *rows])
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the multirun folder of one sweep")
    parser.add_argument("--paper-dir", type=Path, default=PAPER_DIR,
                        help="folder of <experiment>.yml paper files (default: %(default)s)")
    parser.add_argument("--trials", action="store_true",
                        help="a hyper-parameter search: trials sorted by score (the default "
                             "when the sweep holds optimization_results.yaml)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        raise SystemExit(f"sweep folder not found: {args.sweep}")
    results = _read_yaml(args.sweep / "optimization_results.yaml")
    if args.trials or results is not None:
        header, rows = search_table(collect(args.sweep), results)
    else:
        header, rows = table(collect(args.sweep), args.paper_dir)
    text = markdown(header, rows)
    (args.sweep / "ablation_table.md").write_text(text + "\n")
    (args.sweep / "ablation_table.csv").write_text(csv_text(header, rows))
    print(text)
    print(f"\nwritten: {args.sweep / 'ablation_table.md'}, {args.sweep / 'ablation_table.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
