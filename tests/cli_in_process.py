"""``python -m <entry point> <args>`` run in the test's own process: the same ``main`` the
command runs (Hydra's argument parsing, segtrain's ``user_errors``, the exit status), without
starting an interpreter and importing torch again (4-8 s a command on the 2-core machine).

Tests whose subject is the process itself (a signal, a kill, an environment variable read at
start, a torchrun/SLURM launch) keep a real subprocess."""

from __future__ import annotations

import contextlib
import io
import logging
import runpy
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def _process_state_kept():
    """What a command changes in its process and a test worker must get back: Hydra's
    singletons, the logging tree Hydra configures per job, signal handlers, ``sys.argv``."""
    argv = sys.argv
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    root = logging.getLogger()
    root_state = (root.level, root.handlers[:])
    loggers = {name: (lg.level, lg.handlers[:], lg.propagate, lg.disabled)
               for name, lg in logging.Logger.manager.loggerDict.items()
               if isinstance(lg, logging.Logger)}
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    try:
        yield
    finally:
        sys.argv = argv
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for handler in root.handlers[:]:
            if handler not in root_state[1]:
                handler.close()
        root.setLevel(root_state[0])
        root.handlers[:] = root_state[1]
        for name, lg in logging.Logger.manager.loggerDict.items():
            if not isinstance(lg, logging.Logger):
                continue
            if name in loggers:
                lg.level, handlers_, lg.propagate, lg.disabled = loggers[name]
                for handler in lg.handlers[:]:
                    if handler not in handlers_:
                        handler.close()
                lg.handlers[:] = handlers_
            else:
                for handler in lg.handlers[:]:
                    handler.close()
                lg.handlers[:] = []
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` in this process (``runpy``, as ``-m`` runs it: the module as
    ``__main__``); a ``CompletedProcess`` with its exit status and the text it wrote to
    stdout and stderr (through ``sys.stdout``/``sys.stderr``)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _process_state_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = [module, *args]
        try:
            with warnings.catch_warnings():  # the module was imported before: runpy says so
                warnings.filterwarnings("ignore", r".* found in sys.modules", RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def run_script(path: str | Path, *args: str) -> subprocess.CompletedProcess:
    """``python <path> args`` in this process (``runpy.run_path``), as ``run_module``."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _process_state_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = [str(path), *args]
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
    return subprocess.CompletedProcess([str(path), *args], code, out.getvalue(), err.getvalue())
