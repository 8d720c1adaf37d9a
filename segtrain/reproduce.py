"""Reproduce a paper's table in one command: rows x seeds, stages first, costed, idempotent.

    python -m segtrain.reproduce paper=deeplabv2_lr_policy dry_run=true   # the plan and its cost
    python -m segtrain.reproduce paper=deeplabv2_lr_policy dataset.root=/data/VOCdevkit/VOC2012
    python -m segtrain.reproduce paper=fcn8s_voc scale=tiny                # minutes, on a CPU
    python -m segtrain.reproduce paper=deeplabv2_voc seeds=3 hydra/launcher=slurm \\
        hydra.launcher.partition=gpu dataset.root=/data/VOCdevkit/VOC2012

``paper=<name>`` names ``conf/experiment/paper/<name>.yml``, the numbers of experiment
``<name>``. Every row of it becomes one training job per seed (``seeds=N``: seeds 0..N-1)
with ``experiment=<name>``, the row's training overrides and ``seed=<s>``; rows that differ
only in evaluation options (``eval=...``, ``eval.*``) share the training job, which then
runs ``segtrain.evaluate`` once per such row. A row may start from a stage (``stage: coco``):
the file's ``stages:`` block gives each stage an experiment, overrides and the stage it
starts from (``after:``); a stage runs once per seed, before every job that needs it, and
each such job gets ``model.init_from=<the stage's run folder>``.

Jobs are matched by their settings: a key (SHA-256) of the job's resolved config (its
experiment, every override, the seed, and for ``model.init_from`` the key of the stage it
starts from), written in ``<run>/reproduce.json`` beside what the job serves and the run it
started from. Running the command again therefore trains nothing that finished (metrics.json
``"finished": true``), resumes unfinished runs from their ``checkpoints/last.pt``
(``trainer.resume=auto``), relaunches failed ones, runs missing evaluations and rewrites the
table; a killed command loses at most the steps since the last checkpoint.

Launching goes through Hydra's launcher of ``hydra/launcher=...`` (a multirun config of
``conf/config.yaml``): the basic launcher runs the jobs in this process, one after another,
stages first; a submitit launcher (``slurm``, ``submitit_local``) submits every job at once,
each with the SLURM dependency ``afterok:<its stage's job id>`` (``kill-on-invalid-dep``:
a failed stage cancels its dependants); the local executor of submitit has no dependencies,
so there a dependant is submitted once its stage's job succeeded. Each job runs in its run
folder as ``python -m segtrain`` does (``segtrain.run_start.claim``: settings checked, folder
locked, ``.hydra/`` written). Each submission's scheduler job id is kept in
``<run>/reproduce_job.json``; a rerun asks the scheduler (sacct through submitit; for the
local executor, whether the job's controller process lives) and waits for a job still
pending or running (it stays its dependants' ``afterok``) instead of submitting it again;
an ended job whose run did not finish is submitted again.

Options: ``seeds`` (1), ``out`` (``outputs/reproduce/<paper>``, ``<paper>_tiny`` at
``scale=tiny``), ``dry_run`` (print the plan: jobs, the stage each waits for, datasets and a
quick check of them, images x FLOPs -> GPU-hours, checkpoint disk), ``mfu`` (the fraction of
the GPU's dense peak a training step reaches, for the plan; default: the MFU measured in
docs/gpu.md, else ``flops.ASSUMED_MFU``, said to be an assumption), ``gpu`` (``H100``: the
card whose peak the plan prices), ``scale`` (``paper`` |
``tiny``: the embedded dataset with the paper dataset's class count, 32x32 images, batch 2,
the paper's iterations / 2000), and any training override (``dataset.root=...``), given to
every job. Writes ``<out>/table.md`` and ``<out>/table.csv``: per row the paper's value, ours
(mean +- sample std over seeds), the difference and the status.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from segtrain import runs
from segtrain.errors import ConfigError, UserError, plain_message
from segtrain.eval.metrics import SUMMARY_METRICS

log = logging.getLogger("segtrain")

CONF_DIR = Path(__file__).resolve().parent / "conf"
PAPER_DIR = CONF_DIR / "experiment" / "paper"
PROVENANCE = "reproduce.json"
DEFAULT_GPU = "H100"  # the card the cost plan prices (gpu=<name of segtrain/flops.py>)
SMALL_BATCH = 8  # fewer images per step: the plan warns its GPU-hours are too low
SUBMISSION = "reproduce_job.json"  # the scheduler job (SLURM or submitit local) running a run
# settings that move data or processes around without changing what is trained
NOT_SETTINGS = ("dataset.root", "dataset.num_workers", "trainer.num_workers", "trainer.device",
                "trainer.resume", "model.init_from")
# scale=tiny: the embedded dataset at 32x32, batch 2, the paper's iterations / TINY_ITER_DIVISOR
TINY_SIDE = 32
TINY_BATCH = 2
TINY_ITER_DIVISOR = 2000
TINY_TRAIN_IMAGES = 16
TINY_VAL_IMAGES = 8
TINY_VGG_WIDTH = 0.0625  # FCN's VGG-16 at 1/16 of its channels (fc6/fc7 256 wide)


# -- the paper file -> jobs ------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    """One training run: a stage or the training of one or more rows, for one seed."""

    label: str                      # "stage fcn16s" or the first row's name
    experiment: str
    base: list[str]                 # experiment=, the row's or stage's overrides
    user: list[str]                 # the command line's training overrides
    seed: int
    stage: str | None = None        # the stage this job *is* (None for a row's job)
    after: Job | None = None        # the job whose run it starts from
    rows: list[int] = dataclasses.field(default_factory=list)  # indexes of the rows it trains
    evaluations: list[dict] = dataclasses.field(default_factory=list)  # {name, overrides}
    notes: list[str] = dataclasses.field(default_factory=list)
    scale: list[str] = dataclasses.field(default_factory=list)  # scale=tiny's overrides
    key: str = ""
    run_dir: Path | None = None
    config: DictConfig | None = None

    @property
    def overrides(self) -> list[str]:
        """In order: the paper file's, the scale's, the user's (winning over both), seed."""
        return [*self.base, *self.scale, *self.user, f"seed={self.seed}"]

    def all_overrides(self) -> list[str]:
        extra = [f"model.init_from={self.after.run_dir}"] if self.after is not None else []
        return [*self.overrides, *extra]


