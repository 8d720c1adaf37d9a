"""Run folders are the user's data: a later start with other settings is refused and leaves
the folder byte-identical, a live run locks its folder, a run whose final evaluation failed
is scored when resumed, an evaluation never replaces the run's own results with a foreign
checkpoint's, and ``run=`` at something that is not a run writes nothing. Through the real
commands (``python -m segtrain``, ``segtrain.evaluate``, ``segtrain.predict``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.app import train
from segtrain.eval.evaluator import Evaluator
from tests.cli_in_process import run_module
from tests.conftest import REPO, TINY

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ENV.pop("HYDRA_FULL_ERROR", None)
# two iterations, one evaluation at the end
SHORT = [*TINY, "trainer.max_iters=2", "trainer.eval_interval=2",
         "trainer.checkpoint_interval=2", "trainer.log_interval=1"]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command in this process (tests/cli_in_process.py); in a new one where it must
    read another environment."""
    if env is None:
        return run_module(*args)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() and not p.is_symlink()
            else b"<dir>" for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    proc = _run("segtrain", *SHORT, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    return run


# -- a later start ---------------------------------------------------------------------------
def test_a_start_with_other_settings_is_refused_and_leaves_the_folder_byte_identical(
        finished_run):
    before = _snapshot(finished_run)
    proc = _run("segtrain", *SHORT, "dataset.image_size=24", "model=segnet_basic",
                f"hydra.run.dir={finished_run}")
    line = _one_line_error(proc, "dataset.image_size: 32 -> 24", "model._target_",
                           "holds a run with other settings")
    assert "nothing to do" not in proc.stderr + proc.stdout
    assert _snapshot(finished_run) == before, line
    # the run can still be evaluated as it was trained
    proc = _run("segtrain.evaluate", f"run={finished_run}", "num_workers=0", "device=cpu",
                "name=after_refusal")
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((finished_run / "metrics.json").read_text())
    scored = json.loads((finished_run / "eval_after_refusal.json").read_text())
    assert scored["miou"] == pytest.approx(saved["miou"], abs=1e-9)


def test_the_same_start_again_keeps_the_saved_config_and_leaves_no_lock(finished_run):
    hydra_files = {p.name: p.read_bytes() for p in (finished_run / ".hydra").iterdir()}
    proc = _run("segtrain", *SHORT, f"hydra.run.dir={finished_run}", "trainer.resume=auto",
                "trainer.num_workers=0")
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.read_bytes() for p in (finished_run / ".hydra").iterdir()} == hydra_files
    assert not (finished_run / ".lock").exists()


def test_a_run_whose_final_evaluation_failed_is_scored_when_resumed(tiny_cfg, tmp_path,
                                                                    monkeypatch):
    real_run = Evaluator.run

    def failing(self, model, device):
        raise RuntimeError("the evaluation died (out of memory, say)")

    monkeypatch.setattr(Evaluator, "run", failing)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation died"):
        train(tiny_cfg("trainer.max_iters=2", "trainer.eval_interval=2"), run)
    assert torch.load(run / "checkpoints" / "last.pt")["iteration"] == 2
    assert not (run / "metrics.json").exists()
    monkeypatch.setattr(Evaluator, "run", real_run)
    metrics = train(tiny_cfg("trainer.max_iters=2", "trainer.eval_interval=2",
                             "trainer.resume=auto"), run)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["finished"] and saved["iteration"] == 2
    assert metrics["miou"] == saved["miou"]
    assert [h["iteration"] for h in torch.load(run / "checkpoints" / "last.pt")["history"]] == [2]
    assert (run / "checkpoints" / "best.pt").is_file()


