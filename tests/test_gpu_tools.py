"""The GPU tooling, on the CPU: the ``cuda`` marker's selection and skip, the FLOP count the
bench's MFU rests on, the bench's CUDA section as a CPU dry run, the docs/gpu.md writer on
fabricated results, and scripts/gpu_check.sh on a machine without CUDA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import REPO, compose_config

sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402
import gpu_report  # noqa: E402
from benchmark_models import count_macs  # noqa: E402

NO_CUDA = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}


# -- the marker -------------------------------------------------------------------------------
def test_cuda_tests_are_left_out_of_make_test_and_skip_cleanly_without_cuda():
    def pytest_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q",
                               "-p", "no:cacheprovider", *args], cwd=REPO, env=NO_CUDA,
                              capture_output=True, text=True, timeout=240)

    # make test's selection (addopts in pyproject.toml): every test of the file deselected,
    # so every one carries the cuda marker
    default = pytest_run("--collect-only")
    deselected = re.search(r"(\d+) deselected", default.stdout)
    assert default.returncode == 5 and deselected, default.stdout  # 5: nothing collected
    n = int(deselected.group(1))
    assert n >= 12
    # make test-gpu's selection without CUDA: all skipped with the reason, exit status 0
    gpu = pytest_run("-m", "cuda", "-rs")
    assert gpu.returncode == 0, gpu.stdout + gpu.stderr
    assert re.search(rf"\b{n} skipped\b", gpu.stdout) and " passed" not in gpu.stdout, \
        gpu.stdout
    assert "needs a CUDA device" in gpu.stdout


# -- FLOPs ------------------------------------------------------------------------------------
def test_flop_counter_counts_a_training_step_as_the_closed_form():
    """FlopCounterMode, verified: 2 FLOPs per multiply-accumulate; the backward of a
    convolution computes the weight gradient (one forward's FLOPs) and the input gradient
    (another) except for the first layer, whose input needs no gradient."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    x = torch.randn(2, 3, 10, 12)
    macs1, macs2 = 2 * 10 * 12 * 8 * 3 * 9, 2 * 10 * 12 * 5 * 8
    counter = FlopCounterMode(display=False)
    with counter:
        net(x).sum().backward()
    forward = 2 * (macs1 + macs2)
    assert counter.get_total_flops() == forward + 2 * macs1 + 2 * (2 * macs2)


def test_step_flops_of_deeplabv3_agree_with_the_hook_count():
    """The bench's count (meta device, forward + loss + backward) against scripts/
    benchmark_models.py's forward hooks times 3: two independent counts of the same net."""
    cfg = compose_config(["model=deeplabv3", "dataset.image_size=128"])
    step = bench.train_step_flops(cfg, (128, 128))
    hooks = 3 * 2 * count_macs(bench.app.build_model(cfg), 128)
    assert 0.98 * hooks < step <= hooks  # below 3x: the stem's input gradient is not computed


@pytest.mark.parametrize("name, pattern, bf16", [
    ("NVIDIA H100 80GB HBM3", "H100", 989.5), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5), ("NVIDIA H200", "H200", 989.5),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0)])
def test_peak_tflops_by_device_name(name, pattern, bf16):
    key, peak = bench.peak_tflops(name)
    assert key == pattern and peak["bf16"] == bf16
    assert bench.peak_tflops("Tesla T4") is None


# -- the bench's CUDA section on the CPU -----------------------------------------------------
def _dry_run(tmp_path: Path, zoo: list[str]) -> Path:
    out = tmp_path / "bench.json"
    assert bench.main(["--skip", "train", "data", "eval", "knobs", "--cuda-dry-run",
                       "--zoo", *zoo, "--json", str(out)]) == 0
    return out