def _value(value: Any) -> str:
    """A paper file's override value as the command line writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value).replace(" ", "")


def _is_eval(key: str) -> bool:
    key = key.lstrip("+~")
    return key == "eval" or key.startswith("eval.")


def read_paper(paper: str, paper_dir: Path | None = None) -> dict:
    paper_dir = paper_dir or PAPER_DIR
    path = paper_dir / f"{paper}.yml"
    if not path.is_file():
        names = sorted(p.stem for p in paper_dir.glob("*.yml"))
        raise ConfigError(f"paper={paper}: no file {path.name} in conf/experiment/paper/ "
                          f"(one of: {', '.join(names)})")
    data = yaml.safe_load(path.read_text()) or {}
    stages = data.get("stages") or {}
    for i, row in enumerate(data.get("rows") or []):
        stage = row.get("stage")
        if stage is not None and stage not in stages:
            raise ConfigError(f"{path.name}: rows[{i}].stage={stage} is not a key of its "
                              f"stages: block ({', '.join(stages) or 'none'})")
    train_stage = (data.get("train") or {}).get("stage")
    if train_stage is not None and train_stage not in stages:
        raise ConfigError(f"{path.name}: train.stage={train_stage} is not a stage")
    for name, stage in stages.items():
        if stage.get("after") is not None and stage["after"] not in stages:
            raise ConfigError(f"{path.name}: stages.{name}.after={stage['after']} is not a stage")
    return data


def _stage_chain(stages: dict, name: str, path: str) -> list[str]:
    """The stages ``name`` needs, first to last (``name`` included); a cycle is an error."""
    chain: list[str] = []
    while name is not None:
        if name in chain:
            raise ConfigError(f"{path}: stages form a cycle: {' -> '.join([*chain, name])}")
        chain.insert(0, name)
        name = stages[name].get("after")
    return chain


def _row_label(row: dict, i: int) -> str:
    return str(row.get("name") or ", ".join(f"{k}={_value(v)}" for k, v in
                                            (row.get("overrides") or {}).items())
               or "(the experiment as it is)")


def plan_jobs(paper: str, seeds: int, extra: list[str], data: dict,
              per_stage: dict[str, list[str]] | None = None) -> list[Job]:
    """Stage jobs first (in dependency order), then one job per distinct row training, for
    each seed. ``extra``: the user's overrides for every job; ``per_stage``: the user's
    overrides of one stage (``stages.coco.dataset.root=...``), after ``extra``."""
    per_stage = per_stage or {}
    stages = data.get("stages") or {}
    path = f"conf/experiment/paper/{paper}.yml"
    jobs: list[Job] = []
    for seed in range(seeds):
        stage_jobs: dict[str, Job] = {}
        by_training: dict[tuple, Job] = {}
        for i, row in enumerate(data.get("rows") or []):
            items = (row.get("overrides") or {}).items()
            train = [f"{k}={_value(v)}" for k, v in items if not _is_eval(k)]
            evals = {k: _value(v) for k, v in items if _is_eval(k)}
            after = _stage_job(row["stage"], stages, stage_jobs, jobs, paper, extra, seed,
                               path, per_stage) if row.get("stage") else None
            ident = (tuple(train), row.get("stage"))
            job = by_training.get(ident)
            if job is None:
                job = Job(_row_label(row, i), paper, [f"experiment={paper}", *train],
                          list(extra), seed, after=after)
                by_training[ident] = job
            job.rows.append(i)
            if evals:
                job.evaluations.append({"row": i, "overrides": evals,
                                        "name": "repro_" + _digest(evals)[:10]})
        jobs += [j for j in by_training.values()]
        if not data.get("rows") and data.get("train") is not None:
            # the experiment's own run with no paper number beside it (a test-server model)
            stage = data["train"].get("stage")
            after = _stage_job(stage, stages, stage_jobs, jobs, paper, extra, seed, path,
                               per_stage) if stage else None
            jobs.append(Job(paper, paper, [f"experiment={paper}"], list(extra), seed,
                            after=after))
    return jobs


def _stage_job(name: str, stages: dict, made: dict[str, Job], jobs: list[Job], paper: str,
               extra: list[str], seed: int, path: str,
               per_stage: dict[str, list[str]]) -> Job:
    """The job of stage ``name`` for ``seed``, appending it (and the stages it starts from,
    first) to ``jobs`` unless ``made`` has it already."""
    for step in _stage_chain(stages, name, path):
        if step in made:
            continue
        spec = stages[step]
        experiment = spec.get("experiment", paper)
        overrides = [f"{k}={_value(v)}" for k, v in (spec.get("overrides") or {}).items()]
        job = Job(f"stage {step}", experiment, [f"experiment={experiment}", *overrides],
                  [*extra, *per_stage.get(step, [])], seed,
                  stage=step, after=made[spec["after"]] if spec.get("after") else None)
        if spec.get("note"):
            job.notes.append(str(spec["note"]))
        made[step] = job
        jobs.append(job)
    return made[name]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _drop(node: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(last, None)


def job_key(job: Job, cfg: DictConfig) -> str:
    """The job's settings as one hash: its resolved config without the keys that only move
    files or processes (``NOT_SETTINGS``), its own overrides (two rows whose overrides a
    scale replaces stay two jobs), and the key of the run it starts from."""
    cfg = cfg.copy()
    for dotted in NOT_SETTINGS:  # a missing dataset.root is no setting; paths under it neither
        if OmegaConf.select(cfg, dotted) is not None or "root" in dotted:
            OmegaConf.update(cfg, dotted, "<not a setting>", force_add=True)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for dotted in NOT_SETTINGS:
        _drop(resolved, dotted)
    given = [o for o in job.overrides if o.split("=", 1)[0].lstrip("+~") not in NOT_SETTINGS]
    return _digest({"config": resolved, "overrides": given,
                    "after": job.after.key if job.after is not None else None})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "job"


# -- scale=tiny -----------------------------------------------------------------------------
def tiny_overrides(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(overrides, notes) that shrink ``cfg`` (a job's config at the paper's scale) to the
    embedded dataset: same class count, 32x32 images, batch 2, iterations / 2000, no
    downloaded weights, a small network where the paper's is VGG-16 or a deep ResNet."""
    iters = max(2, math.ceil(int(cfg.trainer.max_iters) / TINY_ITER_DIVISOR))
    out = ["dataset=synthetic", f"dataset.num_classes={int(cfg.dataset.num_classes)}",
           f"dataset.image_size={TINY_SIDE}", f"dataset.train.num_samples={TINY_TRAIN_IMAGES}",
           f"dataset.val.num_samples={TINY_VAL_IMAGES}",
           f"trainer.max_iters={iters}", f"trainer.global_batch_size={TINY_BATCH}",
           "trainer.iter_size=1", f"trainer.eval_interval={iters}",
           f"trainer.checkpoint_interval={max(1, iters // 2)}", "trainer.log_interval=1"]
    notes = [f"tiny: dataset=synthetic ({int(cfg.dataset.num_classes)} classes), "
             f"{TINY_SIDE}x{TINY_SIDE}, batch {TINY_BATCH}, {iters} iterations"]
    model = cfg.model
    if model.get("pretrained") is not None:
        out.append("model.pretrained=null")
    backbone = model.get("backbone")
    if isinstance(backbone, str) and backbone not in ("resnet18", "mobilenetv2") \
            and (backbone.startswith("resnet") or backbone == "vgg16"):
        out.append("model.backbone=resnet18")
        if model.get("pool_kernel") not in (None, 2):
            out.append("model.pool_kernel=2")
        notes.append(f"tiny: model.backbone=resnet18 instead of {backbone}")
    if "width" in model and backbone is None:
        out.append(f"model.width={TINY_VGG_WIDTH}")
        notes.append(f"tiny: model.width={TINY_VGG_WIDTH} (VGG-16 at 1/16 of its channels)")
    if model.get("freeze_bn") and backbone is not None:
        # frozen BatchNorm keeps ImageNet statistics; without them 'frozen' is the identity
        notes.append("tiny: BatchNorm frozen at its initial statistics (no ImageNet weights)")
    return out, notes


