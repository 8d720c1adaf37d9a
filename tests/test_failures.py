"""Failures that lose nothing: unsafe checkpoints refused, stale temporary files removed,
user errors in one plain line from the real commands, last.pt saved when an error strikes
mid-run, a preempted sweep job requeued by the submitit local launcher and resumed to the
weights of an uninterrupted job, and the dataset checker listing every bad file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from segtrain import __main__ as entry
from segtrain.app import build_model, train
from segtrain.core import checkpoint
from segtrain.data import synthetic
from segtrain.data.base import DatasetError
from segtrain.engine.trainer import Trainer, set_rng_state
from tests.cli_in_process import run_module, run_script
from tests.conftest import REPO, TINY, compose_config
from tests.dataset_miniatures import make_camvid

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ENV.pop("HYDRA_FULL_ERROR", None)


def _segtrain(*args: str, env: dict | None = None, module: str = "segtrain",
              timeout: int = 300) -> subprocess.CompletedProcess:
    """The command in this process (tests/cli_in_process.py); in a new one where it must
    read another environment."""
    if env is None:
        return run_module(module, *args)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- checkpoints -------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious(tmp_path: Path) -> tuple[Path, Path]:
    marker, path = tmp_path / "code_ran", tmp_path / "evil.pt"
    torch.save({"model": {}, "iteration": 1, "payload": _Payload(marker)}, path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    path, marker = _malicious(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"evil.pt refused.*could run code"):
        checkpoint.load(path)
    assert not marker.exists()
    # the same through the real command: one line, exit 1, nothing run
    proc = _segtrain(*TINY, f"trainer.resume={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "evil.pt refused" in proc.stderr
    assert not marker.exists()
    # control: loading it the way segtrain used to (weights_only=False) does run the code
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoints_hold_tensors_and_plain_types(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_iters=3"), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 3
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["iteration"] == 3
    # the RNG states (one entry per rank) survive the round trip through plain types
    (rng,) = state["rng"]
    set_rng_state(rng)
    first = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(rng)
    assert (random.random(), np.random.rand(), torch.rand(1)) == first


def test_an_old_checkpoint_gets_a_clear_message_and_can_be_upgraded(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_iters=2", "trainer.eval_interval=2"), tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = checkpoint.load(path)
    # what segtrain wrote before safe loading: the RNG states as Python / NumPy objects
    state["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state()}
    del state["schedule"]  # nor did it record the schedule: a longer run resumes from it
    torch.save(state, path)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"refused.*asks for numpy.*without running anything.*"
                             r"scripts/upgrade_checkpoint.py .*last.pt"):
        checkpoint.load(path)
    proc = run_script(REPO / "scripts/upgrade_checkpoint.py", str(path))
    assert proc.returncode == 0, proc.stderr
    upgraded = checkpoint.load(path)
    set_rng_state(upgraded["rng"])
    first = random.random(), np.random.rand()
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    assert (random.random(), np.random.rand()) == first
    # and the run resumes from it
    train(tiny_cfg("trainer.max_iters=3", "trainer.eval_interval=3", "trainer.resume=auto"),
          tmp_path / "run")
    assert checkpoint.load(path)["iteration"] == 3


class _ShellPayload:
    """Unpickling this runs ``os.system("touch marker")`` (the global ``posix.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_upgrader_never_runs_a_pickled_callable(tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "evil.pt"
    torch.save({"model": {}, "iteration": 1, "rng": {"numpy": np.random.get_state()},
                "payload": _ShellPayload(marker)}, path)
    original = path.read_bytes()
    # the loader refuses it and does not send the user to the upgrader for it
    with pytest.raises(checkpoint.CheckpointError, match=r"asks for posix.system") as info:
        checkpoint.load(path)
    assert "python scripts/upgrade_checkpoint.py" not in str(info.value)
    proc = subprocess.run([sys.executable, "scripts/upgrade_checkpoint.py", str(path)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "posix.system" in lines[0]
    assert not marker.exists()
    assert path.read_bytes() == original and not path.with_name("evil.pt.old").exists()
    # an object of any other class is refused the same way, before it is built
    other = tmp_path / "other.pt"
    torch.save({"model": {}, "payload": _Payload(marker)}, other)
    proc = subprocess.run([sys.executable, "scripts/upgrade_checkpoint.py", str(other)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "asks for io.open" in proc.stderr, proc.stderr
    assert not marker.exists()


def test_stale_temporary_checkpoints_are_removed_at_start_and_never_accumulate(tiny_cfg,
                                                                               tmp_path):
    train(tiny_cfg("trainer.max_iters=2", "trainer.eval_interval=2"), tmp_path)
    ckpts = tmp_path / "checkpoints"
    stale = [ckpts / ".last.pt.k9x_2ab.tmp", ckpts / ".last.pt.0qwe81z.tmp",
             ckpts / ".best.pt.zz8812a.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)  # what kill -9 during torch.save leaves
    other = ckpts / "notes.tmp"
    other.write_text("not ours")
    train(tiny_cfg("trainer.max_iters=4", "trainer.eval_interval=2", "trainer.resume=auto",
                   "trainer.resume_allow_schedule_change=true"), tmp_path)
    assert checkpoint.load(tmp_path)["iteration"] == 4
    assert not [p for p in stale if p.exists()]
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "last.pt", "notes.tmp"]
    # a write removes what an earlier killed write of the same file left
    (ckpts / ".last.pt.left.tmp").write_bytes(b"\0")
    checkpoint.save_atomic(checkpoint.load(tmp_path), ckpts / "last.pt")
    assert not (ckpts / ".last.pt.left.tmp").exists()


# -- one-line user errors from the real commands -----------------------------------------
@pytest.fixture(scope="module")
def camvid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("camvid")
    make_camvid(root, {"train": 3, "val": 2})
    return root


def _camvid_args(root: Path) -> list[str]:
    tiny = [o for o in TINY if not o.startswith("dataset.")]  # synthetic-only keys
    return [*tiny, "dataset=camvid", f"dataset.root={root}", "dataset.crop_size=[32,32]",
            "trainer.num_workers=1", "trainer.max_iters=2"]


def _other_model_checkpoint(tmp_path: Path) -> Path:
    cfg = compose_config([*TINY, "model=segnet_basic"])
    path = tmp_path / "segnet.pt"
    torch.save({"model": build_model(cfg).state_dict(), "iteration": 5,
                "config": OmegaConf.to_yaml(cfg)}, path)
    return path


def _assert_one_line(proc: subprocess.CompletedProcess, *names: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    # before it only the progress bar (tqdm writes to stderr); the message: 1 or 2 lines
    assert len(errors) == 1 and len(lines) - errors[0] <= 2, proc.stderr
    assert all(line.startswith("train:") for line in lines[:errors[0]]), proc.stderr
    for name in names:
        assert name in proc.stderr, (name, proc.stderr)


def test_user_errors_end_the_command_in_one_line_without_a_traceback(camvid, tmp_path):
    run = f"hydra.run.dir={tmp_path / 'run'}"
    missing = tmp_path / "no_such_root"
    _assert_one_line(_segtrain(*_camvid_args(missing), run), str(missing), "does not exist")
    _assert_one_line(_segtrain(*TINY, "trainer.precision=fp8", run), "trainer.precision",
                     "fp8")
    _assert_one_line(_segtrain(*TINY, f"trainer.resume={tmp_path / 'gone'}", run),
                     "checkpoint not found", str(tmp_path / "gone"))
    other = _other_model_checkpoint(tmp_path)
    proc = _segtrain(*TINY, f"trainer.resume={other}", run)
    _assert_one_line(proc, str(other), "SegNetBasic", "DeepLabV2", "missing key",
                     "backbone.conv1.weight")
    # HYDRA_FULL_ERROR=1 still shows where it came from
    full = _segtrain(*TINY, "trainer.precision=fp8", run,
                     env={**ENV, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr


def test_a_corrupt_file_is_named_in_one_line_even_from_a_loader_worker(camvid, tmp_path):
    bad = camvid / "val" / "0001TP_val_0001.png"
    good = bad.read_bytes()
    try:
        bad.write_bytes(good[:40])  # a truncated PNG
        proc = _segtrain(*_camvid_args(camvid), f"hydra.run.dir={tmp_path / 'run'}")
    finally:
        bad.write_bytes(good)
    _assert_one_line(proc, "cannot read image file", str(bad))


def test_a_sweep_with_one_bad_job_runs_the_others_and_reports_the_failed_one(tmp_path):
    proc = _segtrain("-m", *TINY, "trainer.max_iters=1", "trainer.eval_interval=1",
                     "trainer.precision=fp32,fp8", f"hydra.sweep.dir={tmp_path}",
                     "hydra.sweep.subdir=${hydra.job.num}")
    assert proc.returncode == 1
    assert "fp8" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads((tmp_path / "0" / "metrics.json").read_text())["finished"] is True
    assert "trainer.precision='fp8': expected one of" in \
        (tmp_path / "1" / "train.log").read_text()


# -- a data error mid-run ----------------------------------------------------------------
def test_a_data_error_mid_run_saves_the_last_completed_step(tiny_cfg, tmp_path, monkeypatch):
    common = ("trainer.checkpoint_interval=100", "trainer.eval_interval=100",
              "model.dropout=0.5")
    train(tiny_cfg(*common), tmp_path / "full")

    real_load, reads = synthetic.SyntheticShapes.load, []

    def load(self, index):
        if self.split == "train":
            reads.append(index)
            # the start reads the first sample (app.check_first_samples), then batch 2:
            # iteration 4 reads the 7th and 8th samples of the stream
            if len(reads) == 1 + 7:
                raise DatasetError("cannot read image file /data/broken/0007.png: truncated")
        return real_load(self, index)

    monkeypatch.setattr(synthetic.SyntheticShapes, "load", load)
    run = tmp_path / "broken"
    with pytest.raises(DatasetError) as err:
        train(tiny_cfg(*common), run)
    message = str(err.value)
    assert "/data/broken/0007.png" in message
    assert f"saved {run / 'checkpoints' / 'last.pt'} at iteration 3" in message
    assert checkpoint.load(run)["iteration"] == 3
    # last.pt is the state after iteration 3: resuming reaches the uninterrupted weights
    monkeypatch.setattr(synthetic.SyntheticShapes, "load", real_load)
    train(tiny_cfg(*common, "trainer.resume=auto"), run)
    a, b = checkpoint.load(tmp_path / "full")["model"], checkpoint.load(run)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- unfinished runs never report a final score -------------------------------------------
def test_a_stopped_run_is_marked_unfinished_and_reports_no_score(tiny_cfg, tmp_path,
                                                                 monkeypatch):
    real_step = Trainer._step

    def step(self, batches):
        if self.iteration == 4:  # the signal SLURM sends before a time limit
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "_step", step)
    result = train(tiny_cfg(), tmp_path)
    assert result["status"] == "stopped" and result["finished"] is False
    assert result["stop_signal"] == signal.SIGUSR2
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["iteration"] == 3  # the scores of the evaluation at iteration 3 ...
    assert saved["finished"] is False and saved["status"] == "stopped"  # ... not final
    assert saved["stopped_at"] == 5
    assert checkpoint.load(tmp_path)["iteration"] == 5
    # what the Hydra job returns to a sweep: a score only for a finished run
    monkeypatch.setattr(entry, "HydraConfig", _FakeHydraConfig)
    monkeypatch.setattr(_FakeHydraConfig, "output_dir", str(tmp_path / "main"))
    monkeypatch.setattr(entry, "train", lambda cfg, out: result)
    monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
    with pytest.raises(SystemExit) as exit_:  # 128 + the signal, as a shell reports it
        entry.main.__wrapped__(tiny_cfg())
    assert exit_.value.code == 128 + signal.SIGUSR2
    monkeypatch.setattr(entry, "train", lambda cfg, out: {"miou": 0.5, "finished": False})
    assert entry.main.__wrapped__(tiny_cfg()) is None
    monkeypatch.setattr(entry, "train", lambda cfg, out: {"miou": 0.5, "finished": True})
    assert entry.main.__wrapped__(tiny_cfg()) == 0.5


class _FakeHydraConfig:
    output_dir = "."

    @classmethod
    def get(cls):
        return OmegaConf.create({"runtime": {"output_dir": cls.output_dir}, "sweeper": {},
                                 "overrides": {"task": []}})


# -- preemption end to end through the submitit local launcher ---------------------------
def _pid_writing(log_file: Path) -> int | None:
    """The process that has ``log_file`` open (the sweep job's task process)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == str(log_file):
                    return int(proc.name)
        except OSError:
            continue
    return None


@pytest.mark.slow  # a submitit job signalled, requeued and resumed: 30 s on an idle machine
def test_a_preempted_sweep_job_is_requeued_and_ends_with_uninterrupted_weights(tmp_path,
                                                                               one_thread):
    sweep = tmp_path / "sweep"
    overrides = [*TINY, "trainer.resume=auto", "trainer.max_iters=8",
                 "trainer.checkpoint_interval=1", "trainer.eval_interval=4",
                 "model.dropout=0.5", "trainer.log_interval=1"]
    cmd = [sys.executable, "-m", "segtrain", "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.timeout_min=10", *overrides, f"hydra.sweep.dir={sweep}",
           "hydra.sweep.subdir=${hydra.job.num}"]
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    job = sweep / "0"
    signalled_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and signalled_at is None:
            try:
                reached = checkpoint.load(job)["iteration"]
            except checkpoint.CheckpointError:
                reached = 0
            pid = _pid_writing(job / "train.log") if reached >= 2 else None
            if pid is not None:
                os.kill(pid, signal.SIGUSR2)  # SLURM's warning before a time limit
                signalled_at = reached
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.perf_counter() - tic
    # the uninterrupted job: the same config, in this process, with the job's one intra-op
    # thread (ENV's OMP_NUM_THREADS=1): a float sum split over 2 threads rounds differently
    assert torch.get_num_threads() == 1
    reference = train(compose_config(overrides), tmp_path / "reference")
    assert signalled_at is not None and signalled_at < 8, "the job was not signalled midway"
    assert proc.returncode == 0, out
    log = (job / "train.log").read_text()
    stopped = [line for line in log.splitlines() if "signal 12 received" in line]
    assert stopped and "resumed from" in log, log
    stop_iter = int(stopped[0].split("at iteration ")[1].split(";")[0])
    assert f"at iteration {stop_iter}" in log.split("resumed from")[1].splitlines()[0]
    a = checkpoint.load(job)["model"]
    b = checkpoint.load(tmp_path / "reference")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    saved = json.loads((job / "metrics.json").read_text())
    assert saved["finished"] is True and saved["iteration"] == 8
    assert saved["miou"] == reference["miou"]
    print(f"requeue sweep: {elapsed:.1f} s, signalled at iteration {signalled_at}, "
          f"stopped at {stop_iter}")


# -- the dataset checker -----------------------------------------------------------------
def test_check_dataset_lists_every_problem_with_counts(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root, {"train": 3, "val": 2, "test": 1})
    broken = root / "train" / "0001TP_train_0001.png"
    broken.write_bytes(b"not a png")
    from PIL import Image

    out_of_range = root / "valannot" / "0001TP_val_0000.png"
    label = torch.full((36, 48), 40, dtype=torch.uint8).numpy()
    Image.fromarray(label).save(out_of_range)
    proc = run_script(REPO / "scripts/check_dataset.py", "dataset=camvid",
                      f"dataset.root={root}", "--workers", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 problem(s)" in proc.stdout
    assert "unreadable file: 1" in proc.stdout and str(broken) in proc.stdout
    assert "label value out of range: 1" in proc.stdout and str(out_of_range) in proc.stdout
    assert "camvid test: 1 samples" in proc.stdout  # the test split is read too
    broken.unlink()
    (root / "train.txt").write_text("".join(line + "\n" for line in (
        root / "train.txt").read_text().splitlines() if "0001TP_train_0001" not in line))
    Image.fromarray(label % 11).save(out_of_range)
    ok = run_script(REPO / "scripts/check_dataset.py", "dataset=camvid", f"dataset.root={root}",
                    "--workers", "2")
    assert ok.returncode == 0 and "no problems" in ok.stdout, ok.stdout + ok.stderr
