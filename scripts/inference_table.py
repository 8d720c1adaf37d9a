"""The inference ablation of one trained run, with the change the DeepLab papers report for
each step beside ours: output stride 16 vs 8, + multi-scale inputs, + flipping, + dense CRF.

First evaluate the run once per setting (each writes ``<run>/eval_<name>.json``), e.g. for the
CamVid DeepLab v3+ run, which predicts at half resolution (scales relative to the frame):

    R=outputs/<run>
    python -m segtrain.evaluate run=$R eval=whole
    python -m segtrain.evaluate run=$R eval=whole eval.output_stride=8
    python -m segtrain.evaluate run=$R eval=msc 'eval.predictor.scales=[0.25,0.375,0.5]'
    python -m segtrain.evaluate run=$R eval=msc_flip 'eval.predictor.scales=[0.25,0.375,0.5]'
    python -m segtrain.evaluate run=$R eval=msc_crf 'eval.predictor.scales=[0.25,0.375,0.5]'
    python scripts/crf_search.py run=$R --num-images 50 ...     # then, with its best values:
    python -m segtrain.evaluate run=$R eval=msc_crf name=msc_crf_searched \\
        'eval.predictor.scales=[0.25,0.375,0.5]' eval.crf.bi_w=... eval.crf.bi_xy_std=... ...
    python scripts/inference_table.py $R

Each evaluation is placed by what its saved eval config does (output stride, several scales,
flip, CRF), not by its file name; lines are ordered OS 16 before 8, then + MS, + flip, + CRF.
"vs" is ours minus the line it adds one step to (OS 8 -> the same inference at OS 16; + MS ->
single scale; + flip -> MS; + CRF -> the same without CRF). "papers" lists, for the same step,
every pair of rows of the DeepLab paper files (``--papers``) that differ in that step only:
their difference, the file and the tables. The table is printed and written to
``<run>/inference_table.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

PAPER_DIR = Path(__file__).resolve().parents[1] / "conf" / "experiment" / "paper"
PAPERS = ["deeplabv1_voc", "deeplabv2_aspp_ablation", "deeplabv3_voc", "deeplabv3plus_voc"]
EVAL_KEYS = ("eval", "eval.")


def _os(value) -> int | None:
    return None if value in (None, "null", "None") else int(value)


def inference(eval_config: dict, train_os: int | None) -> dict:
    """(output stride, msc, flip, crf) of one saved eval config."""
    predictor = eval_config.get("predictor") or {}
    output_stride = _os(eval_config.get("output_stride"))
    return {"os": output_stride if output_stride is not None else train_os,
            "msc": len(predictor.get("scales") or [1.0]) > 1,
            "flip": bool(predictor.get("flip")), "crf": bool(eval_config.get("crf"))}


def parent(setting: dict) -> tuple[str, dict] | None:
    """The step this setting adds and the setting it adds it to; None for the base."""
    if setting["crf"]:
        return "+ CRF", {**setting, "crf": False}
    if setting["flip"]:
        return "+ flip", {**setting, "flip": False}
    if setting["msc"]:
        return "+ MS", {**setting, "msc": False}
    if setting["os"] == 8:
        return "OS 16 -> 8", {**setting, "os": 16}
    return None


def label(setting: dict) -> str:
    parts = [f"OS {setting['os']}" if setting["os"] else "OS as trained"]
    parts += [name for name, on in (("MS", setting["msc"]), ("flip", setting["flip"]),
                                    ("CRF", setting["crf"])) if on]
    return " + ".join(parts)


def collect(run: Path) -> list[dict]:
    """Every ``eval_*.json`` of the run, with its inference setting."""
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text()) \
        if (run / ".hydra" / "config.yaml").is_file() else {}
    train_os = _os((config.get("model") or {}).get("output_stride"))
    lines = []
    for path in sorted(run.glob("eval_*.json")):
        result = json.loads(path.read_text())
        if "eval_config" not in result or "miou" not in result:
            continue
        lines.append({"name": result.get("name", path.stem[5:]), "miou": 100 * result["miou"],
                      "setting": inference(result["eval_config"], train_os),
                      "num_images": result.get("num_images"), "split": result.get("split")})
    if not lines:
        raise SystemExit(f"{run}: no eval_*.json; run python -m segtrain.evaluate run={run} "
                         f"eval=... first (see this script's docstring)")
    lines.sort(key=lambda e: (-(e["setting"]["os"] or 0), e["setting"]["msc"],
                              e["setting"]["crf"], e["setting"]["flip"], e["name"]))
    return lines


def _row_setting(row: dict) -> dict:
    over = row.get("overrides") or {}
    output_stride = over.get("eval.output_stride", over.get("model.output_stride"))
    return {"os": _os(output_stride) or 16, "msc": bool(row.get("msc")),
            "flip": bool(row.get("flip")), "crf": bool(row.get("crf"))}


def paper_steps(paper_dir: Path, papers: list[str]) -> dict[str, list[str]]:
    """step -> ``"+1.30 (deeplabv3_voc: OS 16 -> OS 8; Table 6)"`` for each pair of rows of one
    paper file that differ in that step only (same training overrides, same metric)."""
    steps: dict[str, list[str]] = {}
    for name in papers:
        path = paper_dir / f"{name}.yml"
        rows = (yaml.safe_load(path.read_text()) or {}).get("rows") or [] if path.is_file() \
            else []
        for b in rows:
            step = parent(_row_setting(b))
            if step is None:
                continue
            train = {k: v for k, v in (b.get("overrides") or {}).items()
                     if not k.startswith(EVAL_KEYS)}
            for a in rows:
                a_train = {k: v for k, v in (a.get("overrides") or {}).items()
                           if not k.startswith(EVAL_KEYS)}
                if a is b or a_train != train or a["metric"] != b["metric"] \
                        or a["metric"] != "miou" or _row_setting(a) != step[1]:
                    continue
                diff = float(b["value"]) - float(a["value"])
                steps.setdefault(step[0], []).append(
                    f"{diff:+.2f} ({name}: {a.get('name', '')} -> {b.get('name', '')}; "
                    f"{b['table']})")
    return steps


def table(lines: list[dict], steps: dict[str, list[str]]) -> str:
    out = ["| setting | eval file | mIoU | step | vs | papers, same step |",
           "|---|---|---:|---|---:|---|"]
    for line in lines:
        step = parent(line["setting"])
        base = [o for o in lines if step and o["setting"] == step[1]]
        vs = f"{line['miou'] - base[0]['miou']:+.2f}" if base else ""
        papers = "<br>".join(steps.get(step[0], [])) if step else ""
        out.append(f"| {label(line['setting'])} | eval_{line['name']}.json | "
                   f"{line['miou']:.2f} | {step[0] if step else 'base'} | {vs} | {papers} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run folder with eval_*.json files")
    parser.add_argument("--paper-dir", type=Path, default=PAPER_DIR)
    parser.add_argument("--papers", nargs="+", default=PAPERS,
                        help="paper files whose rows give the papers' steps (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        raise SystemExit(f"run folder not found: {args.run}")
    lines = collect(args.run)
    text = table(lines, paper_steps(args.paper_dir, args.papers))
    images = {(line["split"], line["num_images"]) for line in lines}
    text += "\n\n" + "; ".join(f"{n} {split} images" for split, n in sorted(images, key=str))
    (args.run / "inference_table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