# -- composing ---------------------------------------------------------------------------------
def compose_job(overrides: list[str]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def resolve(jobs: list[Job], scale: str, out: Path) -> None:
    """Compose every job's config (stages first), scale it, key it and find its run."""
    existing = find_runs(out)
    for job in jobs:
        try:
            cfg = compose_job(job.all_overrides())
            if scale == "tiny":
                extra, notes = tiny_overrides(cfg)
                job.scale = extra
                job.notes += notes
                cfg = compose_job(job.all_overrides())
        except UserError:
            raise
        except Exception as exc:  # Hydra's own errors: a bad override of the paper file
            raise ConfigError(f"job {job.label!r} (seed {job.seed}): "
                              f"{' '.join(job.all_overrides())}: {exc}") from None
        job.config = cfg
        job.key = job_key(job, cfg)
        job.run_dir = existing.get(job.key) or out / "runs" / (
            f"{_slug(job.label)}_seed{job.seed}_{job.key[:8]}")


def find_runs(out: Path) -> dict[str, Path]:
    """key -> run folder of every run this command made under ``out`` (by reproduce.json)."""
    found = {}
    for path in sorted((out / "runs").glob(f"*/{PROVENANCE}")):
        try:
            found[json.loads(path.read_text())["key"]] = path.parent
        except (ValueError, KeyError):
            continue
    return found


# -- the state of a job ------------------------------------------------------------------------
def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def trained(job: Job) -> bool:
    return runs.finished(job.run_dir)


def evaluated(job: Job, evaluation: dict) -> bool:
    return runs.evaluation_record(job.run_dir, evaluation["name"]) is not None


def state(job: Job) -> str:
    """new | done | evaluate | resume (iteration) | relaunch (failed/interrupted)."""
    if not job.run_dir.is_dir():
        return "new"
    if trained(job):
        return "done" if all(evaluated(job, e) for e in job.evaluations) else "evaluate"
    status = (runs.training_record(job.run_dir) or {}).get("status")
    last = runs.resume_checkpoint(job.run_dir) is not None
    if status in ("failed", "interrupted"):
        return f"relaunch ({status}{', from last.pt' if last else ''})"
    return "resume from last.pt" if last else "relaunch (no checkpoint)"


def write_provenance(job: Job, paper: str) -> None:
    """``<run>/reproduce.json``: the key that matches the job, what it serves, its start."""
    path = job.run_dir / PROVENANCE
    job.run_dir.mkdir(parents=True, exist_ok=True)
    record = {"key": job.key, "paper": paper, "label": job.label, "stage": job.stage,
              "seed": job.seed, "overrides": job.all_overrides(), "rows": job.rows,
              "evaluations": job.evaluations,
              "init_from": None if job.after is None else {
                  "run": str(job.after.run_dir), "key": job.after.key,
                  "stage": job.after.stage}}
    if _json(path) != record:
        path.write_text(json.dumps(record, indent=1) + "\n")


# -- the job itself (runs in the launcher's process) -------------------------------------------
def run_job(cfg: DictConfig) -> dict:
    """Hydra task of one job: train unless finished (in the run folder claimed as
    ``python -m segtrain`` claims it: settings checked, locked, ``.hydra/`` written), then
    the row evaluations it owes. A run stopped by a signal ends the job as the training
    command does (under submitit: no result, so the launcher waits for the requeued job)."""
    from segtrain.__main__ import exit_stopped
    from segtrain.app import train
    from segtrain.cli import user_errors
    from segtrain.core.distributed import env_info
    from segtrain.run_start import claim

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    record = _json(run_dir / PROVENANCE) or {}
    with user_errors():
        if runs.finished(run_dir):
            metrics = runs.training_record(run_dir)
        else:
            with claim(cfg, hydra_cfg, is_main=env_info().is_main):
                metrics = train(cfg, run_dir)
        if metrics.get("status") == "stopped":
            exit_stopped(metrics.get("stop_signal"))
        if not metrics.get("finished"):
            return metrics
        for evaluation in record.get("evaluations", []):
            if runs.evaluation_record(run_dir, evaluation["name"]) is None:
                _evaluate(run_dir, evaluation, cfg)
    return metrics


def _evaluate(run_dir: Path, evaluation: dict, train_cfg: DictConfig) -> None:
    from segtrain.evaluate import evaluate

    items = evaluation["overrides"]
    chosen = items.get("eval")
    overrides = [f"run={run_dir}", f"name={evaluation['name']}",
                 f"device={train_cfg.trainer.device}", "num_workers=0",
                 *(f"eval={chosen}" for _ in [chosen] if chosen),
                 *(f"{k}={v}" for k, v in items.items() if k != "eval")]
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="evaluate", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=overrides)
    eval_items = {k: v for k, v in items.items() if k != "eval"}
    evaluate(cfg, chosen or str(train_cfg.get("eval_choice", "run")), eval_items,
             keep_run_eval=chosen is None)


