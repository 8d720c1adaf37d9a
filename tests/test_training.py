"""End-to-end training on tiny configs of the real code path: loss falls, run folder
contents, exact resume after a kill, checkpoint errors, non-finite loss."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segtrain.app import train
from segtrain.core import checkpoint
from segtrain.engine.trainer import NonFiniteLossError
from tests.cli_in_process import run_module
from tests.conftest import REPO, TINY


def test_short_run_loss_falls_and_leaves_a_complete_run_folder(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_iters=30", "trainer.eval_interval=15", "trainer.log_interval=1",
                   "optim=adamw", "optim.lr=0.001")
    metrics = train(cfg, tmp_path)
    state = checkpoint.load(tmp_path)
    assert state["iteration"] == 30
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["miou"] == pytest.approx(metrics["miou"])
    assert len(saved["iou"]) == 6 and saved["class_names"][0] == "background"
    assert [h["iteration"] for h in saved["history"]] == [15, 30]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "iter_0000015.png", "iter_0000030.png"]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events, "TensorBoard events missing"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    tags = acc.Tags()
    assert {"train/loss/total", "train/lr/head", "val/miou"} <= set(tags["scalars"])
    assert "val/image_gt_pred" in tags["images"]
    losses = [e.value for e in acc.Scalars("train/loss/total")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir)["model"]


def _cli(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segtrain", *TINY, "trainer.max_iters=8",
            "trainer.checkpoint_interval=1", "trainer.eval_interval=4",
            "model.dropout=0.5", f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.slow  # three real processes; the default suite's resume proof is the Ctrl-C test
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    subprocess.run(_cli(full), cwd=REPO, env=env, check=True, capture_output=True)

    proc = subprocess.Popen(_cli(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if checkpoint.load(last)["iteration"] >= 3:
                break
        except checkpoint.CheckpointError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = checkpoint.load(last)["iteration"]
    assert 3 <= k < 8, f"the run was meant to be killed midway, it reached {k}"

    subprocess.run(_cli(resumed, f"trainer.resume={killed}"), cwd=REPO, env=env, check=True,
                   capture_output=True)
    a, b = _final_weights(full), _final_weights(resumed)
    assert checkpoint.load(resumed)["iteration"] == 8
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming at iteration {k}"


def _interrupt(cmd: list[str], env: dict, log_file: Path, after: int,
               presses: int = 1) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group and press Ctrl-C ``presses`` times (SIGINT to the
    whole group, as a terminal does) once ``log_file`` shows iteration ``after``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if log_file.is_file() and f"iter {after}/" in log_file.read_text():
            break
        time.sleep(0.02)
    for _ in range(presses):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_stops_at_a_step_boundary_and_resumes_to_every_uninterrupted_tensor(tmp_path,
                                                                                    one_thread):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    extra = ("trainer.max_iters=8", "trainer.checkpoint_interval=100", "trainer.log_interval=1",
             "trainer.eval_interval=100")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    # the uninterrupted run: the same command in this process, with the subprocesses' one
    # intra-op thread (a float sum split over two threads rounds differently)
    assert torch.get_num_threads() == 1
    assert run_module(*_cli(full, *extra)[2:]).returncode == 0
    proc = _interrupt(_cli(stopped, *extra), env, stopped / "train.log", after=3)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    said = [line for line in (proc.stdout + proc.stderr).splitlines()
            if "signal 2 received (SIGINT)" in line]
    assert len(said) == 1 and "resume with trainer.resume=" in said[0], proc.stdout
    k = checkpoint.load(stopped)["iteration"]
    assert 3 <= k < 8, f"the run was meant to be stopped midway, it reached {k}"
    subprocess.run(_cli(stopped, *extra, "trainer.resume=auto"), cwd=REPO, env=env,
                   check=True, capture_output=True)
    a, b = _final_weights(full), _final_weights(stopped)
    assert checkpoint.load(stopped)["iteration"] == 8
    assert a.keys() == b.keys() and any("running_mean" in key for key in a)
    for key in a:  # weights and BatchNorm buffers (num_batches_tracked included)
        assert torch.equal(a[key], b[key]), f"{key} differs after a Ctrl-C at iteration {k}"


def test_resume_auto_continues_in_the_same_run_folder(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_iters=3"), tmp_path)
    # a longer run from the same folder: asked for explicitly (the poly curve changes)
    cfg = tiny_cfg("trainer.max_iters=6", "trainer.resume=auto",
                   "trainer.resume_allow_schedule_change=true")
    train(cfg, tmp_path)
    assert checkpoint.load(tmp_path)["iteration"] == 6


def test_missing_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found: .*last.pt"):
        train(tiny_cfg(f"trainer.resume={tmp_path / 'no_such_run'}"), tmp_path / "run")


def test_corrupt_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or unreadable"):
        train(tiny_cfg(f"trainer.resume={bad}"), tmp_path / "run")
    torch.save({"weights": 1}, bad)
    with pytest.raises(checkpoint.CheckpointError, match="not a segtrain checkpoint"):
        checkpoint.load(bad)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = checkpoint.save_atomic({"model": {"w": torch.ones(2)}}, tmp_path / "last.pt")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_non_finite_loss_stops_with_a_message_and_a_usable_checkpoint(tiny_cfg, tmp_path):
    cfg = tiny_cfg("optim=sgd", "optim.lr=30", "trainer.max_iters=50",
                   "trainer.eval_interval=100", "trainer.checkpoint_interval=1")
    pattern = r"non-finite (loss|weights) at iteration \d+"
    with pytest.raises(NonFiniteLossError, match=pattern) as err:
        train(cfg, tmp_path)
    failed_at = int(re.search(r"iteration (\d+)", str(err.value)).group(1))
    state = checkpoint.load(tmp_path)
    assert 0 < state["iteration"] < failed_at, str(err.value)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the kept checkpoint is usable: a run resumes from it
    train(tiny_cfg("optim=sgd", f"trainer.resume={tmp_path}", "trainer.max_iters=5",
                   "trainer.resume_allow_schedule_change=true"), tmp_path / "resumed")


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_mixed_precision_options_train_on_cpu(tiny_cfg, tmp_path, precision):
    cfg = tiny_cfg(f"trainer.precision={precision}", "trainer.max_iters=2",
                   "trainer.eval_interval=2", "trainer.clip_grad_norm=1.0")
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    assert checkpoint.load(tmp_path)["iteration"] == 2


def test_gradient_accumulation_matches_one_big_batch(tiny_cfg, tmp_path):
    # iter_size x batch_size images per step: 2 x 2 accumulated equals 1 x 4 when the model
    # has no batch statistics (frozen BN) and no dropout
    common = ["model.freeze_bn=true", "model.dropout=0.0", "trainer.max_iters=2",
              "trainer.eval_interval=100", "optim=sgd", "optim.lr=0.01"]
    train(tiny_cfg(*common, "trainer.global_batch_size=4", "trainer.iter_size=1"), tmp_path / "a")
    train(tiny_cfg(*common, "trainer.global_batch_size=4", "trainer.iter_size=2"), tmp_path / "b")
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
