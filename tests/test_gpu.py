"""The CUDA paths (``make test-gpu``; every test here is marked ``cuda`` and skips cleanly
where CUDA is absent, see conftest.py): mixed precision and the GradScaler, CUDA against CPU,
channels_last and torch.compile, DDP over NCCL with SyncBatchNorm through torchrun, CUDA
evaluation and the CRF worker pool, and the peak memory of a DeepLab v3 ResNet-101 step.

Each test uses tiny configs and a few steps, so the file runs in a few minutes on one GPU
(scripts/gpu_check.sh bounds it with ``timeout``). Measured values (compile time, peak
memory, CPU/CUDA differences) are printed and, when ``SEGTRAIN_GPU_FACTS`` names a file,
appended to it as JSON lines for docs/gpu.md (scripts/gpu_report.py).

Tolerances were set before the first GPU run, from the arithmetic, not from measurements:
fp32 sums in another order differ by ~1e-7 relative per operation, so a few optimizer steps
stay far inside 1e-4; TF32 (PyTorch's default for convolutions on CUDA) is switched off where
CUDA is compared with the CPU, as its 10-bit mantissa would dominate.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from segtrain.app import train
from segtrain.core import checkpoint
from segtrain.evaluate import evaluate
from segtrain.losses.ce import CrossEntropyLoss
from tests.conftest import REPO, TINY, compose_config

pytestmark = pytest.mark.cuda

# TINY, on the GPU (later overrides win); images of 64 so that ResNet-101 at output stride 16
# still has a 4x4 feature map
CUDA_TINY = [*TINY, "trainer.device=cuda", "dataset.image_size=64", "trainer.global_batch_size=4"]
# the same run on every device: no dropout (its masks come from per-device generators), SGD
# (Adam's normalisation would magnify tiny gradient differences), fp32
SAME_RUN = ["model.dropout=0.0", "optim=sgd", "optim.lr=0.01", "trainer.precision=fp32",
            "trainer.log_interval=1"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
       "NVIDIA_TF32_OVERRIDE": "0"}  # fp32 math in cuBLAS/cuDNN for the subprocess runs
PEAK_MEMORY_LIMIT_GIB = 40.0  # generous: half an 80 GB H100 for a bf16 batch of 8 at 512x512


def record(name: str, value, unit: str = "", note: str = "") -> None:
    """Print a measured fact and append it to $SEGTRAIN_GPU_FACTS (docs/gpu.md)."""
    print(f"{name}: {value} {unit} {note}".strip())
    path = os.environ.get("SEGTRAIN_GPU_FACTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"name": name, "value": value, "unit": unit, "note": note})
                    + "\n")


def tb_losses(run_dir: Path) -> list[float]:
    """``train/loss/total`` per logged step (log_interval 1: every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb")).Reload()
    return [e.value for e in acc.Scalars("train/loss/total")]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a
               if a[k].is_floating_point() and a[k].numel())