# -- launching -------------------------------------------------------------------------------
def _launcher(launcher_overrides: list[str], sweep_dir: Path):
    """Hydra's launcher of ``hydra/launcher=...`` set up for ``run_job`` over
    ``conf/config.yaml`` in multirun mode, with the jobs' folders under ``sweep_dir``."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.plugins import Plugins
    from hydra.core.utils import setup_globals
    from hydra.types import HydraContext, RunMode

    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2("segtrain", create_config_search_path(str(CONF_DIR)))
    setup_globals()
    cfg = hydra.compose_config("config", [*launcher_overrides, f"hydra.sweep.dir={sweep_dir}",
                                          "hydra.mode=MULTIRUN"],
                               run_mode=RunMode.MULTIRUN, with_log_configuration=False)
    HydraConfig.instance().set_config(cfg)
    context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(cfg))
    launcher = Plugins.instance().instantiate_launcher(hydra_context=context,
                                                       task_function=run_job, config=cfg)
    return launcher


def _job_overrides(job: Job) -> list[str]:
    return [*job.all_overrides(), f"hydra.sweep.subdir={job.run_dir.name}"]


def launch(jobs: list[Job], launcher_overrides: list[str], out: Path, paper: str) -> dict:
    """Run the jobs that are not done; returns ``{key: "ok" | "failed: ..." | "blocked: ..."}``
    for the jobs launched."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    todo = [j for j in jobs if state(j) != "done"]
    if not todo:
        return {}
    for job in todo:
        write_provenance(job, paper)
    previous = HydraConfig.instance().cfg  # the launcher's and each job's replace it
    launcher = _launcher(launcher_overrides, out / "runs")
    try:
        if isinstance(launcher, BaseSubmititLauncher):
            return _launch_submitit(launcher, todo)
        return _launch_in_turn(launcher, todo)
    finally:
        GlobalHydra.instance().clear()  # the caller composes with its own search path again
        HydraConfig.instance().cfg = previous  # a later train() in this process names its
        # options from its own config, not from the last job's choices (app._choice)


