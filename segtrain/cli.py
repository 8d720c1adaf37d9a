"""What the command-line entry points share: a ``UserError`` becomes one line, not a traceback.

``python -m segtrain``, ``segtrain.evaluate``, ``segtrain.predict`` and ``segtrain.export`` run
their body in ``user_errors()``. The only segtrain module besides the entry points themselves
that knows Hydra's run modes; ``segtrain.errors`` stays free of Hydra.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import OmegaConf

from segtrain.config_schema import dotted_keys, unknown_key
from segtrain.errors import UserError, from_worker, plain_message

log = logging.getLogger("segtrain")


class FailedJobError(CompactHydraException):
    """A sweep job's ``UserError``: Hydra reports a ``CompactHydraException`` at the end of
    the sweep by its message alone, without a traceback."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Around the body of a Hydra entry point: a ``UserError`` ends a single run with its
    message on stderr and exit status 1, no traceback. In a sweep it is logged in the job's
    log and re-raised as a ``FailedJobError``, so Hydra records that job as failed, runs the
    others, and names the failed job's overrides and message at the end.
    A Ctrl-C that reaches it (a KeyboardInterrupt: training handles the first one itself)
    ends with one line and status 130. ``HYDRA_FULL_ERROR=1`` re-raises the original error
    to show its traceback."""
    try:
        yield
    except UserError as err:
        message = plain_message(err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("%s", message)
            raise FailedJobError(str(from_worker(err))) from None
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        sys.exit(getattr(err, "exit_status", 1))
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write("error: interrupted (Ctrl-C)\n")
        sys.exit(130)


#: Hydra flags after which the command composes no run config of ours (or another one)
_NOT_A_RUN = ("help", "hydra_help", "version", "shell_completion", "config_path",
              "config_name", "config_dir", "experimental_rerun", "info")


def check_override_keys(argv: list[str], config_dir: Path, config_name: str) -> None:
    """Before Hydra composes ``config_name`` from the command line ``argv``: a ``key=value``
    whose key the composed config lacks ends the command with one ``error:`` line naming the
    nearest existing key (Hydra's own message advises ``+key=value``, which adds a key that
    nothing reads). Where a swept group's options differ (``-m model=unet,deeplabv2``), a
    key one of them has is accepted. ``+key``/``++key`` are the schema's to refuse
    (``config_schema.check(strict=True)``); anything else Hydra reports as usual."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, OverrideType

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # noqa: BLE001 - Hydra reports a command line it cannot parse
        return
    if any(getattr(args, flag, None) for flag in _NOT_A_RUN):
        return
    parsed = [o for o in parsed if not o.is_hydra_override()]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups, checked, added = [], [], []
        for o in parsed:
            if loader.get_group_options(o.key_or_group) and not isinstance(o.value(), dict):
                groups.append(o)
            elif o.type == OverrideType.CHANGE and "[" not in o.key_or_group:
                checked.append(o)
            elif o.type in (OverrideType.ADD, OverrideType.FORCE_ADD):
                added.append(o.key_or_group)
        if not checked:
            return
        swept = [o for o in groups if o.is_sweep_override()]
        if any(not isinstance(o.value(), ChoiceSweep) for o in swept):
            return  # a glob over options: Hydra expands it

        def composed(choice: dict[int, Any]) -> Any:
            lines = [f"{o.get_key_element()}={choice.get(i, o.value().list[0])}"
                     if o.is_sweep_override() else o.input_line for i, o in enumerate(groups)]
            try:
                return OmegaConf.to_container(compose(config_name, overrides=lines),
                                              resolve=False)
            except Exception:  # noqa: BLE001 - Hydra reports what it cannot compose
                return None

        first = composed({})
        if first is None:
            return
        # the other options of each swept group, composed only when a key is missing
        others = ({groups.index(o): value} for o in swept for value in o.value().list[1:])
        configs = [first]
        for o in checked:
            key = o.key_or_group
            if any(key == a or key.startswith(a + ".") for a in added):
                continue
            while not any(_has_key(c, key) for c in configs if c is not None):
                more = next(others, None)
                if more is None:
                    message = unknown_key(key, o.input_line.split("=", 1)[1],
                                          dotted_keys(first))
                    sys.stderr.write(f"error: {message}\n")
                    sys.exit(1)
                configs.append(composed(more))


def _has_key(tree: Any, key: str) -> bool:
    for part in key.split("."):
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return False
    return True


def exit_stopped(signum: int | None) -> None:
    """A run stopped by a signal at a step boundary (its last.pt saved, the trainer logged
    the one line saying so) ends the process. The signal first goes on to the handler the
    trainer had replaced (not SIGINT's: Python's raises KeyboardInterrupt): submitit's
    requeues the job and exits itself. Then exit with status 1 and no result under submitit,
    so that the launcher waits for the job SLURM requeues (trainer.resume=auto); else with
    128 + the signal's number, as a shell reports a process that a signal ended (Ctrl-C:
    130), which also ends a local sweep instead of starting its next job."""
    handler = signal.getsignal(signum) if signum is not None else None
    if signum != signal.SIGINT and callable(handler):
        handler(signum, None)
    if os.environ.get("SUBMITIT_FOLDER"):
        log.warning("exiting without a result; the requeued job resumes from last.pt")
        sys.exit(1)
    sys.exit(128 + (signum or 15))
