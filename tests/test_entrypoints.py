"""The command-line entries end to end on a tiny trained run: ``segtrain.evaluate``
(whole, MSC, MSC + CRF, a multirun over eval options), ``segtrain.predict`` (label, colour
and overlay PNGs), their errors, and the SLURM launcher config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from segtrain.app import build_model
from segtrain.core.checkpoint import CheckpointError
from segtrain.data.synthetic import PALETTE, render
from segtrain.evaluate import RunError, evaluate
from segtrain.predict import PredictError, predict
from tests.cli_in_process import run_module
from tests.conftest import CONF_DIR, REPO, TINY, slurm_sbatch_script

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
IMAGE_SIZES = {"b_shapes.png": (36, 44), "a_shapes.png": (30, 25)}  # name: (height, width)


def _run(*args: str) -> subprocess.CompletedProcess:
    """``python -m <module> ...`` in this process (tests/cli_in_process.py), a script in a
    new one."""
    if args[0] == "-m":
        return run_module(args[1], *args[2:])
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def _ok(*args: str) -> subprocess.CompletedProcess:
    proc = _run(*args)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _compose(config_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny training run through the CLI, so the folder has .hydra/ like a real one."""
    run = tmp_path_factory.mktemp("entry") / "run"
    _ok("-m", "segtrain", *TINY, f"hydra.run.dir={run}")
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "checkpoints" / "best.pt").is_file()
    return run


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, (name, (h, w)) in enumerate(IMAGE_SIZES.items()):
        image, _ = render(500 + i, max(h, w), 3)
        Image.fromarray(image[:h, :w]).save(folder / name)
    (folder / "notes.txt").write_text("not an image")  # skipped, not an error
    return folder


def _light_run(run_dir: Path, target: Path, *, best: bool = True, hydra: bool = True) -> Path:
    """A run folder sharing the trained checkpoints through symlinks, minus some parts."""
    (target / "checkpoints").mkdir(parents=True)
    names = ["last.pt"] + (["best.pt"] if best else [])
    for name in names:
        (target / "checkpoints" / name).symlink_to(run_dir / "checkpoints" / name)
    if hydra:
        (target / ".hydra").symlink_to(run_dir / ".hydra")
    return target


# -- evaluate ------------------------------------------------------------------------------
def test_evaluate_msc_prints_the_table_and_writes_json(run_dir):
    proc = _ok("-m", "segtrain.evaluate", f"run={run_dir}", "eval=msc", "num_workers=0")
    assert "background" in proc.stdout and "miou" in proc.stdout
    result = json.loads((run_dir / "eval_msc.json").read_text())
    assert 0.0 <= result["miou"] <= 1.0
    assert result["eval"] == "msc" and result["checkpoint"].endswith("best.pt")
    assert result["eval_config"]["predictor"]["scales"] == [0.5, 0.75, 1.0]
    assert result["eval_config"]["predictor"]["flip"] is False  # DeepLab v2: no flipping
    assert result["eval_config"]["crf"] is None
    # synthetic masks have no ignore pixels: the matrix counts every val pixel
    assert np.array(result["confusion_matrix"]).sum() == 4 * 32 * 32
    assert (run_dir / "eval_msc_samples.png").is_file()
    logs = list((run_dir / "eval").glob("*_msc/evaluate.log"))
    assert logs, "Hydra's folder for the call should be inside the run folder"


def test_evaluate_multirun_whole_reproduces_training_and_msc_crf_runs(run_dir):
    _ok("-m", "segtrain.evaluate", "-m", f"run={run_dir}", "eval=whole,msc_crf",
        "num_workers=0")
    whole = json.loads((run_dir / "eval_whole.json").read_text())
    crf = json.loads((run_dir / "eval_msc_crf.json").read_text())
    # best.pt was scored by the trainer with eval=whole on the same val set
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    assert whole["iteration"] == best["iteration"]
    assert whole["miou"] == pytest.approx(best["metrics"]["miou"], abs=1e-9)
    assert crf["eval_config"]["crf"]["_target_"] == "segtrain.eval.crf.DenseCRF"
    assert crf["eval_config"]["crf"]["bi_xy_std"] == 67  # the released DeepLab v2 value
    assert 0.0 <= crf["miou"] <= 1.0
    assert np.array(crf["confusion_matrix"]).sum() == 4 * 32 * 32
    assert len(list((run_dir / "eval").glob("multirun_*/*_msc_crf"))) == 1