def _launch_in_turn(launcher, todo: list[Job]) -> dict:
    """Hydra's basic launcher: one job after the other, a dependant after its stage."""
    from hydra.core.utils import JobStatus

    results: dict[str, str] = {}
    for idx, job in enumerate(todo):  # stages come before their dependants in ``jobs``
        blocked = job.after is not None and results.get(job.after.key, "ok") != "ok"
        if blocked:
            results[job.key] = f"blocked: {job.after.label} did not finish"
            continue
        earlier = adopt(job)
        if earlier is not None:  # an earlier command's scheduler job still runs it
            results[job.key] = _outcome(earlier)
            continue
        ret = launcher.launch([_job_overrides(job)], initial_job_idx=idx)[0]
        if ret.status == JobStatus.FAILED:
            results[job.key] = f"failed: {_one_line(plain_message(ret._return_value))}"
        else:
            value = ret.return_value or {}
            results[job.key] = "ok" if value.get("finished") else \
                f"stopped: {value.get('status', 'unfinished')}"
    return results


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def _outcome(handle) -> str:
    """"ok" once the submitit job's task returned a finished run, else why not (waits)."""
    try:
        ret = handle.results()[0]
        value = ret.return_value if ret.status.name == "COMPLETED" else None
        reason = "unfinished" if value is not None else \
            _one_line(plain_message(ret._return_value))
        return "ok" if value and value.get("finished") else f"failed: {reason}"
    except Exception as exc:  # noqa: BLE001 - a job's failure is a line of the table
        return f"failed: {_one_line(str(exc).strip().splitlines()[-1])}"


# -- the scheduler's jobs of earlier invocations ----------------------------------------------
# SLURM job states (sacct's State) in which the job will still run: a rerun waits for it
# (and makes it its dependants' afterok) instead of submitting the run a second time.
# Everything else (COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY,
# PREEMPTED without requeue, BOOT_FAIL, DEADLINE, or UNKNOWN: sacct no longer knows it) has
# ended; an ended job whose run did not finish is submitted again.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED",
                           "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
                           "SIGNALING", "STAGE_OUT", "STOPPED"})


def _local_job_class():
    from submitit.local.local import LocalJob

    class AdoptedLocalJob(LocalJob):
        """A job of submitit's local executor submitted by an earlier (ended) command: its
        id is the PID of its controller process, alive while the job runs."""

        def get_info(self, mode: str = "force") -> dict[str, str]:
            if self.paths.result_pickle.exists():
                return {"jobState": "FINISHED"}
            return {"jobState": "RUNNING" if _controller_alive(self.job_id) else "INTERRUPTED"}

    return AdoptedLocalJob


def _controller_alive(pid: str) -> bool:
    """Whether process ``pid`` lives and is a submitit local controller (not a reused PID)."""
    import os

    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.is_file() or b"submitit" in cmdline.read_bytes()


def scheduler_job(record: dict):
    """The submitit job handle of a ``SUBMISSION`` record (SLURM: its state comes from
    sacct, as submitit's own jobs)."""
    if record["cluster"] == "slurm":
        from submitit.slurm.slurm import SlurmJob

        return SlurmJob(record["folder"], str(record["job_id"]))
    return _local_job_class()(record["folder"], str(record["job_id"]))


def scheduler_state(handle) -> str:
    """The job's state in SLURM's words (submitit's local states mapped onto them)."""
    state = str(handle.state).split(" ")[0].upper()  # "CANCELLED by 1234"
    return {"FINISHED": "COMPLETED", "INTERRUPTED": "FAILED"}.get(state, state)


def earlier_submission(job: Job) -> tuple[Any, str] | None:
    """(handle, scheduler state) of the last job submitted for ``job``'s run, or None."""
    record = _json(job.run_dir / SUBMISSION)
    if not record or not record.get("job_id"):
        return None
    handle = scheduler_job(record)
    return handle, scheduler_state(handle)


def adopt(job: Job):
    """The scheduler job an earlier invocation submitted for ``job``'s run, when the
    scheduler says it is still pending or running (``ACTIVE_STATES``); else None, and the
    run is launched again."""
    earlier = earlier_submission(job)
    if earlier is None:
        return None
    handle, state = earlier
    if state in ACTIVE_STATES:
        log.info("%s (seed %d): job %s submitted earlier is %s: waiting for it, not "
                 "submitting again", job.label, job.seed, handle.job_id, state)
        return handle
    log.info("%s (seed %d): job %s submitted earlier is %s and its run did not finish: "
             "launching it again", job.label, job.seed, handle.job_id, state)
    return None


