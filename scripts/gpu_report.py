"""docs/gpu.md from one run of ``scripts/gpu_check.sh``: machine, versions, tests, timings.

    python scripts/gpu_report.py --junit junit.xml --facts facts.jsonl --bench bench.json \\
        --tests-rc 0 --bench-rc 0 --tests-seconds 180 --bench-seconds 150 --out docs/gpu.md

Inputs, each optional (a missing one becomes a line saying so):
- ``--junit``: pytest's JUnit XML of ``make test-gpu`` (outcome and seconds per test).
- ``--facts``: JSON lines the CUDA tests append (``tests/test_gpu.py``, ``record``): one
  ``{"name", "value", "unit", "note"}`` per measured fact (compile time, peak memory, ...).
- ``--bench``: ``scripts/bench.py --json`` (section 5: DeepLab v3 ResNet-101 fp32 / bf16 /
  fp16 and the zoo at its papers' crops).
The machine (GPU, driver, torch, CUDA, cuDNN, NCCL, commit) is read here, at writing time.
``render`` is a pure function of these inputs, so the page's layout is tested on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME_BUDGET_S = 480  # the bound for the whole check on one H100


# -- reading the inputs ---------------------------------------------------------------------
def read_junit(path: Path | None) -> list[dict] | None:
    """One ``{"test", "outcome", "seconds", "message"}`` per test case; None if absent."""
    if path is None or not path.is_file():
        return None
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (node.get("message") or node.text or "").strip()
                break
        module = case.get("classname", "").rsplit(".", 1)[-1]
        cases.append({"test": f"{module}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})
    return cases


def read_facts(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_bench(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("cuda")


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def machine_info() -> dict:
    """The machine and software versions, as this process sees them."""
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "commit": _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
            "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
            "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a build without NCCL
            info["nccl"] = None
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_gib": p.total_memory / 2**30,
                                 "capability": f"{p.major}.{p.minor}"})
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["driver"] = smi.splitlines()[0].strip() if smi else None
    return info


# -- the page -------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]


def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _status(rc: int | None) -> str:
    if rc is None:
        return "not run"
    if rc in (124, 137):
        return f"exit status {rc}: stopped by its time limit"
    return f"exit status {rc}"


def _machine_section(m: dict) -> list[str]:
    gpus = m.get("gpus") or []
    if gpus:
        first = gpus[0]
        gpu = (f"{first['name']} x {len(gpus)}, {first['memory_gib']:.1f} GiB, "
               f"compute capability {first['capability']}")
    else:
        gpu = "none visible to torch"
    rows = [["GPU", gpu], ["driver", m.get("driver") or "unknown"],
            ["torch", f"{m['torch']} (CUDA {m.get('cuda') or '-'}, cuDNN "
                      f"{m.get('cudnn') or '-'}, NCCL {m.get('nccl') or '-'})"],
            ["Python", m["python"]], ["CPU cores", str(m["cpus"])],
            ["platform", m["platform"]],
            ["segtrain", f"commit {m['commit']}" + (" with local changes" if m["dirty"] else "")]]
    return ["## Machine", ""] + _table(["", ""], rows)


def _tests_section(cases: list[dict] | None, facts: list[dict], rc: int | None,
                   seconds: float | None) -> list[str]:
    lines = ["## make test-gpu", ""]
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    if cases is None:
        lines.append(f"No test report: make test-gpu ended with {_status(rc)}{took} before "
                     f"pytest wrote it.")
    else:
        counts = {label: sum(c["outcome"] == k for c in cases) for k, label in
                  (("passed", "passed"), ("failed", "failed"), ("error", "errors"),
                   ("skipped", "skipped"))}
        lines.append(f"{_status(rc)}{took}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                     + ".")
        lines.append("")
        lines += _table(["test", "result", "s", "message"],
                        [[c["test"], c["outcome"], f"{c['seconds']:.1f}",
                          c["message"].splitlines()[0][:160] if c["message"] else ""]
                         for c in cases])
    if facts:
        lines += ["", "Measured by the tests:", ""]
        lines += _table(["what", "value", "note"],
                        [[f["name"], f"{f['value']} {f.get('unit', '')}".strip(),
                          f.get("note", "")] for f in facts])
    return lines


def _bench_section(bench: dict | None, rc: int | None, seconds: float | None) -> list[str]:
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    head = ["## scripts/bench.py, section 5", ""]
    if bench is None:
        return head + [f"No results: the bench ended with {_status(rc)}{took}."]
    env = bench["environment"]
    lines = head + [f"{_status(rc)}{took}. Device {env['device']}; TF32 for convolutions "
                    f"{'on' if env['cudnn_allow_tf32'] else 'off'}, for matrix products "
                    f"{'on' if env['matmul_allow_tf32'] else 'off'}, cudnn.benchmark "
                    f"{'on' if env['cudnn_benchmark'] else 'off'}."
                    + (" Dry run on the CPU: not a timing." if bench.get("dry_run") else "")
                    + (" Partial: the bench stopped (time limit or error) after the rows "
                       "below." if bench.get("partial") else "")]
    v3 = bench.get("deeplabv3") or []
    if v3:
        size = "x".join(map(str, v3[0]["size"]))
        fp32 = v3[0]["img_s"]
        lines += ["", f"### DeepLab v3 ResNet-101, {size}, training", ""]
        lines += _table(
            ["precision", "batch", "img/s", "vs fp32", "peak memory GiB",
             "GFLOP per image and step", "peak TFLOP/s", "MFU"],
            [[r["precision"], str(r["batch"]), f"{r['img_s']:.1f}", f"{r['img_s'] / fp32:.2f}",
              _num(r["peak_memory_gib"], ".1f"), f"{r['step_gflop_per_image']:.0f}",
              _num(r["peak_tflops"], ".1f", "unknown"), _num(r["mfu"], ".1%", "n/a")]
             for r in v3])
        peak = env.get("peak_tflops")
        lines += ["", f"Steps: {v3[0]['steps']} per precision, the first {v3[0]['warmup']} "
                  f"untimed. FLOPs: one training step (forward + backward) counted by "
                  f"torch.utils.flop_counter.FlopCounterMode. MFU = img/s x FLOPs per image / "
                  f"dense peak; " + (f"peak of '{peak['pattern']}' from NVIDIA's data sheet "
                                     f"(scripts/bench.py PEAK_TFLOPS; fp32 = TF32)."
                                     if peak else "no peak known for this device.")]
    zoo = bench.get("zoo") or []
    if zoo:
        lines += ["", "### The zoo at its papers' crops, training", ""]
        lines += _table(
            ["experiment", "model", "backbone", "input", "batch", "precision", "img/s",
             "peak memory GiB", "note"],
            [[r["experiment"], r.get("model", "?"), r.get("backbone") or "-",
              "x".join(map(str, r.get("size", []))) or "?", str(r["batch"]), r["precision"],
              _num(r.get("img_s"), ".1f"), _num(r.get("peak_memory_gib"), ".1f"),
              r.get("error") or r.get("note", "")] for r in zoo])
    return lines


def render(machine: dict, cases: list[dict] | None, facts: list[dict], bench: dict | None,
           tests_rc: int | None, bench_rc: int | None, tests_seconds: float | None,
           bench_seconds: float | None, when: str) -> str:
    """The Markdown page."""
    total = sum(s for s in (tests_seconds, bench_seconds) if s is not None)
    lines = ["# segtrain on a GPU", "",
             f"Written by `scripts/gpu_check.sh` on {when}; rerun it instead of editing this "
             f"page. Total {total:.0f} s of a {TIME_BUDGET_S} s budget (each part runs under "
             f"`timeout`, the bench with fixed step counts).", ""]
    lines += _machine_section(machine) + [""]
    lines += _tests_section(cases, facts, tests_rc, tests_seconds) + [""]
    lines += _bench_section(bench, bench_rc, bench_seconds)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path)
    parser.add_argument("--facts", type=Path)
    parser.add_argument("--bench", type=Path)
    parser.add_argument("--tests-rc", type=int)
    parser.add_argument("--bench-rc", type=int)
    parser.add_argument("--tests-seconds", type=float)
    parser.add_argument("--bench-seconds", type=float)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "gpu.md")
    args = parser.parse_args(argv)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = render(machine_info(), read_junit(args.junit), read_facts(args.facts),
                  read_bench(args.bench), args.tests_rc, args.bench_rc, args.tests_seconds,
                  args.bench_seconds, when)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
