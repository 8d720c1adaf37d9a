"""Training entry point.

    python -m segtrain                                   # embedded dataset, default model
    python -m segtrain model=deeplabv2 lr=poly           # DeepLab v2, poly schedule
    python -m segtrain -m model=deeplabv2 lr=poly,step   # a Hydra sweep
    torchrun --nproc_per_node=8 -m segtrain dataset=cityscapes model=deeplabv3plus

A user error (``segtrain.errors.UserError``: data, config, checkpoint) ends the command with
its message on stderr and exit status 1, no traceback (``HYDRA_FULL_ERROR=1`` shows it).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segtrain.app import train
from segtrain.errors import user_errors


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    # the value a Hydra sweeper optimises: only the score of a finished run
    return metrics.get("miou") if metrics.get("finished") else None


if __name__ == "__main__":
    main()