@pytest.fixture
def exact_fp32():
    """No TF32 on CUDA during the test (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# -- mixed precision --------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", ["deeplabv2_resnet18", "deeplabv3"])
def test_mixed_precision_training_on_cuda_lowers_a_finite_loss(tmp_path, model, precision):
    cfg = compose_config([*CUDA_TINY, f"model={model}", f"trainer.precision={precision}",
                          "optim=adamw", "optim.lr=0.001", "trainer.max_iters=30",
                          "trainer.log_interval=1", "trainer.eval_interval=30",
                          "trainer.checkpoint_interval=30"])
    start = time.perf_counter()
    train(cfg, tmp_path)
    seconds = time.perf_counter() - start
    losses = tb_losses(tmp_path)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses), losses
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    record(f"{model} {precision}: loss over 30 steps (first 5 -> last 5 mean)",
           f"{first:.3f} -> {last:.3f}", "", f"{seconds:.1f} s incl. start-up and evaluation")
    assert last < first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    scaler = checkpoint.load(tmp_path)["scaler"]
    if precision == "fp16":
        assert 0 < scaler["scale"] < math.inf
    else:
        assert scaler == {}  # bf16 needs no loss scaling: the scaler is disabled


class OverflowOnceCE(CrossEntropyLoss):
    """The configured cross-entropy, multiplied by 1e8 at its ``overflow_at``-th call (0:
    never): a finite loss whose fp16 gradients overflow (each logit's scaled gradient,
    2^16 x 1e8 / pixels, is far above fp16's largest value 65504), as a bad batch would."""

    def __init__(self, overflow_at: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.overflow_at, self.calls = overflow_at, 0

    def forward(self, outputs, batch):
        terms = super().forward(outputs, batch)
        self.calls += 1
        if self.calls == self.overflow_at:
            terms["total"] = terms["total"] * 1e8
        return terms


def _skipped_steps(state: dict) -> int:
    """Iterations on which the GradScaler skipped the optimizer (AdamW counts its steps)."""
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert len(steps) == 1, steps
    return state["iteration"] - steps.pop()


def test_fp16_overflow_is_skipped_the_scale_backs_off_and_the_scaler_resumes(tmp_path):
    """A fresh network may overflow fp16 by itself in its first steps (the scale starts at
    2^16), so the injected overflow is measured against the same run without it."""
    def cfg(overflow_at: int, *extra):
        return compose_config([*CUDA_TINY, *SAME_RUN, "optim=adamw", "optim.lr=0.001",
                               "trainer.precision=fp16", "lr=constant",
                               "trainer.checkpoint_interval=1", "trainer.eval_interval=100",
                               f"loss._target_={__name__}.OverflowOnceCE",
                               f"+loss.overflow_at={overflow_at}", *extra])

    clean, full = tmp_path / "clean", tmp_path / "full"
    part, resumed = tmp_path / "part", tmp_path / "resumed"
    train(cfg(0, "trainer.max_iters=6"), clean)
    train(cfg(3, "trainer.max_iters=6"), full)
    base, state = checkpoint.load(clean), checkpoint.load(full)
    skipped = _skipped_steps(state)
    record("fp16: steps skipped by the GradScaler in 6 (without / with an overflow at step 3)",
           f"{_skipped_steps(base)} / {skipped}")
    assert skipped == _skipped_steps(base) + 1  # the overflowing step was skipped
    scaler = state["scaler"]
    init_scale = torch.amp.GradScaler("cuda").get_scale()  # 2^16
    # every skip halves the scale (backoff 0.5); no growth within 6 steps (interval 2000)
    assert scaler["scale"] == init_scale * scaler["backoff_factor"] ** skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values()
               if v.is_floating_point())
    assert all(math.isfinite(v) for v in tb_losses(full))
    # stop after 4 steps, resume to 6 (the overflow is behind, so the resumed config has none)
    train(cfg(3, "trainer.max_iters=4"), part)
    train(cfg(0, "trainer.max_iters=6", f"trainer.resume={part}"), resumed)
    after = checkpoint.load(resumed)
    assert after["iteration"] == 6
    # scale and growth tracker (unskipped steps since the last skip) carried over exactly:
    # a scaler started afresh would have 2^16 and count from 0 again
    assert after["scaler"] == scaler
    assert _skipped_steps(after) == skipped
    diff = max_difference(state["model"], after["model"])
    record("fp16 resume: largest weight difference, resumed vs uninterrupted", f"{diff:.2e}")
    for key, value in state["model"].items():
        torch.testing.assert_close(after["model"][key], value, atol=1e-5, rtol=1e-4, msg=key)


# -- CUDA against CPU, memory formats, compile -----------------------------------------------
def test_cuda_and_cpu_fp32_training_agree(tmp_path, exact_fp32):
    common = [*SAME_RUN, "trainer.max_iters=4", "trainer.eval_interval=4",
              "trainer.checkpoint_interval=4"]
    train(compose_config([*CUDA_TINY, *common, "trainer.device=cpu"]), tmp_path / "cpu")
    train(compose_config([*CUDA_TINY, *common]), tmp_path / "cuda")
    cpu, cuda = tb_losses(tmp_path / "cpu"), tb_losses(tmp_path / "cuda")
    np.testing.assert_allclose(cuda, cpu, rtol=1e-4)
    a, b = checkpoint.load(tmp_path / "cpu")["model"], checkpoint.load(tmp_path / "cuda")["model"]
    diff = max_difference(a, b)
    record("fp32, 4 SGD steps: largest weight difference CUDA vs CPU", f"{diff:.2e}", "",
           "tolerance atol 1e-4, rtol 1e-3; TF32 off")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-3, msg=key)


