"""One run folder for every rank: a Hydra callback (``hydra.callbacks`` in conf/config.yaml and
conf/evaluate.yaml) that makes ``${now:...}`` read rank 0's clock on every rank.

``torchrun ... -m segtrain`` starts one Hydra per rank, and each names its run folder
(``hydra.run.dir``, ``outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}_...``) from its own clock: ranks
starting in different seconds write to different folders, and ``trainer.resume=auto`` then
looks in the wrong one. Hydra registers ``now`` before composing the config and resolves
``hydra.run.dir`` after ``on_run_start``; there this callback initialises the process group,
takes rank 0's time and registers ``now`` again to return it, whatever the other ranks'
start times. One process: nothing changes.
"""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segtrain.core import distributed


class SharedStartTime(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: ARG002
        if not distributed.env_info().enabled:
            return
        start = distributed.shared_start_time()
        OmegaConf.register_new_resolver("now", lambda pattern: start.strftime(pattern),
                                        use_cache=True, replace=True)
        cache = OmegaConf.get_cache(config)
        cache.pop("now", None)  # a time of this rank's clock resolved while composing
        OmegaConf.set_cache(config, cache)