def test_evaluate_in_process_with_dataset_override_and_fallbacks(run_dir, tmp_path):
    # no best.pt (the run never evaluated) and no .hydra/: last.pt and its stored config
    light = _light_run(run_dir, tmp_path / "light", best=False, hydra=False)
    cfg = _compose("evaluate", f"run={light}", "num_workers=0", "device=cpu",
                   "dataset.val.split=test", "+dataset.val.num_samples=2")
    result = evaluate(cfg, "whole")
    assert result["checkpoint"].endswith("last.pt") and result["iteration"] == 6
    assert result["split"] == "test" and result["num_images"] == 2
    assert np.array(result["confusion_matrix"]).sum() == 2 * 32 * 32
    # the file names the checkpoint it scored: last.pt, not the run's best
    assert json.loads((light / "eval_whole_last.json").read_text())["split"] == "test"
    assert not (light / "eval_whole.json").exists()


def test_evaluate_errors_are_clear(run_dir, tmp_path):
    with pytest.raises(RunError, match="run folder not found"):
        evaluate(_compose("evaluate", f"run={tmp_path / 'nope'}"), "whole")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="is not a training run folder"):
        evaluate(_compose("evaluate", f"run={tmp_path / 'empty'}"), "whole")
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    (no_checkpoint / ".hydra").symlink_to(run_dir / ".hydra")
    with pytest.raises(CheckpointError, match="neither checkpoints/best.pt nor"):
        evaluate(_compose("evaluate", f"run={no_checkpoint}"), "whole")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*other.pt"):
        evaluate(_compose("evaluate", f"run={run_dir}", f"checkpoint={tmp_path / 'other.pt'}"),
                 "whole")
    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "iteration": 1}, bare / "checkpoints" / "last.pt")
    with pytest.raises(RunError, match="has no config"):
        evaluate(_compose("evaluate", f"run={bare}"), "whole")
    # through the CLI the message reaches the user too
    proc = _run("-m", "segtrain.evaluate", f"run={tmp_path / 'nope'}")
    assert proc.returncode != 0 and "run folder not found" in proc.stderr
    assert not (tmp_path / "nope").exists(), "Hydra's log folder made a mistyped run folder"


# -- predict -------------------------------------------------------------------------------
def _check_predictions(out: Path, image_dir: Path) -> dict[str, np.ndarray]:
    labels = {}
    for name, (h, w) in IMAGE_SIZES.items():
        stem = Path(name).stem
        label = np.asarray(Image.open(out / "labels" / f"{stem}.png"))
        color = np.asarray(Image.open(out / "color" / f"{stem}.png"))
        over = np.asarray(Image.open(out / "overlay" / f"{stem}.png"))
        rgb = np.asarray(Image.open(image_dir / name))
        assert label.shape == (h, w) and label.dtype == np.uint8
        assert label.max() < len(PALETTE)
        assert color.shape == (h, w, 3) and np.array_equal(color, PALETTE[label])
        blend = np.round(0.5 * rgb.astype(np.float32) + 0.5 * PALETTE[label]).astype(np.uint8)
        assert np.abs(over.astype(int) - blend).max() <= 1
        labels[stem] = label
    assert not (out / "labels" / "notes.png").exists()
    return labels