def test_channels_last_and_compile_on_cuda_give_the_default_losses(tmp_path, exact_fp32):
    common = [*CUDA_TINY, *SAME_RUN, "trainer.max_iters=6", "trainer.eval_interval=6",
              "trainer.checkpoint_interval=6"]
    seconds, losses = {}, {}
    for name, extra in (("default", []), ("channels_last", ["trainer.channels_last=true"]),
                        ("compile", ["trainer.compile=true"])):
        start = time.perf_counter()
        train(compose_config([*common, *extra]), tmp_path / name)
        seconds[name] = time.perf_counter() - start
        losses[name] = tb_losses(tmp_path / name)
    for name in ("channels_last", "compile"):
        np.testing.assert_allclose(losses[name], losses["default"], rtol=1e-3, atol=1e-5,
                                   err_msg=name)
    record("trainer.compile=true: compilation time (run time minus the default run's)",
           f"{seconds['compile'] - seconds['default']:.1f}", "s",
           f"default run {seconds['default']:.1f} s, 6 steps")
    record("trainer.channels_last=true: run time", f"{seconds['channels_last']:.1f}", "s",
           f"default {seconds['default']:.1f} s")


# -- DDP over NCCL through torchrun -------------------------------------------------------------
DDP_RUN = [*CUDA_TINY, *SAME_RUN, "trainer.device=auto", "trainer.max_iters=4",
           "trainer.eval_interval=4", "trainer.checkpoint_interval=4",
           "dataset.val.num_samples=5"]  # 5 validation images: not divisible by 2 ranks


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n}"]


def _val_pixels() -> int:
    cfg = compose_config(DDP_RUN)
    val = instantiate(cfg.dataset.val, transforms=None)
    return sum(int((val.load(i)[1] != cfg.dataset.ignore_index).sum()) for i in range(len(val)))


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_torchrun_one_process_trains_on_cuda_into_one_run_folder(tmp_path):
    run = tmp_path / "outputs" / "run"
    _run([*_torchrun(1), "-m", "segtrain", *DDP_RUN, "trainer.sync_bn=true",
          f"hydra.run.dir={run}"], cwd=tmp_path)
    assert list((tmp_path / "outputs").iterdir()) == [run]
    assert "device cuda:0" in (run / "train.log").read_text()
    saved = _metrics(run)
    assert saved["finished"] is True
    assert int(np.sum(saved["confusion_matrix"])) == _val_pixels()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_with_sync_bn_train_to_the_weights_of_one_process(tmp_path):
    """Batch 4 on one GPU against 2 x 2 on two: BatchNorm trains, so only SyncBatchNorm
    (statistics of the global batch) gives the one-process weights and running statistics;
    the same run without it is the control that shows SyncBatchNorm was used."""
    one, two, unsynced = tmp_path / "one", tmp_path / "two", tmp_path / "unsynced"
    _run([sys.executable, "-m", "segtrain", *DDP_RUN, "trainer.global_batch_size=4",
          f"hydra.run.dir={one}"], cwd=tmp_path)
    _run([*_torchrun(2), "-m", "segtrain", *DDP_RUN, "trainer.global_batch_size=4",
          "trainer.sync_bn=true", f"hydra.run.dir={two}"], cwd=tmp_path)
    _run([*_torchrun(2), "-m", "segtrain", *DDP_RUN, "trainer.global_batch_size=4",
          "trainer.sync_bn=false", f"hydra.run.dir={unsynced}"], cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two", "unsynced"]
    a, b, c = (checkpoint.load(r)["model"] for r in (one, two, unsynced))
    diff = max_difference(a, b)
    record("2 GPUs (SyncBatchNorm) vs 1: largest weight difference", f"{diff:.2e}")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-3, msg=key)
    stats = [k for k in a if k.endswith("running_mean")]
    assert max(float((c[k] - a[k]).abs().max()) for k in stats) > 1e-3, \
        "without SyncBatchNorm the running statistics should be those of half the batch"
    pixels = _val_pixels()
    for run in (one, two):
        assert int(np.sum(_metrics(run)["confusion_matrix"])) == pixels, run.name
    assert _metrics(two)["miou"] == pytest.approx(_metrics(one)["miou"], abs=1e-4)


