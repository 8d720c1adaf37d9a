"""A training start's claim on its run folder: nothing a run wrote is rewritten by a later
start, and one process at a time trains in a folder.

``python -m segtrain`` runs the training inside ``claim(cfg, hydra_cfg)`` (rank 0; the other
ranks share rank 0's folder). Before anything is written into the folder:

- a folder that already holds a run (``.hydra/config.yaml`` and a checkpoint or
  ``metrics.json``) is only continued with the same settings: a start whose composed
  config differs (a crop, a model) is refused with one line naming the differing keys,
  and the folder stays byte-identical. Keys that do not change
  what is trained (``RESTART_KEYS``: where and how the process runs) may differ.
- the folder is locked for the life of the process (``.lock``: an ``fcntl`` lock, with the
  holder's PID and host in the file): a second start is refused with one line naming them.
  The kernel drops the lock when the process ends, however it ends, so the file a killed
  process leaves behind does not block the next start; a clean exit removes it.
- a new folder (or one whose start stopped before training wrote anything) gets
  ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, written
  here instead of by Hydra (``hydra.output_subdir: null`` in conf/config.yaml), because
  Hydra writes them when the job starts, before any check could run.
- a start refused before training wrote anything (a config error, a batch larger than the
  split) removes the folder again when this start made it (``NewRunFolder`` records, before
  Hydra makes it, which folders did not exist; ``discard_if_refused`` removes them): no
  empty ``outputs/<date>/<time>`` stays behind, and a folder that was there is never removed.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segtrain.errors import UserError

#: where Hydra's copies of the config live in a run folder (Hydra's default output_subdir)
SAVED = ".hydra"
LOCK = ".lock"
#: the files a start writes into its folder before training does (the log Hydra opens:
#: ``hydra.job.name`` is ``train``)
START_FILES = (f"{SAVED}/config.yaml", f"{SAVED}/hydra.yaml", f"{SAVED}/overrides.yaml",
               "train.log", LOCK)
#: keys a restart may change: they say where and how the process runs, not what it trains
RESTART_KEYS = ("trainer.resume", "trainer.num_workers", "trainer.device",
                "trainer.keep_checkpoints")


class RunFolderError(UserError):
    """A start that would change or share a run folder."""


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def changed_keys(saved: DictConfig, new: DictConfig) -> list[str]:
    """The dotted keys whose (unresolved) values differ, absent on either side included,
    leaving out ``RESTART_KEYS``."""
    old = _leaves(OmegaConf.to_container(saved, resolve=False))
    now = _leaves(OmegaConf.to_container(new, resolve=False))
    missing = object()
    keys = sorted(k for k in old.keys() | now.keys()
                  if old.get(k, missing) != now.get(k, missing)
                  and not k.startswith(RESTART_KEYS))
    return keys


def _show(leaves: dict[str, Any], key: str) -> str:
    return repr(leaves[key]) if key in leaves else "(absent)"


def holds_run(folder: Path) -> bool:
    """Whether training wrote results into ``folder`` (a checkpoint or metrics.json); a
    folder with only ``.hydra/`` is a start that stopped before its first step."""
    return (folder / "metrics.json").is_file() or any((folder / "checkpoints").glob("*.pt"))


def check_settings(folder: Path, cfg: DictConfig) -> None:
    """Refuse ``cfg`` in a folder whose saved run has other settings."""
    saved_file = folder / SAVED / "config.yaml"
    if not saved_file.is_file() or not holds_run(folder):
        return
    saved = OmegaConf.load(saved_file)
    keys = changed_keys(saved, cfg)
    if not keys:
        return
    old = _leaves(OmegaConf.to_container(saved, resolve=False))
    now = _leaves(OmegaConf.to_container(cfg, resolve=False))
    shown = ", ".join(f"{k}: {_show(old, k)} -> {_show(now, k)}" for k in keys[:6])
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    raise RunFolderError(
        f"the run folder {folder} holds a run with other settings ({shown}{more}); a run "
        f"folder keeps the settings it started with: start in a new folder (to continue "
        f"from this run's weights there: trainer.resume={folder / 'checkpoints' / 'last.pt'})")


class RunLock:
    """An exclusive ``fcntl`` lock on ``<folder>/.lock`` held by this process."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(3):  # the holder may remove the file between our open and lock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                raise RunFolderError(f"cannot create the lock file {self.path}: "
                                     f"{err.strerror}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                pid, _, host = holder.partition(" ")
                raise RunFolderError(
                    f"the run folder {self.path.parent} is in use by process {pid} on host "
                    f"{host or 'unknown'} (lock {self.path}); wait for it to end or stop it, "
                    f"or start in another folder") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise RunFolderError(f"could not lock {self.path}: another process keeps replacing it")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # under the lock: no one else holds this file
        finally:
            os.close(self.fd)  # drops the lock
            self.fd = None


