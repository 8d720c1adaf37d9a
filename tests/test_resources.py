"""Resources and likely first mistakes, each one line: a full disk or a read-only run folder
while writing a checkpoint (the earlier last.pt survives), out of memory in a step (naming the
batch and crop, last.pt of the last completed step kept), a batch larger than the training
split, a data set on disk without dataset.root, an image size of 0."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

import pytest
import torch

from segtrain.app import train
from segtrain.core import checkpoint
from segtrain.engine.trainer import OutOfMemory, Trainer
from segtrain.errors import ConfigError
from tests.conftest import REPO, TINY

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ENV.pop("HYDRA_FULL_ERROR", None)

# what torch.save raised on a full 200 KiB tmpfs (measured with torch 2.13)
FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662"


def _fail_writes_after(monkeypatch, good: int, error: BaseException) -> None:
    """The first ``good`` checkpoint writes succeed, every later one raises ``error``
    after writing part of the file."""
    real, count = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        count[0] += 1
        if count[0] > good:
            f.write(b"PK\x03\x04 partial")
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)


@pytest.mark.parametrize("error, reason", [
    (RuntimeError(FULL_DISK), "torch's writer failed"),
    (OSError(errno.EROFS, "Read-only file system"), r"Read-only file system \(EROFS\)"),
])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_earlier_last_pt(
        tiny_cfg, tmp_path, monkeypatch, error, reason):
    # last.pt at iteration 3 (and best.pt), then every write fails
    _fail_writes_after(monkeypatch, 2, error)
    with pytest.raises(checkpoint.CheckpointError, match=reason) as err:
        train(tiny_cfg("trainer.eval_interval=3"), tmp_path)
    message = str(err.value)
    assert "\n" not in message and "the previous last.pt is kept" in message, message
    monkeypatch.undo()
    assert checkpoint.load(tmp_path)["iteration"] == 3
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_out_of_memory_in_a_step_names_the_batch_and_crop_and_keeps_the_last_step(
        tiny_cfg, tmp_path, monkeypatch):
    real_step = Trainer._step

    def step(self, batches):
        if self.iteration == 4:  # the CPU allocator's error, mid-forward
            real_forward = self.train_model.forward

            def forward(*args, **kwargs):
                real_forward(*args, **kwargs)  # BatchNorm statistics move, then it fails
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. "
                                   "DefaultCPUAllocator: can't allocate memory: you tried to "
                                   "allocate 9663676416 bytes.")

            self.train_model.forward = forward
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "_step", step)
    with pytest.raises(OutOfMemory, match=r"out of memory in the step after iteration 4 "
                                          r"with a batch of 2 images, crop 32x32") as err:
        train(tiny_cfg("trainer.checkpoint_interval=100", "trainer.eval_interval=100"),
              tmp_path / "oom")
    assert f"saved {tmp_path / 'oom' / 'checkpoints' / 'last.pt'} at iteration 4" in \
        str(err.value)
    monkeypatch.undo()
    # last.pt is the state after step 4, buffers included: resumed, it ends where an
    # uninterrupted run does
    common = ("trainer.checkpoint_interval=100", "trainer.eval_interval=100")
    train(tiny_cfg(*common, "trainer.resume=auto"), tmp_path / "oom")
    train(tiny_cfg(*common), tmp_path / "full")
    a, b = checkpoint.load(tmp_path / "oom")["model"], checkpoint.load(tmp_path / "full")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_batch_larger_than_the_training_split_is_refused_before_anything_is_built(
        tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.global_batch_size=100000: .* the training "
                                          r"split has 16 images"):
        train(tiny_cfg("trainer.global_batch_size=100000"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides, line", [
    (["dataset=camvid"], "error: dataset.root is not set: pass the folder the camvid data set "
                         "is in, e.g. dataset.root=/data/camvid"),
    (["dataset.image_size=0"], "error: dataset.image_size=0: expected an integer >= 1"),
])
def test_the_likeliest_first_mistakes_are_one_line(tmp_path, overrides, line):
    small = [o for o in TINY if not o.startswith("dataset.")] if "dataset=camvid" in overrides \
        else TINY
    proc = subprocess.run([sys.executable, "-m", "segtrain", *small, *overrides,
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and \
        proc.stderr.startswith(line), proc.stderr


def test_the_start_names_the_run_folder_and_refuses_a_disk_too_small_for_its_checkpoints(
        tiny_cfg, tmp_path, monkeypatch, caplog):
    """The first log line is the run folder; the next ones say what the checkpoints take; a
    file system with less free space than that refuses the run in one line, before a step."""
    import shutil

    from segtrain.engine.checkpoint_files import NotEnoughDisk

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10**6))
    with caplog.at_level(logging.INFO, logger="segtrain"), \
            pytest.raises(NotEnoughDisk, match=r"not enough disk for the checkpoints of this "
                                               r"run: .* MB needed in .*checkpoints .*1\.0 MB "
                                               r"free; .*trainer.keep_checkpoints") as err:
        train(tiny_cfg(), tmp_path)
    assert "\n" not in str(err.value)
    messages = [r.getMessage() for r in caplog.records if r.name == "segtrain"]
    assert messages[0] == f"run folder: {tmp_path.resolve()}"
    assert any(m.startswith("checkpoints: last.pt ") for m in messages), messages
    assert not (tmp_path / "checkpoints").exists()  # refused before the first step


def test_checkpoint_sizes_are_known_before_the_first_step(tmp_path):
    """The plan's last.pt and best.pt, from the weights and the optimizer's state before it
    exists (a probe step), bound the files torch.save writes after a step, within the
    allowance for the zip records."""
    from segtrain.engine.checkpoint_files import PER_FILE_OVERHEAD, disk_plan

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.BatchNorm1d(400))
    groups = [{"params": model[0].parameters(), "lr": 1e-3},
              {"params": model[1].parameters(), "lr": 1e-2, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups)
    before = disk_plan(tmp_path, model, optimizer, None, keep=0)
    model(torch.randn(4, 300)).square().mean().backward()
    optimizer.step()
    after = disk_plan(tmp_path, model, optimizer, None, keep=3)
    assert (before.last, before.best) == (after.last, after.best)
    checkpoint.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                           tmp_path / "last.pt")
    checkpoint.save_atomic({"model": model.state_dict()}, tmp_path / "best.pt")
    last, best = (tmp_path / "last.pt").stat().st_size, (tmp_path / "best.pt").stat().st_size
    assert last > 3 * 4 * 300 * 400  # weights and Adam's two moments, fp32
    assert last <= after.last <= last + PER_FILE_OVERHEAD + 0.01 * last
    assert best <= after.best <= best + PER_FILE_OVERHEAD + 0.01 * best
    assert after.total == 5 * after.last + after.best  # last, 3 copies, its rewrite, best