# -- the lock --------------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from segtrain.run_start import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_live_run_folder_is_locked_and_a_dead_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = _run("segtrain", *SHORT, f"hydra.run.dir={run}")
        _one_line_error(proc, f"in use by process {holder.pid} on host {socket.gethostname()}")
        assert not (run / ".hydra").exists() and not (run / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").exists()  # a killed holder leaves its file; the kernel its lock
    proc = _run("segtrain", *SHORT, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert (run / "metrics.json").is_file() and not (run / ".lock").exists()


# -- evaluate ----------------------------------------------------------------------------
def test_a_foreign_checkpoint_never_replaces_the_runs_own_results(finished_run, tmp_path):
    proc = _run("segtrain.evaluate", f"run={finished_run}", "num_workers=0", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    own = (finished_run / "eval_whole.json").read_bytes()
    foreign = tmp_path / "elsewhere" / "best.pt"
    foreign.parent.mkdir()
    state = torch.load(finished_run / "checkpoints" / "best.pt")
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    torch.save(state, foreign)
    proc = _run("segtrain.evaluate", f"run={finished_run}", f"checkpoint={foreign}",
                "num_workers=0", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert (finished_run / "eval_whole.json").read_bytes() == own
    written = [p for p in finished_run.glob("eval_whole_best_*.json")]
    assert len(written) == 1
    result = json.loads(written[0].read_text())
    assert result["checkpoint"] == str(foreign) and result["own_checkpoint"] is False


def test_a_name_with_a_path_is_refused_before_any_work(finished_run, tmp_path):
    proc = _run("segtrain.evaluate", f"run={finished_run}", "name=../../x", "num_workers=0")
    _one_line_error(proc, "name='../../x'")
    assert "miou" not in proc.stdout  # refused before the evaluation, not after
    assert not list(finished_run.parent.parent.glob("x*"))


@pytest.mark.parametrize("module", ["segtrain.evaluate", "segtrain.predict"])
def test_run_at_a_folder_that_is_not_a_run_writes_nothing_there(module, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = _snapshot(folder)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    extra = [f"images={images}"] if module == "segtrain.predict" else []
    proc = _run(module, f"run={folder}", *extra)
    _one_line_error(proc, "is not a training run folder")
    assert _snapshot(folder) == before


def test_the_fallback_log_folder_is_private_and_follows_no_planted_link(tmp_path):
    shared_tmp, victim = tmp_path / "tmp", tmp_path / "victim"
    shared_tmp.mkdir()
    victim.mkdir()
    for name in ("segtrain_missing_run", "segtrain_no_run"):  # the old fixed name, and a guess
        (shared_tmp / name).symlink_to(victim)
    proc = _run("segtrain.evaluate", f"run={tmp_path / 'nope'}",
                env={**ENV, "TMPDIR": str(shared_tmp)})
    _one_line_error(proc, "run folder not found")
    assert list(victim.iterdir()) == []
    # the private folder is gone after the command
    assert sorted(p.name for p in shared_tmp.iterdir()) == ["segtrain_missing_run",
                                                            "segtrain_no_run"]


# -- the config schema on every route into a saved run -------------------------------------
@pytest.mark.parametrize("module", ["segtrain.evaluate", "segtrain.predict"])
def test_a_bad_eval_value_is_the_schemas_one_line_error(module, finished_run, tmp_path):
    extra = [f"images={tmp_path}", f"out={tmp_path / 'out'}"] \
        if module == "segtrain.predict" else []
    (tmp_path / "a.png").write_bytes(b"")
    proc = _run(module, f"run={finished_run}", "eval.predictor.mode=foo", *extra)
    _one_line_error(proc, "eval.predictor.mode='foo': expected one of")


def test_the_api_applies_the_schema(finished_run):
    from segtrain import load_run
    from segtrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eval.predictor.mode='foo': expected one of"):
        load_run(finished_run, device="cpu", overrides=["eval.predictor.mode=foo"])


# -- evaluation and prediction inputs --------------------------------------------------------
def test_a_slide_window_larger_than_the_image_scores_as_the_whole_image(finished_run):
    from hydra import compose, initialize_config_dir

    from segtrain.evaluate import evaluate
    from tests.conftest import CONF_DIR

    scores = {}
    for name in ("whole", "slide"):  # slide: 513x513 windows, the images are 32x32
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("evaluate", [f"run={finished_run}", f"eval={name}", "num_workers=0",
                                       "device=cpu", f"name=small_{name}"])
        scores[name] = evaluate(cfg, name)
    assert scores["slide"]["eval_config"]["predictor"]["crop_size"] == [513, 513]
    assert scores["slide"]["confusion_matrix"] == scores["whole"]["confusion_matrix"]
    assert scores["slide"]["miou"] == scores["whole"]["miou"]


def _png(path: Path, size: tuple[int, int] = (20, 12)) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), np.uint8)
                    ).save(path)
    return path


def test_predict_takes_a_file_or_a_glob_and_writes_what_it_can_read(finished_run, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    _png(photos / "a_left.png")
    _png(photos / "b_left.png")
    _png(photos / "c_right.png")
    (photos / "d_left.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "one"
    proc = _run("segtrain.predict", f"run={finished_run}", f"images={photos / 'a_left.png'}",
                f"out={out}", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a_left.png"]
    out = tmp_path / "glob"
    proc = _run("segtrain.predict", f"run={finished_run}", f"images={photos}/*_left.png",
                f"out={out}", "device=cpu")
    line = _one_line_error(proc, "1 of 3 images could not be labelled", "d_left.png")
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a_left.png", "b_left.png"], \
        line


def test_the_api_refuses_empty_huge_and_bomb_images_in_one_line(finished_run, tmp_path):
    import struct
    import zlib

    from segtrain import load_run
    from segtrain.api import InputError
    from segtrain.data.base import DatasetError

    seg = load_run(finished_run, device="cpu")
    with pytest.raises(InputError, match="empty image: 0x0 pixels"):
        seg.predict(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(InputError, match="6000x6000 pixels is too large for whole-image "
                                         "inference .*eval='slide'"):
        seg.predict(np.zeros((6000, 6000, 3), np.uint8))
    # a PNG whose header says 20000 x 20000 (400 megapixels): PIL refuses it unread
    bomb = _png(tmp_path / "bomb.png", (1, 1)).read_bytes()
    ihdr = bomb[12:16] + struct.pack(">II", 20000, 20000) + bomb[24:29]
    bomb = bomb[:8] + bomb[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + bomb[33:]
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(DatasetError, match="bomb.png: .*exceeds limit"):
        seg.predict(tmp_path / "bomb.png")
    # sliding windows bound the network's memory: a large image is taken that way
    wide = seg.predict(np.zeros((40, 5000, 3), np.uint8), eval="slide")
    assert wide.shape == (40, 5000)
    small = load_run(finished_run, device="cpu", max_pixels=100)
    with pytest.raises(InputError, match="20x12 pixels is too large"):
        small.predict(_png(tmp_path / "x.png"))