def save_hydra_files(folder: Path, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """What Hydra would have written into ``<folder>/.hydra/`` at the job's start."""
    target = folder / SAVED
    target.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": cfg, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
             "overrides.yaml": hydra_cfg.overrides.task}
    for name, node in files.items():
        (target / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")


@contextmanager
def claim(cfg: DictConfig, hydra_cfg: DictConfig, is_main: bool = True) -> Iterator[Path]:
    """Check, lock and (if new) record the run folder ``hydra_cfg.runtime.output_dir`` for
    the training inside the ``with``; ``is_main``: False on ranks other than 0 (no-op)."""
    folder = Path(hydra_cfg.runtime.output_dir)
    if not is_main:
        yield folder
        return
    check_settings(folder, cfg)
    folder.mkdir(parents=True, exist_ok=True)  # Hydra made it, unless called without Hydra
    lock = RunLock(folder)
    lock.acquire()
    try:
        check_settings(folder, cfg)  # a start that won the race to an empty folder
        if not ((folder / SAVED / "config.yaml").is_file() and holds_run(folder)):
            save_hydra_files(folder, cfg, hydra_cfg)
        yield folder
    finally:
        lock.release()


#: run folder -> the outermost folder of its path that did not exist before this start
_MADE_BY_THIS_START: dict[Path, Path] = {}


class NewRunFolder(Callback):
    """A Hydra callback (``hydra.callbacks`` in conf/config.yaml, after ``shared_start_time``,
    whose clock names the folder): before Hydra makes the run folder of a single run, records
    which folders of its path this start creates, for ``discard_if_refused``. Sweep jobs
    keep their folders: the job's log holds its error."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: ARG002
        folder = Path(str(config.hydra.run.dir)).absolute()
        outermost = None
        for path in (folder, *folder.parents):
            if path.exists():
                break
            outermost = path
        if outermost is not None:
            _MADE_BY_THIS_START[folder] = outermost


def made_by_this_start(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that this start created, or None."""
    return _MADE_BY_THIS_START.get(Path(folder).absolute())


def _only_start_files(folder: Path) -> bool:
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    dirs = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_dir()}
    return found <= set(START_FILES) and dirs <= {SAVED}


def remove_start_files(folder: Path, outermost: Path) -> bool:
    """Remove ``folder`` if it holds only what a start writes before training, then its
    parents up to ``outermost`` while they are empty; under the folder's lock, so a start
    that shares the folder keeps it. Returns whether ``folder`` went."""
    if not folder.is_dir() or not _only_start_files(folder):
        return False
    lock = RunLock(folder)
    try:
        lock.acquire()
    except RunFolderError:
        return False  # another start holds it
    try:
        if not _only_start_files(folder):
            return False
        for name in START_FILES:
            if name != LOCK:
                (folder / name).unlink(missing_ok=True)
        if (folder / SAVED).is_dir():
            (folder / SAVED).rmdir()
    finally:
        lock.release()
    for path in (folder, *folder.parents):
        try:
            path.rmdir()
        except OSError:
            break  # not empty: a folder another start or the user put something in
        if path == outermost:
            break
    return not folder.exists()


@contextmanager
def discard_if_refused(folder: Path, is_main: bool = True) -> Iterator[None]:
    """Around a start in ``folder``: when it raises before training wrote anything, the
    folders this start made (``NewRunFolder``) are removed again."""
    try:
        yield
    except BaseException:
        outermost = made_by_this_start(folder) if is_main else None
        if outermost is not None:
            remove_start_files(Path(folder).absolute(), outermost)
        raise