def _reference_labels(run_dir: Path, image_dir: Path) -> dict[str, np.ndarray]:
    """argmax of the model on the image normalised by hand (synthetic: mean .5, std .25)."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    model = build_model(cfg)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt",
                                     weights_only=False)["model"])
    model.eval()
    out = {}
    for name in IMAGE_SIZES:
        rgb = np.asarray(Image.open(image_dir / name)).astype(np.float32) / 255.0
        x = torch.from_numpy((rgb - 0.5) / 0.25).permute(2, 0, 1)[None]
        with torch.no_grad():
            out[Path(name).stem] = model(x)["out"].argmax(1)[0].numpy().astype(np.uint8)
    return out


def test_predict_writes_labels_colours_and_overlays(run_dir, image_dir, tmp_path):
    out = tmp_path / "pred"
    proc = _ok("-m", "segtrain.predict", f"run={run_dir}", f"images={image_dir}", f"out={out}")
    labels = _check_predictions(out, image_dir)
    assert (out / "predict.log").is_file()
    assert "a_shapes.png 25x30" in proc.stderr + proc.stdout + (out / "predict.log").read_text()
    reference = _reference_labels(run_dir, image_dir)
    for stem, label in labels.items():
        assert np.array_equal(label, reference[stem]), f"{stem}: not the model's prediction"


class RedBins(torch.nn.Module):
    """Labels each pixel by the nearest of 6 bins of its *normalised* red value, so the
    prediction shows whether the run's normalisation was applied."""

    centres = torch.linspace(-2.0, 2.0, 6)  # (r/255 - 0.5) / 0.25 spans -2..2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        red = x[:, :1]
        return {"out": -(red - self.centres.view(1, -1, 1, 1)) ** 2}


def test_predict_applies_the_run_normalisation(run_dir, image_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("segtrain.runs.build_model", lambda *a, **k: RedBins())
    out = tmp_path / "bins"
    predict(_compose("predict", f"run={run_dir}", f"images={image_dir}", f"out={out}",
                     "device=cpu"))
    labels = _check_predictions(out, image_dir)
    for name in IMAGE_SIZES:
        red = np.asarray(Image.open(image_dir / name))[..., 0].astype(np.float64)
        expected = np.rint((4 * red / 255 - 2 + 2) / 0.8).astype(np.uint8)
        assert len(np.unique(expected)) > 2
        assert np.array_equal(labels[Path(name).stem], expected)


@pytest.mark.parametrize("eval_name", ["msc", "msc_crf"])
def test_predict_with_other_eval_options(run_dir, image_dir, tmp_path, eval_name):
    out = tmp_path / eval_name
    cfg = _compose("predict", f"run={run_dir}", f"images={image_dir}", f"out={out}",
                   f"eval={eval_name}", "device=cpu")
    written = predict(cfg)
    assert [p.name for p in written] == ["a_shapes.png", "b_shapes.png"]  # sorted
    _check_predictions(out, image_dir)


def test_predict_errors_are_clear(run_dir, tmp_path):
    def cfg(folder: Path):
        return _compose("predict", f"run={run_dir}", f"images={folder}",
                        f"out={tmp_path / 'out'}", "device=cpu")

    with pytest.raises(PredictError, match="missing: no such file or folder"):
        predict(cfg(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(PredictError, match="no images in"):
        predict(cfg(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(PredictError, match="1 of 1 images could not be labelled .*"
                                           "cannot read image file .*broken.png"):
        predict(cfg(bad))
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("x.png", "x.jpg"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(twins / name)
    with pytest.raises(PredictError, match="would both be written as x.png"):
        predict(cfg(twins))


# -- SLURM launcher ------------------------------------------------------------------------
def test_slurm_launcher_composes_with_one_task_per_gpu():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and "SlurmLauncher" in launcher._target_
    assert launcher.tasks_per_node == 4 and launcher.partition is None
    assert launcher.max_num_timeout > 0 and launcher.timeout_min > 0


def test_slurm_launcher_sbatch_script(monkeypatch, tmp_path):
    """The sbatch script submitit would write, built from our config (no cluster needed)."""
    script = slurm_sbatch_script(["hydra.launcher.gpus_per_node=2"], tmp_path, monkeypatch)
    for line in ("--gpus-per-node=2", "--ntasks-per-node=2", "--requeue", "--signal=USR2@120",
                 "--time=1440"):
        assert f"#SBATCH {line}" in script


def test_slurm_launcher_in_the_cli_config():
    # --cfg hydra prints the composed Hydra config and runs nothing
    proc = _ok("-m", "segtrain", "--cfg", "hydra", "--resolve", "hydra/launcher=slurm")
    assert "hydra_submitit_launcher" in proc.stdout
    assert "tasks_per_node: 1" in proc.stdout and "max_num_timeout: 20" in proc.stdout
