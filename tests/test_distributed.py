"""More than one process: two CPU ranks (gloo) through the real entry points train to the
weights of one process with the same global batch and evaluate with the same scores; the
SLURM node list gives the master address as ``scontrol show hostnames`` would."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from segtrain.app import build_model
from segtrain.core.distributed import (
    DistInfo,
    env_info,
    expand_nodelist,
    master_addr,
    master_port,
    slurm_tasks_on_node,
)
from segtrain.data.loader import train_loader
from segtrain.engine.trainer import Trainer
from segtrain.eval.crf import default_workers
from segtrain.eval.evaluator import crf_pool
from segtrain.eval.metrics import SUMMARY_METRICS
from tests import injected_faults
from tests.conftest import REPO, TINY, OneConv, compose_config, slurm_sbatch_script

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
    _run([sys.executable, "-m", "segtrain", *EQUIVALENT, "trainer.global_batch_size=4",
          f"hydra.run.dir={one}"])
    _run([*TORCHRUN, "-m", "segtrain", *EQUIVALENT, "trainer.global_batch_size=4",
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


@pytest.mark.slow  # a torchrun evaluation (10 s idle); the pixel count of a two-rank
# evaluation stays in the default suite
def test_torchrun_evaluate_gives_the_scores_of_one_process(runs):
    one, _ = runs
    common = ["-m", "segtrain.evaluate", f"run={one}", "checkpoint=last", "num_workers=0",
              "device=cpu"]
    _run([sys.executable, *common, f"hydra.run.dir={one / 'eval1'}"])
    single = json.loads((one / "eval_whole_last.json").read_text())
    (one / "eval_whole_last.json").unlink()
    _run([*TORCHRUN, *common, f"hydra.run.dir={one / 'eval2'}"])
    parallel = json.loads((one / "eval_whole_last.json").read_text())
    assert parallel["world_size"] == 2
    assert parallel["confusion_matrix"] == single["confusion_matrix"]
    assert int(np.sum(parallel["confusion_matrix"])) == _val_pixels()
    for key in SUMMARY_METRICS:
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
    proc = subprocess.Popen([*TORCHRUN, "-m", "segtrain", *EQUIVALENT,
                             "trainer.global_batch_size=4", "trainer.max_iters=40",
                             "trainer.checkpoint_interval=1", "trainer.eval_interval=100",
                             f"hydra.run.dir={run}"],
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
    assert "signal 10 received (SIGUSR1): saved" in out  # rank 1 says why it stopped
    assert "another rank received a stop signal: saved" in out  # and rank 0


# -- ranks started by hand (as torchrun does, but each with its own start time and output) --
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(args: list[str], cwd: Path, delays: tuple[float, ...] = (0.0, 0.0)
                 ) -> list[subprocess.Popen]:
    """``python -m segtrain args`` once per rank with torchrun's variables; rank r starts
    ``delays[r]`` seconds after rank 0."""
    port, procs = _free_port(), []
    for rank, delay in enumerate(delays):
        time.sleep(delay - (delays[rank - 1] if rank else 0.0))
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(len(delays)), "LOCAL_WORLD_SIZE": str(len(delays)),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "segtrain", *args], cwd=cwd,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, float]]:
    """(exit status, stderr, exit time) of each rank; kills them all if one hangs."""
    deadline, ended = time.time() + timeout, {}
    try:
        while len(ended) < len(procs) and time.time() < deadline:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert len(ended) == len(procs), f"a rank did not exit within {timeout} s"
    return [(p.returncode, p.stderr.read(), ended[i]) for i, p in enumerate(procs)]


# dropout on (deeplabv2's 0.5): the masks are drawn from each rank's own stream
DROPOUT = [*TINY, "trainer.max_iters=8", "trainer.eval_interval=4",
           "trainer.checkpoint_interval=2", "trainer.log_interval=2", "trainer.resume=auto"]


@pytest.fixture(scope="module")
def late_start(tmp_path_factory) -> Path:
    """Two ranks, the second started 1.5 s after the first, without hydra.run.dir: each
    would name the run folder from its own clock."""
    cwd = tmp_path_factory.mktemp("late_start")
    results = _finish(_start_ranks(DROPOUT, cwd, delays=(0.0, 1.5)))
    for code, err, _ in results:
        assert code == 0, err
    return cwd


@pytest.mark.slow  # a third torchrun job (14 s idle); the default suite keeps the other three
def test_ranks_started_apart_write_to_rank_0s_run_folder(late_start):
    folders = [p.parent for p in (late_start / "outputs").glob("*/*/.hydra")]
    assert len(folders) == 1, folders
    run = folders[0]
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "train.log").is_file()


@pytest.mark.slow  # the late-start torchrun job (13 s idle)
def test_each_rank_draws_its_own_stream_and_last_pt_holds_every_rank_rng(late_start):
    (run,) = [p.parent for p in (late_start / "outputs").glob("*/*/.hydra")]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2
    # the same number of draws on both ranks: different states mean different streams
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


@pytest.mark.slow
def test_two_ranks_stopped_and_resumed_end_with_the_uninterrupted_weights(late_start,
                                                                          tmp_path):
    (reference,) = [p.parent for p in (late_start / "outputs").glob("*/*/.hydra")]
    run = tmp_path / "run"
    args = [*DROPOUT, f"hydra.run.dir={run}"]
    procs = _start_ranks(args, REPO)
    last, sent = run / "checkpoints" / "last.pt", False
    deadline = time.time() + 180
    while not sent and time.time() < deadline and procs[1].poll() is None:
        if last.is_file() and torch.load(last, weights_only=True)["iteration"] >= 2:
            os.kill(procs[1].pid, signal.SIGUSR1)  # rank 1 only
            sent = True
        time.sleep(0.05)
    results = _finish(procs)
    # a stop exits 128 + its signal (segtrain.cli.exit_stopped): rank 1 got SIGUSR1, rank 0
    # stopped with it, as for a SIGTERM
    assert sent and [code for code, _, _ in results] == [128 + signal.SIGTERM,
                                                         128 + signal.SIGUSR1], results
    stopped = torch.load(last, weights_only=True)
    assert 2 <= stopped["iteration"] < 8 and len(stopped["rng"]) == 2
    for code, err, _ in _finish(_start_ranks(args, REPO)):
        assert code == 0, err
    a, b = _weights(reference), _weights(run)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    run = tmp_path / "run"
    # NaN in rank 1's loss at step 5; checked at the log interval (step 6), not at the next
    # checkpoint (step 8) or evaluation (never)
    args = [*TINY, "loss._target_=tests.injected_faults.NaNOnOneRank", "+loss.nan_rank=1",
            "+loss.nan_step=5", "trainer.max_iters=40", "trainer.log_interval=3",
            "trainer.checkpoint_interval=4", "trainer.eval_interval=100",
            f"hydra.run.dir={run}"]
    results = _finish(_start_ranks(args, REPO), timeout=120)
    assert all(code == 1 for code, _, _ in results), results
    messages = [[line for line in err.splitlines() if line.startswith("error:")][0]
                for _, err, _ in results]
    assert messages[0] == messages[1], messages
    assert "non-finite loss at iteration 5" in messages[0]
    assert abs(results[0][2] - results[1][2]) < 5.0, "one rank waited for the other"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "iter 6/" not in (run / "train.log").read_text()  # stopped at step 6's log


# -- in-process: the host synchronisations of the loop under DDP --------------------------
def test_ranks_agree_on_a_stop_signal_only_at_log_intervals(tmp_path, monkeypatch):
    """Rank 0 of a world that DistInfo calls 2 ranks, in a real one-process gloo group: every
    all-reduce is counted with the iteration it ran after."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    try:
        model = OneConv()
        data = [{"image": torch.randn(3, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.long),
                 "meta": {}} for _ in range(8)]
        trainer = None

        def loss(outputs, batch):
            if trainer.iteration == 7:  # a signal arrives during step 8
                trainer.request_stop(signal.SIGUSR1)
            return {"total": outputs["out"].mean()}

        batches = functools.partial(train_loader, data, 2, 0, 0, rank=0, world_size=2)
        trainer = Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=0.1),
                          lambda it: 1.0, batches, tmp_path, max_iters=20, iter_size=1,
                          precision="fp32", clip_grad_norm=None, log_interval=5, seed=0,
                          device=torch.device("cpu"), dist=DistInfo(rank=0, world_size=2))
        at, all_reduce = [], torch.distributed.all_reduce

        def counted(*args, **kwargs):
            at.append(trainer.iteration)
            return all_reduce(*args, **kwargs)

        monkeypatch.setattr(torch.distributed, "all_reduce", counted)
        assert trainer.fit() == "stopped"
    finally:
        torch.distributed.destroy_process_group()
    assert trainer.iteration == 10  # the log interval after the signal
    assert set(at) == {5, 10}, at  # nothing between log intervals


# -- the dense-CRF pool -------------------------------------------------------------------
def test_the_crf_pool_spawns_its_workers(monkeypatch):
    monkeypatch.setattr(injected_faults, "PARENT_ONLY", True)
    with crf_pool(1) as pool:
        assert pool.submit(injected_faults.parent_only).result(timeout=120) is False


@pytest.mark.parametrize("env, workers", [
    ({}, 8),
    ({"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, 2),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
      "SLURM_TASKS_PER_NODE": "4,3(x1)"}, 2),
    ({"RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "16"}, 1),
])
def test_crf_workers_divide_the_cores_among_the_ranks_of_a_node(monkeypatch, env, workers):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID",
                "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert default_workers() == workers


@pytest.mark.parametrize("spec, node, tasks", [("4(x2)", "1", 4), ("4(x2),3", "2", 3),
                                               ("2", "0", 2)])
def test_slurm_tasks_on_this_node(spec, node, tasks):
    assert slurm_tasks_on_node({"SLURM_TASKS_PER_NODE": spec, "SLURM_NODEID": node}) == tasks
