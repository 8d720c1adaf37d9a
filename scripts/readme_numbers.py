"""Re-measure the README's demo figures on the current code: run each demo command as a new
user would, then print wall time, mIoU and pixel accuracy as the Markdown the README shows.

    python scripts/readme_numbers.py                  # every demo (about 20 minutes on 2 cores)
    python scripts/readme_numbers.py --only default   # just `python -m segtrain`
    python scripts/readme_numbers.py --out-dir outputs/readme --keep

Each command runs in a fresh run folder (``trainer.resume=null``) with the config's own seed,
so the numbers are the ones a user gets from the same command; the wall time includes start-up
and the evaluations, as the user waits for them. The machine, its CPU count and the load
average before and after are printed, because on a shared machine the times depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from segtrain.eval.metrics import percent

REPO = Path(__file__).resolve().parents[1]
# name -> the overrides of the README's command (python -m segtrain <overrides>)
DEMOS = {
    "default": [],
    "deeplabv2_poly": ["model=deeplabv2", "lr=poly"],
    "deeplabv2_step": ["model=deeplabv2", "lr=step"],
}


def run_demo(overrides: list[str], run_dir: Path) -> dict:
    """Train once through the CLI; returns the command, wall seconds and final scores."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "segtrain", *overrides, "trainer.resume=null",
            f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    return {"command": " ".join(["python -m segtrain", *overrides]).strip(),
            "seconds": seconds, "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
            "iterations": metrics["iteration"], "trainer": config["trainer"],
            "image_size": config["dataset"].get("image_size")}


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def markdown(results: list[dict], load_before: float, load_after: float) -> str:
    first = results[0]
    t = first["trainer"]
    lines = [
        "| command | wall time | val mIoU (%) | pixel acc (%) |",
        "|---|---|---|---|",
        *(f"| `{r['command']}` | {minutes(r['seconds'])} | {percent(r['miou'])} | "
          f"{percent(r['pixel_acc'])} |" for r in results),
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} with "
        f"{os.cpu_count()} CPU cores (load average {load_before:.1f} before, "
        f"{load_after:.1f} after), precision {t['precision']}, {first['iterations']} iterations "
        f"of batch {t['global_batch_size'] or t['batch_size']}"
        + (f" at {first['image_size']}x{first['image_size']}" if first["image_size"] else "")
        + "; regenerate with `python scripts/readme_numbers.py`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(DEMOS), help="a subset of demos")
    parser.add_argument("--out-dir", type=Path, help="keep the run folders here")
    args = parser.parse_args(argv)
    names = args.only or list(DEMOS)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="readme_numbers_"))
    load_before = os.getloadavg()[0]
    results = []
    for name in names:
        run_dir = out_dir / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        result = run_demo(DEMOS[name], run_dir)
        print(f"{result['command']}: {minutes(result['seconds'])}, mIoU {percent(result['miou'])}",
              file=sys.stderr)
        results.append(result)
    print(markdown(results, load_before, os.getloadavg()[0]))
    if args.out_dir is None:
        shutil.rmtree(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