def test_bench_cuda_section_dry_run_on_the_cpu(tmp_path, monkeypatch, one_thread):
    """``--cuda-dry-run``: section 5's code on the CPU (ResNet-18 in place of ResNet-101 for
    the precision rows here, to keep it short; the slow test below runs it as it is)."""
    monkeypatch.setattr(bench, "PRECISION_MODEL", ["model=deeplabv3", "model.backbone=resnet18",
                                                   "model.multi_grid=null"])
    monkeypatch.setattr(bench, "peak_tflops", lambda name: ("test", {"fp32": 1.0, "bf16": 2.0,
                                                                     "fp16": 2.0}))
    out = _dry_run(tmp_path, ["camvid_deeplabv3plus_mobilenetv2", "segnet_basic_camvid"])
    cuda = json.loads(out.read_text())["cuda"]
    assert cuda["dry_run"] and cuda["environment"]["device"] == "cpu (dry run)"
    v3 = cuda["deeplabv3"]
    assert [r["precision"] for r in v3] == ["fp32", "bf16", "fp16"]
    for r in v3:
        assert r["size"] == [32, 32] and r["img_s"] > 0 and r["peak_memory_gib"] is None
        assert r["mfu"] == pytest.approx(
            r["img_s"] * r["step_gflop_per_image"] * 1e9 / (r["peak_tflops"] * 1e12))
    zoo = {r["experiment"]: r for r in cuda["zoo"]}
    assert "error" not in zoo["camvid_deeplabv3plus_mobilenetv2"], zoo
    assert zoo["camvid_deeplabv3plus_mobilenetv2"]["size"] == [32, 32]  # 180x240 / 8, >= 32
    assert zoo["segnet_basic_camvid"]["size"] == [45, 60]  # 360x480 / 8
    assert all(r["img_s"] > 0 for r in zoo.values())
    assert "5 cuda (dry run, CPU)" in json.loads(out.read_text())["table"]


def test_a_failing_zoo_model_is_a_row_and_rows_are_reported_as_they_come(tmp_path):
    plan = bench.CudaPlan(torch.device("cpu"), 32, 2, 3, 1, 1 / 8, 2, 3)
    seen = []
    rows = bench.zoo_throughput(plan, tmp_path, ["no_such_experiment"],
                                lambda so_far: seen.append(len(so_far)))
    assert seen == [1] and rows[0]["experiment"] == "no_such_experiment"
    assert "no_such_experiment" in rows[0]["error"] and "img_s" not in rows[0]


@pytest.mark.slow
def test_bench_cuda_section_dry_run_of_every_zoo_model(tmp_path, one_thread):
    """The flag as gpu_check.sh's bench runs it (DeepLab v3 ResNet-101, every experiment),
    at the dry run's sizes: no model fails to build or train at its (scaled) input."""
    cuda = json.loads(_dry_run(tmp_path, bench.zoo_experiments()).read_text())["cuda"]
    assert [r["precision"] for r in cuda["deeplabv3"]] == ["fp32", "bf16", "fp16"]
    failed = {r["experiment"]: r["error"] for r in cuda["zoo"] if "error" in r}
    assert not failed
    assert len(cuda["zoo"]) == len(bench.zoo_experiments())


def test_every_experiment_has_a_paper_input_size():
    sizes = {e: bench.zoo_config(e, 1.0)[1] for e in bench.zoo_experiments()}
    assert sizes["deeplabv3_voc"] == (513, 513) and sizes["pspnet_cityscapes"] == (713, 713)
    assert sizes["cpnet_cityscapes"] == (512, 512) and sizes["unet"] == (572, 572)
    assert sizes["fcn8s_voc"] == (375, 500) and bench.zoo_config("fcn8s_voc", 1 / 8)[1] == (47, 62)
    cfg, _, _ = bench.zoo_config("cpnet_cityscapes", 1.0)
    assert list(cfg.model.prior_size) == [64, 64]  # the paper's grid at its crop
    cfg, _, note = bench.zoo_config("deeplabv2_voc", 1.0)
    assert cfg.model.freeze_bn is False and "BatchNorm trained" in note


