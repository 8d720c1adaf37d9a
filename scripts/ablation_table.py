"""Turn a Hydra sweep folder into the paper's table: ours, the paper's and the difference.

    python scripts/ablation_table.py outputs/multirun/<date>/<time>
    python scripts/ablation_table.py outputs/multirun/<sweep> --columns eval  # before/after CRF

Each run folder of the sweep holds ``.hydra/overrides.yaml`` (and ``.hydra/hydra.yaml``),
``.hydra/config.yaml`` and, once it has evaluated, ``metrics.json``. The experiment a run
belongs to (``experiment=<name>``) names the paper file
``conf/experiment/paper/<name>.yml``; its rows say which settings identify them
(``{lr: poly}`` -> 63.42). A row goes to the run whose setting has every key of the row's
overrides at the row's value, the most specific row winning. A run's setting of a key is the
override it was given, else its config group choice (``lr``, ``eval``, ``paper_row``), else
the value in its resolved config. Each ``eval_<name>.json`` that ``segtrain.evaluate`` wrote
into a run is one more line, whose setting is the run's with that evaluation's ``eval``
config (``eval=msc_flip``, ``eval.output_stride=8`` ...).

Lines are in the paper's order (the order of its rows); runs no row matches come last. Per
line: the keys that vary across the sweep, the status, then for mIoU (and each other metric
the paper reports) ours, the paper's and ours minus the paper's, in percent. Paper rows no run
matched are listed as ``not run``. ``--columns KEY`` puts each value of KEY side by side
(``--columns eval``: whole | crf_v1, the papers' before/after CRF columns).

A sweep over ``seed`` is aggregated: one line per setting with the mean, the sample standard
deviation and the count of its finished runs, and the difference to the paper as
``mean - paper +- std``; below the table, settings that differ in one key are compared
(difference of means +- its standard error, sqrt(s1^2/n1 + s2^2/n2)).

Beside each difference, its 95% interval (``diff mIoU 95% CI``, and at the end of each
comparison line): where the runs have per-image counts (``eval.save_per_image=true``:
``per_image.npz``, ``eval_<name>_per_image.npz``), scripts/compare_runs.py's bootstrap over
the validation images (paired between two settings; the seeds resampled too where there are
several); else, with 2 or more seeds, Student's t from the seeds (Welch's t for a difference
of two settings); else none. The source is named beside it. A sweep whose runs have per-image
counts gets the comparison lines without a seed sweep too.

Status: ``failed`` when a run has no metrics.json; ``pruned`` when a search's pruner ended
it (metrics.json ``"status": "pruned"``, ``hydra.sweeper.pruner``), with its last evaluation's
mIoU; ``unfinished`` when its metrics.json says ``"finished": false`` or
``"interrupted": true``, or its last evaluation is before ``trainer.max_iters``; ``ok``
otherwise.

The table is printed as Markdown and written to ``<sweep>/ablation_table.md`` and
``<sweep>/ablation_table.csv``.

A hyper-parameter search (``hydra/sweeper=optuna_miou``; its sweep folder holds the
sweeper's ``optimization_results.yaml``, or pass ``--trials``) is shown as its trials
instead: best score first, then the trials its pruner stopped (with the mIoU they had then),
failed and unfinished trials last, without a score.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from pathlib import Path

import compare_runs  # scripts/: the paired image bootstrap
import scipy.stats
import yaml

from segtrain.errors import UserError
from segtrain.eval.metrics import SUMMARY_METRICS, percent

PAPER_DIR = Path(__file__).resolve().parents[1] / "conf" / "experiment" / "paper"
SEED = "seed"
LEVEL, RESAMPLES = 0.95, 10000  # the intervals' level; the bootstrap's resamples


def _norm(value) -> str:
    """Settings compare as text without spaces: ``[256, 512]`` == ``[256,512]``."""
    if isinstance(value, bool):
        value = str(value).lower()
    if value is None:  # a config's None is the command line's null
        value = "null"
    return str(value).replace(" ", "")


def _key(key: str) -> str:
    """``+paper_row`` / ``~x`` / ``++y`` name the keys ``paper_row``, ``x``, ``y``."""
    return key.lstrip("+~")


def _read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def run_status(metrics: dict | None, max_iters: int | None) -> str:
    if metrics is None:
        return "failed (no metrics.json)"
    iteration = metrics.get("iteration")
    if metrics.get("status") == "pruned":  # segtrain.sweeper: not a final score
        then = "" if metrics.get("miou") is None else f", mIoU then {percent(metrics['miou'])}"
        return f"pruned (iteration {iteration} of {max_iters}{then})"
    if metrics.get("finished") is False or metrics.get("interrupted"):
        return f"unfinished (iteration {iteration} of {max_iters})"
    if max_iters is not None and iteration is not None and iteration < max_iters:
        return f"unfinished (iteration {iteration} of {max_iters})"
    return "ok"


_MISSING = object()


def setting(run: dict, key: str):
    """The run's value of ``key``: its override, its group choice, else its config's."""
    if key in run["overrides"]:
        return run["overrides"][key]
    if key in run["choices"]:
        return run["choices"][key]
    node = run["config"]
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _evaluations(run: dict, run_dir: Path, sweep: Path) -> list[dict]:
    """One line per ``eval_<name>.json`` of segtrain.evaluate in the run folder."""
    lines = []
    for path in sorted(run_dir.glob("eval_*.json")):
        result = json.loads(path.read_text())
        if "eval_config" not in result or "miou" not in result:
            continue
        overrides = {**run["overrides"], "eval": result.get("eval", path.stem[5:]),
                     **{_key(k): v for k, v in (result.get("overrides") or {}).items()}}
        lines.append({**run, "run": str(path.relative_to(sweep).with_suffix("")),
                      "overrides": overrides,
                      "choices": {**run["choices"], "eval": result.get("eval")},
                      "config": {**run["config"], "eval": result["eval_config"]},
                      "metrics": result, "status": "ok (segtrain.evaluate)",
                      "eval_name": path.stem[5:]})
    return lines


def collect(sweep: Path) -> list[dict]:
    """One dict per run folder and per evaluation in it: name, overrides, choices, config,
    experiment, metrics (or None), status."""
    runs = []
    # recursive: an override with a path (dataset.root=/data/VOC) nests Hydra's subdir name;
    # folders inside a run (segtrain.evaluate's eval/<...>/.hydra) are not runs of the sweep
    found = sorted(f.parent.parent for f in sweep.glob("**/.hydra/overrides.yaml"))
    run_dirs = [r for r in found if not any(o != r and o in r.parents for o in found)]
    for run_dir in run_dirs:
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = dict(o.split("=", 1) for o in _read_yaml(overrides_file) or [] if "=" in o)
        # optuna_trial: the number a search gave the trial, which is its folder's name
        overrides = {_key(k): v for k, v in overrides.items()
                     if not k.startswith("hydra.") and k != "optuna_trial"}
        hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
        choices = hydra_cfg.get("hydra", {}).get("runtime", {}).get("choices", {}) or {}
        choices = {k: v for k, v in choices.items() if not k.startswith("hydra/")}
        experiment = overrides.get("experiment") or choices.get("experiment")
        config = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
        max_iters = config.get("trainer", {}).get("max_iters")
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        run = {"run": str(run_dir.relative_to(sweep)), "overrides": overrides,
               "choices": choices, "config": config, "experiment": experiment,
               "metrics": metrics, "status": run_status(metrics, max_iters),
               "run_dir": run_dir, "eval_name": None}
        runs.append(run)
        runs += _evaluations(run, run_dir, sweep)
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
        row["overrides"] = {_key(k): _norm(v) for k, v in (row.get("overrides") or {}).items()}
    return rows


def match(run: dict, rows: list[dict]) -> list[dict]:
    """The paper rows of ``run``: all rows with the most specific matching override set."""
    def fits(row: dict) -> bool:
        return all((v := setting(run, k)) is not _MISSING and _norm(v) == want
                   for k, want in row["overrides"].items())

    hits = [r for r in rows if fits(r)]
    if not hits:
        return []
    best = max(len(r["overrides"]) for r in hits)
    return [r for r in hits if len(r["overrides"]) == best]


def _pct(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _finished(runs: list[dict], metric: str) -> list[dict]:
    return [r for r in runs if r["status"].startswith("ok")
            and r["metrics"].get(metric) is not None]


def image_counts(runs: list[dict]) -> dict | None:
    """The per-image counts (``eval.save_per_image``) of ``runs`` as scripts/compare_runs.py
    loads a side, or None when one lacks them or they scored other images."""
    if not runs or any(not compare_runs.per_image_file(r["run_dir"], r["eval_name"]).is_file()
                       for r in runs):
        return None
    names = {r["eval_name"] for r in runs}
    if len(names) > 1:
        return None
    try:
        return compare_runs.load_side([r["run_dir"] for r in runs], names.pop())
    except UserError:
        return None


def interval(runs: list[dict], metric: str) -> tuple[float, float, str] | None:
    """The 95% interval of the mean of ``metric`` over the finished ``runs``, in percent, and
    where it comes from: for mIoU with per-image counts, scripts/compare_runs.py's bootstrap
    over the images (and the seeds, when there are several); else, with 2 or more seeds,
    Student's t from their spread; else None."""
    done = _finished(runs, metric)
    counts = image_counts(done) if metric == "miou" else None
    if counts is not None:
        result = compare_runs.miou_interval(counts["counts"], RESAMPLES, LEVEL)
        source = "images" if len(done) == 1 else "seeds + images"
        return 100 * result["low"], 100 * result["high"], source
    if len(done) < 2:
        return None
    values = [100.0 * r["metrics"][metric] for r in done]
    half = scipy.stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1) * \
        statistics.stdev(values) / math.sqrt(len(values))
    mean = statistics.fmean(values)
    return mean - half, mean + half, "seeds"