def record_submission(job: Job, handle, cluster: str, folder: Path) -> None:
    """``<run>/reproduce_job.json``: the scheduler job now running the run (cluster, id,
    submitit's folder), the ids of earlier submissions kept under ``earlier``."""
    import datetime

    from segtrain.core.json_files import write_json

    path = job.run_dir / SUBMISSION
    previous = _json(path) or {}
    earlier = [*previous.get("earlier", []),
               *([{k: previous.get(k) for k in ("cluster", "job_id", "submitted")}]
                 if previous.get("job_id") else [])]
    write_json({"cluster": cluster, "job_id": str(handle.job_id), "folder": str(folder),
                "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), "earlier": earlier}, path)


def _executor(launcher):
    """The submitit executor the plugin's ``launch`` would build from its parameters."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(launcher.params)
    kind = launcher._EXECUTOR
    executor = submitit.AutoExecutor(
        cluster=kind, folder=params.pop("submitit_folder"),
        **{f"{kind}_max_num_timeout": params.pop("max_num_timeout")
           for _ in [0] if "max_num_timeout" in params})
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v
                                  for k, v in params.items()})
    return executor, dict(params.get("additional_parameters") or {})


def _launch_submitit(launcher, todo: list[Job], wait: bool = True,
                     record: list | None = None) -> dict:
    """Submit every job; a dependant waits for its stage: SLURM's ``afterok`` dependency
    (a failed stage cancels it), or, for executors without dependencies (submitit's local
    one), submission after the stage's job succeeded. ``wait``: collect every job's outcome
    (the command's table needs them); ``record``: gets the submitit jobs."""
    from hydra.core.singleton import Singleton

    executor, additional = _executor(launcher)
    slurm = launcher._EXECUTOR == "slurm"
    submitted: dict[str, Any] = {}
    results: dict[str, str] = {}

    def outcome(key: str) -> str:
        if key not in results:
            results[key] = _outcome(submitted[key])
        return results[key]

    for idx, job in enumerate(todo):
        parent = job.after.key if job.after is not None else None
        if parent in results and results[parent] != "ok":
            results[job.key] = f"blocked: {job.after.label} did not finish"
            continue
        earlier = adopt(job)
        if earlier is not None:  # still queued or running: its dependants wait for it
            submitted[job.key] = earlier
            if record is not None:
                record.append(earlier)
            continue
        if parent in submitted:
            if slurm:
                executor.update_parameters(slurm_additional_parameters={
                    **additional, "dependency": f"afterok:{submitted[parent].job_id}",
                    "kill-on-invalid-dep": "yes"})
            elif outcome(parent) != "ok":
                results[job.key] = f"blocked: {job.after.label} did not finish"
                continue
        elif slurm:
            executor.update_parameters(slurm_additional_parameters=additional)
        handle = executor.submit(launcher, _job_overrides(job), "hydra.sweep.dir", idx,
                                 f"job_id_for_{idx}", Singleton.get_state())
        record_submission(job, handle, launcher._EXECUTOR, executor.folder)
        submitted[job.key] = handle
        log.info("submitted %s (seed %d): job %s", job.label, job.seed, handle.job_id)
        if record is not None:
            record.append(handle)
    for key in submitted if wait else ():
        outcome(key)
    return results


# -- the cost plan -----------------------------------------------------------------------------
def measured_mfu(gpu_doc: Path) -> float | None:
    """The bf16 model FLOP utilisation of docs/gpu.md's DeepLab v3 precision table (written
    by scripts/gpu_report.py from a GPU run of scripts/bench.py), or None."""
    if not gpu_doc.is_file():
        return None
    header = None
    for line in gpu_doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "precision" in cells and "MFU" in cells:
            header = cells
        elif header and len(cells) == len(header) and cells[header.index("precision")] == "bf16":
            text = cells[header.index("MFU")].rstrip("%")
            try:
                return float(text) / 100.0
            except ValueError:
                return None
    return None


def utilisation(repo: Path, given: str | None, gpu: str) -> tuple[float, str]:
    """(model FLOP utilisation, the sentence saying where it comes from): ``mfu=`` if
    given, else the bf16 MFU measured in docs/gpu.md, else ``flops.ASSUMED_MFU``."""
    from segtrain.flops import ASSUMED_MFU, ASSUMED_MFU_SOURCE

    if given is not None:
        return float(given), f"mfu={given} as given on the command line"
    mfu = measured_mfu(repo / "docs" / "gpu.md")
    if mfu is not None:
        return mfu, (f"measured: the bf16 MFU of segtrain's DeepLab v3 in docs/gpu.md "
                     f"(scripts/bench.py), applied to {gpu}")
    return ASSUMED_MFU, (f"ASSUMED, not measured (docs/gpu.md has no MFU of segtrain): the "
                         f"figure of {ASSUMED_MFU_SOURCE}; segmentation training likely gets "
                         f"less, so the GPU-hours are a lower bound; set mfu=<fraction> "
                         f"(and gpu=<name>) to plan with your own")


def images_per_step(cfg: DictConfig) -> int:
    t = cfg.trainer
    if t.get("global_batch_size") is not None:
        return int(t.global_batch_size)
    return int(t.batch_size) * int(t.iter_size)


def job_cost(job: Job, flops_cache: dict) -> dict:
    """Images processed, FLOPs per image and step (forward + loss + backward, FlopCounterMode
    on the meta device) and the checkpoints' bytes (parameters x 4 bytes x (1 + optimizer
    slots) for last.pt, parameters x 4 for best.pt)."""
    from segtrain.flops import train_input_size, train_step_flops

    cfg = job.config
    size = train_input_size(cfg, job.experiment)
    model_key = _digest([OmegaConf.to_container(cfg.model, resolve=True,
                                                throw_on_missing=False), cfg.loss.get("_target_"),
                         size, int(cfg.dataset.num_classes)])
    if model_key not in flops_cache:
        import torch

        from segtrain import app

        # the architecture only: no downloaded or stage weights
        counted = OmegaConf.merge(cfg, {"model": {"init_from": None}})
        if "pretrained" in counted.model:
            counted.model.pretrained = None
        with torch.device("meta"):  # built without memory or initialisation work
            flops = train_step_flops(counted, size)
            params = sum(p.numel() for p in app.build_model(counted).parameters())
        flops_cache[model_key] = (flops, params)
    flops, params = flops_cache[model_key]
    images = int(cfg.trainer.max_iters) * images_per_step(cfg)
    slots = 2 if "adam" in str(cfg.optim.get("_target_", "")).lower() else 1
    return {"images": images, "flops_per_image": flops, "size": size, "params": params,
            "checkpoint_bytes": params * 4 * (1 + slots) + params * 4}


def check_dataset(cfg: DictConfig) -> str:
    """A quick check of the job's data: both splits build (their file lists and sizes, the
    dataset classes' own checks) and their first sample reads."""
    from omegaconf.errors import MissingMandatoryValue

    from segtrain import app

    name = str(cfg.dataset.name)
    try:
        for split in (app.build_train_set(cfg), app.build_val_set(cfg)):
            split[0]
    except MissingMandatoryValue:
        return f"{name}: NOT SET: give dataset.root=<the dataset's folder>"
    except UserError as err:  # its first sentence; the training's error gives the rest
        return f"{name}: FAILS: {plain_message(err).split('. ')[0]}"
    except Exception as exc:  # noqa: BLE001 - any failure to read is what the check reports
        return f"{name}: FAILS: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return f"{name}: ok (train and val build, first samples read)"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def print_plan(jobs: list[Job], data: dict, paper: str, out: Path, repo: Path,
               seeds: int, scale: str, mfu: str | None = None, gpu: str = DEFAULT_GPU) -> str:
    from segtrain.flops import peak_tflops, precision_peak_key

    fraction, source = utilisation(repo, mfu, gpu)
    peaks = peak_tflops(gpu)[1]
    cache: dict = {}
    checked: dict[str, str] = {}
    rows = data.get("rows") or []
    lines = [f"paper {paper} (conf/experiment/paper/{paper}.yml): {len(rows)} rows x {seeds} "
             f"seed(s), {sum(j.stage is not None for j in jobs)} stage job(s) -> {len(jobs)} "
             f"training jobs; out {out}; scale {scale}",
             f"cost: images = max_iters x images per step; FLOPs per image counted for one "
             f"training step (forward + loss + backward, torch FlopCounterMode) at the training "
             f"input; evaluation not counted; GPU-hours on one {gpu} at {fraction:.0%} of its "
             f"dense peak for the job's trainer.precision (auto = bf16: {peaks['bf16']:g} "
             f"TFLOP/s -> {fraction * peaks['bf16']:.0f} TFLOP/s)",
             f"throughput {fraction:.0%}: {source}",
             "disk: checkpoints/last.pt = parameters x 4 bytes x (1 + optimizer slots), "
             "best.pt = parameters x 4 bytes", ""]
    total_h = total_disk = 0.0
    for n, job in enumerate(jobs, 1):
        cost = job_cost(job, cache)
        precision = precision_peak_key(str(job.config.trainer.precision))
        rate = fraction * peaks[precision] * 1e12
        hours = cost["images"] * cost["flops_per_image"] / rate / 3600
        total_h += hours
        total_disk += cost["checkpoint_bytes"]
        ds_key = _digest(OmegaConf.to_container(job.config.dataset))
        if ds_key not in checked:
            checked[ds_key] = check_dataset(job.config)
        served = "; ".join(f"{_row_label(rows[i], i)} ({float(rows[i]['value']):.2f})"
                           for i in job.rows)
        status = state(job)
        earlier = earlier_submission(job) if status != "done" else None
        if earlier is not None:
            status += f"; job {earlier[0].job_id} {earlier[1]}" + (
                ": a run waits for it" if earlier[1] in ACTIVE_STATES else "")
        lines += [f"job {n}/{len(jobs)}: {job.label} (seed {job.seed}) [{status}]"
                  + (f" -> rows: {served}" if served else ""),
                  f"  overrides: {' '.join(job.overrides)}",
                  "  waits for: " + (f"{job.after.label} (seed {job.after.seed}), then "
                                     f"model.init_from=<its run>" if job.after else "-"),
                  f"  dataset: {checked[ds_key]}",
                  f"  cost: {int(job.config.trainer.max_iters):,} iterations x "
                  f"{images_per_step(job.config)} images = {cost['images']:,} images x "
                  f"{cost['flops_per_image'] / 1e9:.1f} GFLOP ({cost['size'][0]}x"
                  f"{cost['size'][1]}) = {cost['images'] * cost['flops_per_image']:.2e} FLOP "
                  f"-> {hours:.2f} GPU-hours ({precision}); {cost['params'] / 1e6:.1f}M "
                  f"parameters, "
                  f"checkpoints {_gb(cost['checkpoint_bytes'])}",
                  f"  run folder: {job.run_dir}"]
        for e in job.evaluations:
            given = " ".join(f"{k}={v}" for k, v in e["overrides"].items())
            lines.append(f"  then: segtrain.evaluate {given} -> row "
                         f"{_row_label(rows[e['row']], e['row'])}")
        lines += [f"  note: {note}" for note in job.notes]
        if images_per_step(job.config) < SMALL_BATCH:
            lines.append(f"  note: {images_per_step(job.config)} image(s) per step: GPUs are "
                         f"used far less at such batches, expect more GPU-hours than this")
    lines += ["", f"total: {total_h:.2f} GPU-hours, checkpoints {_gb(total_disk)}"]
    return "\n".join(lines)


# -- the table -----------------------------------------------------------------------------------
def row_values(job: Job, row: int, metric: str) -> float | None:
    """Our value of ``metric`` for ``row`` from ``job``'s run, in percent; None if absent."""
    evaluation = next((e for e in job.evaluations if e["row"] == row), None)
    if evaluation is not None:
        data = runs.evaluation_record(job.run_dir, evaluation["name"])
    else:
        data = runs.training_record(job.run_dir)
        if data and not data.get("finished"):
            data = None
    if not data or data.get(metric) is None:
        return None
    return 100.0 * float(data[metric])


def table(jobs: list[Job], data: dict, results: dict, scale: str) -> tuple[list, list]:
    rows = data.get("rows") or []
    header = ["row", "metric", "paper", "ours (mean ± std)", "n", "diff", "status", "source"]
    body = []
    for i, row in enumerate(rows):
        mine = [j for j in jobs if i in j.rows]
        metric = row.get("metric", "miou")
        values = [v for j in mine if (v := row_values(j, i, metric)) is not None]
        paper = float(row["value"])
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else None
        spread = "" if std is None else f" ± {std:.2f}"
        problems = []
        for j in mine:
            if row_values(j, i, metric) is None:
                reason = results.get(j.key) or state(j)
                problems.append(f"seed {j.seed}: {reason}")
        status = "ok" if not problems else (
            f"ok {len(values)} of {len(mine)}; " if values else "") + "; ".join(problems)
        body.append([_row_label(row, i), SUMMARY_METRICS.get(metric, metric), f"{paper:.2f}",
                     "n/a" if mean is None else f"{mean:.2f}{spread}", str(len(values)),
                     "" if mean is None else f"{mean - paper:+.2f}{spread}", status,
                     f"{row.get('paper', '')}, {row.get('table', '')}".strip(", ")])
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def write_table(jobs: list[Job], data: dict, results: dict, paper: str, out: Path,
                scale: str) -> str:
    header, body = table(jobs, data, results, scale)
    note = (f"{paper}: paper values beside ours (percent); scale={scale}"
            + (": the embedded synthetic dataset, NOT comparable with the paper" if
               scale == "tiny" else ""))
    text = note + "\n\n" + markdown(header, body) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *body])
    (out / "table.csv").write_text(buffer.getvalue())
    return text