# -- docs/gpu.md ------------------------------------------------------------------------------
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_a[bf16]" time="3.5"/>
<testcase classname="tests.test_gpu" name="test_b" time="1.25">
<failure message="assert 1 &lt; 0">trace
more</failure></testcase>
<testcase classname="tests.test_gpu" name="test_two_gpus" time="0.0"><skipped
message="needs two GPUs"/></testcase></testsuite></testsuites>"""

BENCH = {"cuda": {
    "environment": {"device": "NVIDIA H100 80GB HBM3", "cudnn_allow_tf32": True,
                    "matmul_allow_tf32": False, "cudnn_benchmark": False,
                    "peak_tflops": {"pattern": "H100", "fp32": 494.5, "bf16": 989.5,
                                    "fp16": 989.5}},
    "dry_run": False,
    "deeplabv3": [{"precision": p, "size": [512, 512], "batch": 8, "steps": 20, "warmup": 3,
                   "img_s": rate, "peak_memory_gib": mem, "step_gflop_per_image": 402.0,
                   "peak_tflops": peak, "mfu": rate * 402e9 / (peak * 1e12)}
                  for p, rate, mem, peak in (("fp32", 100.0, 20.5, 494.5),
                                             ("bf16", 250.0, 11.0, 989.5),
                                             ("fp16", 240.0, 11.2, 989.5))],
    "zoo": [{"experiment": "pspnet_voc", "model": "PSPNet", "backbone": "resnet101",
             "size": [473, 473], "batch": 4, "precision": "bf16", "img_s": 61.0,
             "peak_memory_gib": 9.5},
            {"experiment": "hanet_cityscapes", "model": "HANet", "backbone": "resnet101",
             "size": [768, 768], "batch": 4, "precision": "bf16",
             "error": "OutOfMemoryError: CUDA out of memory"}]}}

MACHINE = {"torch": "2.5.1+cu124", "python": "3.11.9", "cpus": 16, "platform": "Linux-x86_64",
           "commit": "abc1234", "dirty": False, "cuda": "12.4", "cudnn": 90100,
           "nccl": "2.21.5", "driver": "550.54.15",
           "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "capability": "9.0"}]}


def test_report_renders_machine_tests_facts_and_bench_tables(tmp_path):
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    (tmp_path / "facts.jsonl").write_text(json.dumps(
        {"name": "compile time", "value": "41.2", "unit": "s", "note": "6 steps"}) + "\n")
    cases = gpu_report.read_junit(tmp_path / "junit.xml")
    assert [c["outcome"] for c in cases] == ["passed", "failed", "skipped"]
    page = gpu_report.render(MACHINE, cases, gpu_report.read_facts(tmp_path / "facts.jsonl"),
                             gpu_report.read_bench(tmp_path / "bench.json"), 1, 0, 200.0,
                             150.0, "2027-01-01 00:00 UTC")
    lines = page.splitlines()
    assert "| GPU | NVIDIA H100 80GB HBM3 x 1, 79.1 GiB, compute capability 9.0 |" in lines
    assert "| torch | 2.5.1+cu124 (CUDA 12.4, cuDNN 90100, NCCL 2.21.5) |" in lines
    assert "exit status 1 in 200 s: 1 passed, 1 failed, 0 errors, 1 skipped." in lines
    assert "| test_gpu::test_b | failed | 1.2 | assert 1 < 0 |" in lines
    assert "| compile time | 41.2 s | 6 steps |" in lines
    # MFU = 250 img/s x 402 GFLOP / 989.5 TFLOP/s = 10.2 %
    assert "| bf16 | 8 | 250.0 | 2.50 | 11.0 | 402 | 989.5 | 10.2% |" in lines
    assert "| pspnet_voc | PSPNet | resnet101 | 473x473 | 4 | bf16 | 61.0 | 9.5 |  |" in lines
    assert "| hanet_cityscapes | HANet | resnet101 | 768x768 | 4 | bf16 | - | - | " \
           "OutOfMemoryError: CUDA out of memory |" in lines
    assert "Total 350 s of a 480 s budget" in page


def test_report_says_what_is_missing_when_a_part_timed_out(tmp_path):
    page = gpu_report.render(MACHINE, None, [], None, 124, 124, 270.0, 170.0, "now")
    assert "No test report: make test-gpu ended with exit status 124: stopped by its time " \
           "limit in 270 s before pytest wrote it." in page
    assert "No results: the bench ended with exit status 124: stopped by its time limit" in page
    # the bench writes its rows as it goes: what it measured before the limit is kept
    partial = {**BENCH["cuda"], "partial": True, "zoo": BENCH["cuda"]["zoo"][:1]}
    page = gpu_report.render(MACHINE, None, [], partial, 124, 124, 270.0, 170.0, "now")
    assert "exit status 124: stopped by its time limit in 170 s." in page
    assert "Partial: the bench stopped (time limit or error) after the rows below." in page
    assert "| pspnet_voc |" in page and "hanet_cityscapes" not in page


def test_report_main_writes_the_page_on_a_cpu_machine(tmp_path):
    out = tmp_path / "gpu.md"
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    assert gpu_report.main(["--bench", str(tmp_path / "bench.json"), "--bench-rc", "0",
                            "--out", str(out)]) == 0
    page = out.read_text()
    assert f"| torch | {torch.__version__}" in page and "| GPU | none visible to torch |" in page


# -- scripts/gpu_check.sh ---------------------------------------------------------------------
def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    venv = Path(sys.executable).parents[1]
    docs = REPO / "docs" / "gpu.md"
    before = docs.read_text() if docs.is_file() else None
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=tmp_path,
                          env={**NO_CUDA, "VENV": str(venv)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check"]
    assert time.perf_counter() - start < 60
    assert (docs.read_text() if docs.is_file() else None) == before  # nothing written