# -- evaluation ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run trained on the CPU: the checkpoint both devices evaluate."""
    run = tmp_path_factory.mktemp("trained")
    train(compose_config([*TINY, "dataset.image_size=64", "trainer.max_iters=6"]), run)
    return run


def _evaluate(run: Path, device: str, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"run={run}", "checkpoint=last", "num_workers=0", f"device={device}", *overrides])
    return evaluate(cfg, "check")


SLIDE = ["eval=slide", "eval.predictor.crop_size=[48,48]", "eval.predictor.stride=[16,16]"]


@pytest.mark.parametrize("mode", [["eval=whole"], ["eval=msc"], SLIDE],
                         ids=["whole", "msc", "slide"])
def test_cuda_evaluation_gives_the_cpu_scores(trained_run, mode, exact_fp32):
    cpu, cuda = _evaluate(trained_run, "cpu", *mode), _evaluate(trained_run, "cuda", *mode)
    a, b = np.array(cpu["confusion_matrix"]), np.array(cuda["confusion_matrix"])
    assert a.sum() == b.sum()
    moved = int(np.abs(a - b).sum()) // 2  # pixels whose predicted class differs
    record(f"eval {mode[0]}: pixels predicted differently on CUDA and CPU", moved, "",
           f"of {int(a.sum())}")
    assert moved <= 0.001 * a.sum()  # near-ties of fp32 logits only
    assert cuda["miou"] == pytest.approx(cpu["miou"], abs=1e-3)


def test_crf_worker_pool_starts_after_cuda_initialisation(trained_run):
    serial = _evaluate(trained_run, "cpu", "eval=msc_crf", "eval.crf_workers=0")
    start = time.perf_counter()
    # a subprocess, so that a hanging pool fails this test (timeout) instead of the suite
    _run([sys.executable, "-m", "segtrain.evaluate", f"run={trained_run}", "checkpoint=last",
          "num_workers=0", "device=cuda", "eval=msc_crf", "eval.crf_workers=2",
          f"hydra.run.dir={trained_run / 'eval_crf'}"], cwd=trained_run)
    record("eval=msc_crf on CUDA with 2 CRF processes: wall time of the command",
           f"{time.perf_counter() - start:.1f}", "s")
    pooled = json.loads((trained_run / "eval_msc_crf.json").read_text())
    assert pooled["miou"] == pytest.approx(serial["miou"], abs=1e-3)


# -- memory ---------------------------------------------------------------------------------------
def test_peak_memory_of_deeplabv3_resnet101_at_512_batch_8_bf16(tmp_path):
    cfg = compose_config([*CUDA_TINY, "model=deeplabv3", "dataset.image_size=512",
                          "dataset.train.num_samples=8", "dataset.val.num_samples=1",
                          "trainer.global_batch_size=8", "trainer.precision=bf16",
                          "trainer.max_iters=2", "trainer.eval_interval=2",
                          "trainer.checkpoint_interval=2"])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train(cfg, tmp_path)
    peak = torch.cuda.max_memory_allocated() / 2**30
    record("peak memory, DeepLab v3 ResNet-101 training, 512x512, batch 8, bf16",
           f"{peak:.2f}", "GiB", f"limit {PEAK_MEMORY_LIMIT_GIB:.0f} GiB; 2 steps + evaluation")
    assert peak < PEAK_MEMORY_LIMIT_GIB