# -- the command -------------------------------------------------------------------------------
OPTIONS = {"paper": None, "seeds": "1", "out": None, "dry_run": "false", "scale": "paper",
           "mfu": None, "gpu": DEFAULT_GPU}


def parse_args(argv: list[str]) -> tuple[dict, list[str], list[str], dict[str, list[str]]]:
    """(options, training overrides for every job, launcher overrides ``hydra/...``, training
    overrides of one stage ``stages.<name>.<key>=<value>``)."""
    options = dict(OPTIONS)
    train, launcher, per_stage = [], [], {}
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"{arg!r}: expected key=value (paper=<name>, seeds=N, out=DIR, "
                              f"dry_run=true, scale=tiny, hydra/launcher=..., or a training "
                              f"override)")
        key, value = arg.split("=", 1)
        if key in options:
            options[key] = value
        elif key.startswith("hydra"):
            launcher.append(arg)
        elif key.startswith("stages.") and key.count(".") >= 2:
            _, stage, rest = key.split(".", 2)
            per_stage.setdefault(stage, []).append(f"{rest}={value}")
        else:
            train.append(arg)
    if not options["paper"]:
        raise ConfigError("paper=<name> is required (a file of conf/experiment/paper/)")
    if options["scale"] not in ("paper", "tiny"):
        raise ConfigError(f"scale={options['scale']}: expected paper or tiny")
    if options["dry_run"] not in ("true", "false"):
        raise ConfigError(f"dry_run={options['dry_run']}: expected true or false")
    if not options["seeds"].isdigit() or int(options["seeds"]) < 1:
        raise ConfigError(f"seeds={options['seeds']}: expected a whole number >= 1")
    _check_cost_options(options["mfu"], options["gpu"])
    return options, train, launcher, per_stage


