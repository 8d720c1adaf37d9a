"""Hydra's entry to segtrain's pruning Optuna sweeper (``hydra/sweeper=optuna_miou``).

Hydra instantiates a sweeper only from a class it found in the ``hydra_plugins`` namespace
package, so this thin class lives here; the work is in ``segtrain.sweeper``, imported at the
sweep (Hydra imports this module at every start, which must stay cheap: no Optuna).
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class PruningOptunaSweeper(Sweeper):
    """hydra-optuna-sweeper's search with a pruner and a resumable study on disk."""

    def __init__(self, **params: Any) -> None:
        from segtrain.sweeper import PruningSweeperImpl

        self.sweeper = PruningSweeperImpl(**params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function,
                           config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