def difference_interval(a: list[dict], b: list[dict], metric: str
                        ) -> tuple[float, float, str] | None:
    """The 95% interval of mean(a) - mean(b) of ``metric`` in percent, and its source: for
    mIoU with per-image counts on both sides (the same images), scripts/compare_runs.py's
    paired bootstrap (images, and seeds when there are several); else, with 2 or more seeds
    on each side, Welch's t (Welch-Satterthwaite degrees of freedom); else None."""
    done_a, done_b = _finished(a, metric), _finished(b, metric)
    side_a = image_counts(done_a) if metric == "miou" else None
    side_b = image_counts(done_b) if side_a is not None else None
    if side_b is not None and side_a["ids"] == side_b["ids"] and \
            side_a["class_names"] == side_b["class_names"]:
        result = compare_runs.bootstrap(side_a["counts"], side_b["counts"], RESAMPLES, LEVEL)
        source = "paired bootstrap over images" + (
            " and seeds" if max(len(done_a), len(done_b)) > 1 else "")
        return 100 * result["low"], 100 * result["high"], source
    if len(done_a) < 2 or len(done_b) < 2:
        return None
    va = [100.0 * r["metrics"][metric] for r in done_a]
    vb = [100.0 * r["metrics"][metric] for r in done_b]
    qa, qb = statistics.variance(va) / len(va), statistics.variance(vb) / len(vb)
    if qa + qb == 0:
        return None
    df = (qa + qb) ** 2 / (qa ** 2 / (len(va) - 1) + qb ** 2 / (len(vb) - 1))
    half = scipy.stats.t.ppf(0.5 + LEVEL / 2, df) * math.sqrt(qa + qb)
    diff = statistics.fmean(va) - statistics.fmean(vb)
    return diff - half, diff + half, "Welch t over seeds"


