"""Shared test helpers: compose the real configs and shrink them to CPU-sized runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# A training run small enough for a unit test: tiny images, a handful of iterations.
TINY = [
    "dataset.image_size=32",
    "dataset.train.num_samples=16",
    "dataset.val.num_samples=4",
    "trainer.max_iters=6",
    "trainer.global_batch_size=2",
    "trainer.num_workers=0",
    "trainer.eval_interval=3",
    "trainer.log_interval=2",
    "trainer.checkpoint_interval=3",
    "trainer.device=cpu",
    "trainer.resume=null",
]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides, as ``python -m segtrain`` would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def pytest_configure(config):
    """Under pytest-xdist (``make test``) each worker process uses one intra-op thread: the
    workers already fill the cores, and two threads per worker on top of them thrash."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on 2 shared cores, two threads per process thrash."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def real_camvid() -> Path:
    """The real CamVid as SegNet distributes it (train 367, val 101 images), the one place the
    tests look for data outside the repository: ``$SEGTRAIN_CAMVID``, else a ``shared/data/
    camvid`` folder beside the checkout. Tests that need it are skipped where it is absent."""
    root = Path(os.environ.get("SEGTRAIN_CAMVID") or REPO.parent / "shared" / "data" / "camvid")
    if not (root / "train").is_dir():
        pytest.skip(f"no real CamVid at {root} (set SEGTRAIN_CAMVID)")
    return root


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str) -> DictConfig:
        return compose_config(TINY + list(overrides))

    return make


def slurm_sbatch_script(overrides: list[str], folder: Path, monkeypatch) -> str:
    """The sbatch script submitit would write for ``hydra/launcher=slurm`` plus ``overrides``
    (no cluster needed), with the parameter mapping of the plugin's BaseSubmititLauncher."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import SlurmExecutor

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", *overrides])
    params = instantiate(cfg.hydra.launcher).params
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    executor = submitit.AutoExecutor(cluster="slurm", folder=folder,
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("max_num_timeout", "submitit_folder")})
    return executor._executor._make_submission_file_text("python -m x", "uid")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (``make test-gpu``) skip cleanly where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def plain_groups(model: torch.nn.Module) -> list[dict]:
    """``model``'s optimizer groups (its roles x kinds) under the plain policy of
    conf/optim/paramwise/torch.yaml: for tests of which parameters land in which group."""
    from omegaconf import OmegaConf

    from segtrain.models.param_groups import Paramwise, optimizer_groups

    policy = Paramwise.from_mapping(OmegaConf.load(CONF_DIR / "optim/paramwise/torch.yaml"))
    return optimizer_groups(model, model.head_modules(), policy)


def model_from_yaml(name: str, num_classes: int, **override) -> torch.nn.Module:
    """``conf/model/<name>.yaml`` built as the paper configures it, ``override`` keys set;
    under ``with torch.device("meta")`` it allocates nothing (parameter counts)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    cfg.pop("defaults")  # the optimizer policy it picks, not a constructor argument
    cfg.num_classes = num_classes
    for key, value in override.items():
        cfg[key] = value
    return instantiate(cfg)


class OneConv(torch.nn.Module):
    """The smallest segmentation model for trainer tests: a 1x1 convolution, 3 -> 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {"out": self.conv(x)}