def _check_cost_options(mfu: str | None, gpu: str) -> None:
    from segtrain.flops import PEAK_TFLOPS, peak_tflops

    if mfu is not None:
        try:
            value = float(mfu)
        except ValueError:
            value = -1.0
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"mfu={mfu}: expected the fraction of the GPU's dense peak a "
                              f"training step reaches, in (0, 1] (e.g. mfu=0.15)")
    if peak_tflops(gpu) is None:
        raise ConfigError(f"gpu={gpu}: no dense peak known for it; one of "
                          f"{', '.join(name for name, _ in PEAK_TFLOPS)} (segtrain/flops.py)")


def main(argv: list[str] | None = None, repo: Path | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        options, train, launcher, per_stage = parse_args(argv)
        paper, scale = options["paper"], options["scale"]
        seeds = int(options["seeds"])
        out = Path(options["out"] or f"outputs/reproduce/{paper}"
                   + ("_tiny" if scale == "tiny" else ""))
        data = read_paper(paper)
        if not data.get("rows") and data.get("train") is None:
            raise ConfigError(f"conf/experiment/paper/{paper}.yml has no rows: nothing to "
                              f"reproduce (its other:/pending: entries say why)")
        unknown = set(per_stage) - set(data.get("stages") or {})
        if unknown:
            names = ", ".join(data.get("stages") or {}) or "none"
            raise ConfigError(f"stages.{sorted(unknown)[0]}.*: conf/experiment/paper/"
                              f"{paper}.yml has no such stage (its stages: {names})")
        jobs = plan_jobs(paper, seeds, train, data, per_stage)
        resolve(jobs, scale, out)
        if options["dry_run"] == "true":
            print(print_plan(jobs, data, paper, out, repo or Path.cwd(), seeds, scale,
                             options["mfu"], options["gpu"]))
            return 0
        results = launch(jobs, launcher, out, paper)
        text = write_table(jobs, data, results, paper, out, scale)
    except UserError as err:
        sys.stderr.write(f"error: {plain_message(err)}\n")
        return 1
    print(text)
    print(f"written: {out / 'table.md'}, {out / 'table.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