def _ci(bounds: tuple[float, float, str] | None, minus: float = 0.0) -> str:
    if bounds is None:
        return ""
    low, high, source = bounds
    return f"[{low - minus:+.2f}, {high - minus:+.2f}] ({source})"


def _ours(runs: list[dict], metric: str) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None, count) of ``metric`` in percent over finished runs."""
    values = [100.0 * r["metrics"][metric] for r in runs
              if r["status"].startswith("ok") and r["metrics"].get(metric) is not None]
    if not values:
        return None, None, 0
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std, len(values)


def group_by_setting(runs: list[dict], keys: list[str]) -> list[list[dict]]:
    """Runs that agree on ``keys`` (every varying key but the seed), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(_norm(run["overrides"].get(k, "")) for k in keys), []).append(run)
    return list(groups.values())


def _status(runs: list[dict]) -> str:
    if len(runs) == 1:
        return runs[0]["status"]
    ok = sum(r["status"].startswith("ok") for r in runs)
    return f"ok {ok} of {len(runs)}" if ok < len(runs) else "ok"


def _cells(runs: list[dict], rows: list[dict], metric: str, aggregate: bool) -> list[str]:
    mean, std, n = _ours(runs, metric)
    paper = next((float(r["value"]) for r in rows if r["metric"] == metric), None)
    ci = "" if mean is None or paper is None else _ci(interval(runs, metric), paper)
    if aggregate:
        ours = "n/a" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
        diff = "" if mean is None or paper is None else (
            f"{mean - paper:+.2f}" + ("" if std is None else f" ± {std:.2f}"))
        return [ours, str(n), _pct(paper), diff, ci]
    return ["n/a" if mean is None else _pct(mean), _pct(paper),
            "" if mean is None or paper is None else f"{mean - paper:+.2f}", ci]


