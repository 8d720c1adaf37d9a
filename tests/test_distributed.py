"""More than one process: two CPU ranks (gloo) through the real entry points train to the
weights of one process with the same global batch and evaluate with the same scores; the
SLURM node list gives the master address as ``scontrol show hostnames`` would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from segtrain.app import build_model
from segtrain.engine.distributed import (
    DistInfo,
    env_info,
    expand_nodelist,
    master_addr,
    master_port,
)
from tests.conftest import REPO, TINY, compose_config, slurm_sbatch_script

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# Frozen BatchNorm and no dropout: the default model's BatchNorm would normalise each rank's
# half batch with its own statistics (SyncBatchNorm needs CUDA in torch: its forward refuses
# CPU tensors), and dropout masks are drawn per rank, so only a model without batch
# statistics and without dropout must train to the same weights on 1 and 2 ranks.
# 5 validation images: not divisible by 2 ranks.
EQUIVALENT = [*TINY, "model.freeze_bn=true", "model.dropout=0.0", "optim=sgd", "optim.lr=0.01",
              "trainer.max_iters=4", "trainer.eval_interval=4", "trainer.checkpoint_interval=4",
              "dataset.val.num_samples=5"]
# measured: 1.5e-8 largest absolute difference (float32 sums in another order); the
# tolerance leaves room for other BLAS kernels
ATOL, RTOL = 1e-6, 1e-5


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    # weights_only: the checkpoint holds tensors and plain types only
    path = run_dir / "checkpoints" / "last.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _val_pixels() -> int:
    cfg = compose_config(EQUIVALENT)
    val = instantiate(cfg.dataset.val, transforms=None)
    return sum(int((val.load(i)[1] != cfg.dataset.ignore_index).sum()) for i in range(len(val)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """One process with batch 4, and two ranks with batch 2 each: the same global batch."""
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    _run([sys.executable, "-m", "segtrain", *EQUIVALENT, "trainer.batch_size=4",
          f"hydra.run.dir={one}"])
    _run([*TORCHRUN, "-m", "segtrain", *EQUIVALENT, "trainer.batch_size=2",
          f"hydra.run.dir={two}"])
    return one, two


def test_two_ranks_train_to_the_weights_of_one_process(runs):
    one, two = runs
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=RTOL, msg=key)
    cfg = compose_config(EQUIVALENT)
    torch.manual_seed(cfg.seed)  # the initial weights, as segtrain.app builds them
    init = build_model(cfg).state_dict()
    changed = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], init[k])]
    assert any(k.startswith("head") for k in changed), "the model did not train"
    state = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == cfg.trainer.max_iters


def test_distributed_evaluation_counts_each_val_pixel_once(runs):
    one, two = runs
    pixels = _val_pixels()
    for run in (one, two):
        saved = json.loads((run / "metrics.json").read_text())
        assert saved["finished"] is True
        assert int(np.sum(saved["confusion_matrix"])) == pixels, run.name
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["miou"] == pytest.approx(m1["miou"], abs=1e-6)


def test_torchrun_evaluate_gives_the_scores_of_one_process(runs):
    one, _ = runs
    common = ["-m", "segtrain.evaluate", f"run={one}", "checkpoint=last", "num_workers=0",
              "device=cpu"]
    _run([sys.executable, *common, f"hydra.run.dir={one / 'eval1'}"])
    single = json.loads((one / "eval_whole.json").read_text())
    (one / "eval_whole.json").unlink()
    _run([*TORCHRUN, *common, f"hydra.run.dir={one / 'eval2'}"])
    parallel = json.loads((one / "eval_whole.json").read_text())
    assert parallel["world_size"] == 2
    assert parallel["confusion_matrix"] == single["confusion_matrix"]
    assert int(np.sum(parallel["confusion_matrix"])) == _val_pixels()
    for key in ("miou", "pixel_acc", "mean_acc", "fwiou"):
        assert parallel[key] == pytest.approx(single[key], abs=1e-12), key


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("a1,b2", ["a1", "b2"]),
    ("gpu[1,3-5]", ["gpu1", "gpu3", "gpu4", "gpu5"]),
    ("rack[1-2]-gpu[01-02]", ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]),
    ("gpu[009-011],cpu7", ["gpu009", "gpu010", "gpu011", "cpu7"]),
    ("login", ["login"]),
])
def test_nodelist_expands_as_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_master_address_and_port_from_slurm():
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242421"}
    assert master_addr(env) == "gpu07"
    assert master_port(env) == 10000 + 4242421 % 20000
    assert 10000 <= master_port({"SLURM_JOB_ID": "99999999"}) < 30000
    assert master_addr({}) == "127.0.0.1" and master_port({}) == 29500


def test_slurm_task_variables_give_the_rank():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    saved = {k: os.environ.pop(k, None) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    try:
        os.environ.update(env)
        assert env_info() == DistInfo(rank=5, world_size=8, local_rank=1)
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def test_two_node_eight_gpu_sweep_job_script(monkeypatch, tmp_path):
    """The sbatch script of the README's 2-node, 8-GPU sweep (no cluster needed)."""
    script = slurm_sbatch_script(["hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                                  "hydra.launcher.tasks_per_node=4"], tmp_path, monkeypatch)
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--requeue",
                 "--signal=USR2@120"):
        assert f"#SBATCH {line}" in script


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the segtrain process of ``rank`` training into ``run_dir``."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"hydra.run.dir={run_dir}".encode() in cmd and f"RANK={rank}".encode() in env \
                and b"torch.distributed.run" not in cmd:
            return int(proc.name)
    return None


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([*TORCHRUN, "-m", "segtrain", *EQUIVALENT, "trainer.batch_size=2",
                             "trainer.max_iters=40", "trainer.checkpoint_interval=1",
                             "trainer.eval_interval=100", f"hydra.run.dir={run}"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline, sent = time.time() + 180, False
        while time.time() < deadline and proc.poll() is None and not sent:
            last = run / "checkpoints" / "last.pt"
            if last.is_file() and torch.load(last, weights_only=True)["iteration"] >= 2:
                pid = _rank_pid(run, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGUSR1)  # rank 1 only
                    sent = True
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=120)  # no rank waits forever for the other
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent, out
    log = (run / "train.log").read_text()
    assert "another rank received a stop signal: saved checkpoints/last.pt" in log, log
    stopped = int(log.split("saved checkpoints/last.pt at iteration ")[1].split(";")[0])
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == stopped
    assert stopped < 40
    assert "stopped by signal 10" in out and "stopped by a stop signal on another rank" in out
