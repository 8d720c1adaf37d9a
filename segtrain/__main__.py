"""Training entry point.

    python -m segtrain                                   # embedded dataset, default model
    python -m segtrain model=deeplabv2 lr=poly           # DeepLab v2, poly schedule
    python -m segtrain -m model=deeplabv2 lr=poly,step   # a Hydra sweep
    python -m segtrain -m hydra/sweeper=optuna_miou 'optim.lr=tag(log,interval(1e-4,1e-1))'
    torchrun --nproc_per_node=8 -m segtrain dataset=cityscapes model=deeplabv3plus

The run folder is claimed first (``segtrain.run_start``): a folder holding a run with other
settings, or one another process is training in, is refused before anything is written.
A user error (``segtrain.errors.UserError``: data, config, checkpoint) ends the command with
its message on stderr and exit status 1, no traceback (``segtrain.cli``; ``HYDRA_FULL_ERROR=1``
shows it).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segtrain import config_schema
from segtrain.app import CONF_DIR, train
from segtrain.cli import check_override_keys, exit_stopped, user_errors
from segtrain.core.distributed import env_info
from segtrain.errors import ConfigError
from segtrain.run_start import claim, discard_if_refused
from segtrain.sweep_summary import print_unprinted

log = logging.getLogger("segtrain")


def check_sweep_direction(sweeper: DictConfig) -> None:
    """A sweeper that optimises in a ``direction`` (Optuna's) must maximise: this returns
    the validation mIoU, and hydra-optuna-sweeper's own default is ``minimize``."""
    direction = sweeper.get("direction")
    name = str(direction).rsplit(".", 1)[-1]  # Direction.minimize or "minimize"
    if direction is not None and name != "maximize":
        raise ConfigError(f"hydra.sweeper.direction={name}, but the value searched is the "
                          f"validation mIoU (higher is better): use hydra/sweeper=optuna_miou "
                          f"or hydra.sweeper.direction=maximize")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        hydra_cfg, is_main = HydraConfig.get(), env_info().is_main
        # a start refused before training wrote anything takes the folder it made with it
        with discard_if_refused(hydra_cfg.runtime.output_dir, is_main):
            check_sweep_direction(hydra_cfg.sweeper)
            config_schema.check(cfg, strict=True)  # a wrong key or value: before .hydra/
            # settings compared with a run already in the folder, the folder locked, .hydra/
            # written: before anything else touches it
            with claim(cfg, hydra_cfg, is_main=is_main) as run_dir:
                metrics = train(cfg, run_dir)
    if metrics.get("status") == "stopped":
        exit_stopped(metrics["stop_signal"])
    # the value a Hydra sweeper optimises: only the score of a finished run. None is not a
    # score: hydra-optuna-sweeper records it (like an exception) as a FAIL trial, not as 0;
    # segtrain's pruning sweeper reads a pruned trial's end from the study (segtrain.sweeper)
    return metrics.get("miou") if metrics.get("finished") else None


def cli() -> None:
    """``python -m segtrain`` and the ``segtrain`` command: a mistyped key is one line naming
    the nearest existing key (``segtrain.cli.check_override_keys``), then Hydra runs
    ``main``."""
    check_override_keys(sys.argv[1:], CONF_DIR, "config")
    try:
        main()
    finally:  # a sweep whose failed job Hydra re-raised before on_multirun_end
        print_unprinted()


if __name__ == "__main__":
    cli()