def _metric_header(metric: str, aggregate: bool, prefix: str = "") -> list[str]:
    name = SUMMARY_METRICS.get(metric, metric)
    ci = f"diff {name} {100 * LEVEL:g}% CI"
    if aggregate:
        cols = [f"{name} (mean ± std)", f"{name} n", f"paper {name}", f"diff {name}", ci]
    else:
        cols = [name, f"paper {name}", f"diff {name}", ci]
    return [prefix + c for c in cols]


def table(runs: list[dict], paper_dir: Path = PAPER_DIR,
          columns: str | None = None) -> tuple[list[str], list[list[str]]]:
    """The header and lines of the sweep's table (see the module docstring)."""
    papers = {r["experiment"]: load_paper(r["experiment"], paper_dir) for r in runs}
    keys = sorted({k for r in runs for k in r["overrides"]})
    varying = [k for k in keys if len({_norm(r["overrides"].get(k)) for r in runs}) > 1] or keys
    aggregate = SEED in varying
    label_keys = [k for k in varying if k != SEED and k != columns]
    groups = group_by_setting(runs, label_keys) if aggregate else [[r] for r in runs]
    if columns:  # one line per setting of the other keys, a column group per value of KEY
        lines: dict[tuple, list[list[dict]]] = {}
        for g in groups:
            lines.setdefault(tuple(_norm(g[0]["overrides"].get(k, "")) for k in label_keys),
                             []).append(g)
        line_groups = list(lines.values())
        values = list(dict.fromkeys(_norm(g[0]["overrides"].get(columns, "")) for g in groups))
    else:
        line_groups = [[g] for g in groups]
        values = [None]
    matched = {id(g): match(g[0], papers[g[0]["experiment"]]) for g in groups}
    metrics = ["miou"] + sorted({row["metric"] for rows in matched.values() for row in rows}
                                - {"miou"})

    def order(line: list[list[dict]]) -> tuple[int, int]:
        idx = [papers[g[0]["experiment"]].index(r) for g in line for r in matched[id(g)]]
        return (min(idx), 0) if idx else (1 << 30, 0)

    line_groups.sort(key=order)  # stable: unmatched runs keep the sweep's order
    first = "setting" if aggregate or columns else "run"
    header = [first, *label_keys, "status"]
    for value in values:
        prefix = f"{columns}={value}: " if columns else ""
        for m in metrics:
            header += _metric_header(m, aggregate, prefix)
    header.append("paper source")

    body = []
    for line in line_groups:
        first_run = line[0][0]
        name = ", ".join(f"{k}={first_run['overrides'].get(k, '')}" for k in label_keys) \
            if (aggregate or columns) else first_run["run"]
        out = [name or "(plain)", *(first_run["overrides"].get(k, "") for k in label_keys),
               "; ".join(_status(g) for g in line)]
        by_value = {_norm(g[0]["overrides"].get(columns, "")) if columns else None: g
                    for g in line}
        for value in values:
            g = by_value.get(value)
            for m in metrics:
                width = 5 if aggregate else 4
                out += _cells(g, matched[id(g)], m, aggregate) if g else [""] * width
        sources = {f"{r['paper']}, {r['table']}" for g in line for r in matched[id(g)]}
        out.append("; ".join(sorted(sources)))
        body.append(out)

    # paper rows that no run of the sweep reproduces, in the paper's order
    used = {id(r) for rs in matched.values() for r in rs}
    width = (5 if aggregate else 4) * len(metrics) * len(values)
    for experiment, rows in papers.items():
        for row in rows:
            if id(row) in used:
                continue
            label = row.get("name") or ", ".join(
                f"{k}={v}" for k, v in row["overrides"].items()) or experiment
            cells = [""] * width
            cells[metrics.index(row["metric"]) * (5 if aggregate else 4)
                  + (2 if aggregate else 1)] = _pct(float(row["value"]))
            body.append([label, *("" for _ in label_keys), "not run", *cells,
                         f"{row['paper']}, {row['table']}"])
            used.add(id(row))
    return header, body


def contrasts(runs: list[dict], metric: str = "miou") -> list[str]:
    """Settings of a seed sweep that differ in one key: difference of means +- its s.e."""
    keys = sorted({k for r in runs for k in r["overrides"]})
    label_keys = [k for k in keys if k != SEED
                  and len({_norm(r["overrides"].get(k)) for r in runs}) > 1]
    groups = group_by_setting(runs, label_keys)
    lines = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            differ = [k for k in label_keys
                      if _norm(a[0]["overrides"].get(k)) != _norm(b[0]["overrides"].get(k))]
            if len(differ) != 1:
                continue
            (ma, sa, na), (mb, sb, nb) = _ours(a, metric), _ours(b, metric)
            if ma is None or mb is None:
                continue
            k = differ[0]
            same = ", ".join(f"{o}={a[0]['overrides'].get(o)}" for o in label_keys if o != k)
            spread = (f" ± {math.sqrt(sa ** 2 / na + sb ** 2 / nb):.2f} (standard error)"
                      if sa is not None and sb is not None else " (one run each: no spread)")
            bounds = difference_interval(a, b, metric)
            ci = "" if bounds is None else f", {100 * LEVEL:g}% CI {_ci(bounds)}"
            lines.append(f"{SUMMARY_METRICS.get(metric, metric)}: {k}={a[0]['overrides'][k]} minus "
                         f"{k}={b[0]['overrides'][k]}" + (f" at {same}" if same else "")
                         + f" = {ma - mb:+.2f}{spread}, n = {na} and {nb}{ci}")
    return lines


def search_table(runs: list[dict], results: dict | None) -> tuple[list[str], list[list[str]]]:
    """The trials of a search sorted by final mIoU, best first; a trial that the pruner
    stopped, failed or did not finish has no final score (the sweeper counted it as pruned or
    failed) and comes after them, pruned trials first.
    ``results``: the sweeper's ``optimization_results.yaml`` (best_params, best_value)."""
    keys = sorted({k for r in runs for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1] or keys

    def score(run: dict) -> float | None:
        return (run["metrics"] or {}).get("miou") if run["status"] == "ok" else None

    def order(run: dict) -> tuple:
        pruned = run["status"].startswith("pruned")
        return (score(run) is None, not pruned, -(score(run) or 0.0), run["run"])

    ranked = sorted(runs, key=order)
    best = {k: _norm(v) for k, v in ((results or {}).get("best_params") or {}).items()}
    best_trial = (results or {}).get("best_trial")  # segtrain's sweeper: the trial's folder

    def is_best(run: dict) -> bool:
        if best_trial is not None:
            return run["run"] == str(best_trial)
        return bool(best) and all(_norm(run["overrides"].get(k)) == v for k, v in best.items())
    header = ["rank", "run", *varying, "status", "mIoU", "sweeper's best"]
    body = []
    for rank, run in enumerate(ranked, 1):
        value = score(run)
        body.append([str(rank) if value is not None else "-", run["run"],
                     *(run["overrides"].get(k, "") for k in varying), run["status"],
                     "n/a" if value is None else _pct(100.0 * value),
                     "yes" if is_best(run) else ""])
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
    parser.add_argument("--columns", metavar="KEY",
                        help="a key whose values become column groups (e.g. eval: before/after "
                             "CRF)")
    parser.add_argument("--trials", action="store_true",
                        help="a hyper-parameter search: trials sorted by score (the default "
                             "when the sweep holds optimization_results.yaml)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        raise SystemExit(f"sweep folder not found: {args.sweep}")
    runs = collect(args.sweep)
    results = _read_yaml(args.sweep / "optimization_results.yaml")
    if args.trials or results is not None:
        header, rows = search_table(runs, results)
    else:
        header, rows = table(runs, args.paper_dir, args.columns)
    text = markdown(header, rows)
    seeds = any(_norm(r["overrides"].get(SEED)) != _norm(runs[0]["overrides"].get(SEED))
                for r in runs)
    if not (args.trials or results is not None) and (seeds or any(
            compare_runs.per_image_file(r["run_dir"], r["eval_name"]).is_file() for r in runs)):
        text += "\n\n" + "\n".join(f"- {line}" for line in contrasts(runs))
    (args.sweep / "ablation_table.md").write_text(text + "\n")
    (args.sweep / "ablation_table.csv").write_text(csv_text(header, rows))
    print(text)
    print(f"\nwritten: {args.sweep / 'ablation_table.md'}, {args.sweep / 'ablation_table.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
