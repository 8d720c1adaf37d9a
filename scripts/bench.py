"""What segtrain costs over hand-written PyTorch, as one table of ratios.

    python scripts/bench.py                  # or: make bench
    python scripts/bench.py --threads 2 --steps 40 --repeats 2
    python scripts/bench.py --skip knobs     # leave out a section (train, data, eval, knobs, cuda)

1. train: images/s of segtrain's ``Trainer`` against a bare loop written below (forward,
   cross-entropy, backward, AdamW step, poly lr), same model, same in-memory batches, same
   precision, same threads; for the default model and DeepLab v3+ MobileNetV2. The Trainer
   gets the very batches the bare loop uses (through its constructor), with the callbacks of
   a run but the evaluation, so the ratio is the loop's own cost (logging, progress bar,
   TensorBoard, checkpoints, non-finite checks, schedule); section 2 measures loading.
   Both are timed from the entry of step ``warmup`` to the entry of the last step, with the
   trainer's default log interval inside the window; the two run back to back in each of
   ``--repeats`` rounds and the ratio is the median of the rounds' ratios.
   Target: ratio >= 0.97.
2. data: CamVid training images/s through segtrain's loader (decode, random scale, crop,
   flip, normalise) with 0, 1 and 2 workers, beside the images/s the CamVid model
   (DeepLab v3+ MobileNetV2 at 360x480) consumes in training: a ratio above 1 means loading
   keeps up. Skipped with a note unless ``--camvid <root>`` names a CamVid copy
   (``make bench CAMVID=<root>``).
3. eval: seconds per image of whole-image, multi-scale (0.5, 0.75, 1, max; ``eval=msc``),
   multi-scale + flip (``eval=msc_flip``), sliding-window and multi-scale + dense CRF
   (``eval=msc_crf``) evaluation, as ratios to whole, beside the ideal ratio of forward FLOPs
   (sum of squared scales, doubled by flipping; window area over image area). The CRF runs
   serially (``eval.crf_workers=0``) and in 2 worker processes, both timed by the wall clock.
4. knobs: trainer.channels_last and trainer.compile, each as a ratio to the default trainer.
5. cuda (only with a CUDA device; ``--skip train data eval knobs`` for this section alone):
   fp32 / bf16 / fp16 training of DeepLab v3 ResNet-101 at 512x512, batch ``--cuda-batch``:
   images/s of segtrain's Trainer on batches already on the GPU, peak memory
   (``torch.cuda.max_memory_allocated``), and model FLOP utilisation: the FLOPs of one
   training step per image (forward + backward, counted by ``FlopCounterMode``) times
   images/s over the GPU's dense peak for that precision (``PEAK_TFLOPS``). Then the
   training images/s (bf16) of every experiment config's model at its paper's crop, batch
   ``--zoo-batch``. Fixed step counts bound the time (expected, not yet measured: a
   few minutes on one H100, most of it building the 19 models on the CPU).
   ``--cuda-dry-run`` runs this same code on the CPU at tiny sizes (32x32, zoo inputs / 8),
   as the tests do; ``--json`` writes its results (row by row) for
   ``scripts/gpu_report.py``.

Clock: by default each timing is the process's CPU time (``time.process_time``) with one
thread, which other jobs on a shared machine barely disturb, while wall time there swings with
their load; ``--clock wall`` (and ``--threads`` > 1) measures wall time, as a dedicated machine
should. The parallel-CRF row always uses wall time (its work runs in other processes). The
load average is printed with the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from segtrain import app
from segtrain.core.distributed import DistInfo
from segtrain.core.precision import autocast_dtype
from segtrain.data.loader import train_loader
from segtrain.engine.callbacks.run_log import RunLog
from segtrain.engine.trainer import Trainer
from segtrain.flops import WHOLE_IMAGE_INPUT, peak_tflops, train_step_flops  # noqa: F401
from segtrain.flops import train_input_size as paper_input

REPO = Path(__file__).resolve().parents[1]

MODELS = {"default (DeepLab v2 ResNet-18)": [],
          "DeepLab v3+ MobileNetV2": ["model=deeplabv3plus", "model.backbone=mobilenetv2"]}


def config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["trainer.device=cpu", *overrides])


def memory_batches(cfg: DictConfig, count: int) -> list[dict]:
    """``count`` collated training batches, made once and shared by every loop."""
    loader = train_loader(app.build_train_set(cfg), app.train_batch(cfg, 1).per_rank, 0, cfg.seed)
    return [b for b, _ in zip(loader, range(count))]


def fresh_model(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return app.build_model(cfg).to(device)


CLOCK: Callable[[], float] = time.process_time


def images_per_s(stamps: list[float], warmup: int, batch_size: int) -> float:
    """Steps from entry ``warmup`` to the entry of the last step (its own work excluded)."""
    steps = len(stamps) - 1 - warmup
    return steps * batch_size / (stamps[-1] - stamps[warmup])


# -- the bare loop --------------------------------------------------------------------------
def bare_loop(cfg: DictConfig, batches: list[dict], steps: int, warmup: int,
              device: torch.device, precision: str = "fp32") -> float:
    """The hand-written baseline: what a user would write without a framework."""
    model = fresh_model(cfg, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.optim.lr),
                            weight_decay=float(cfg.optim.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 - it / steps) ** 0.9)
    dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    stamps = []
    for batch in itertools.islice(itertools.cycle(batches), steps):
        if device.type == "cuda":
            torch.cuda.synchronize()  # a stamp marks finished GPU work, not queued launches
        stamps.append(CLOCK())
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(image)["out"], mask, ignore_index=255)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images_per_s(stamps, warmup, app.train_batch(cfg, 1).per_rank)


# -- segtrain's trainer ---------------------------------------------------------------------
def trainer_loop(cfg: DictConfig, batches: list[dict], steps: int, warmup: int,
                 device: torch.device, run_dir: Path, precision: str = "fp32",
                 **options) -> float:
    """segtrain's Trainer on the same batches, with a run's callbacks but no evaluation."""
    model = fresh_model(cfg, device)
    t = cfg.trainer
    stamps: list[float] = []

    def timed(stream):
        """The batches; a stamp when a step asks for its first (the start of the step)."""
        for i, batch in enumerate(stream):
            if i % t.iter_size == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()  # a stamp marks finished GPU work, not launches
                stamps.append(CLOCK())
            yield batch

    callbacks = [RunLog([str(i) for i in range(cfg.dataset.num_classes)], None,
                        cfg.dataset.ignore_index, progress=True)]
    trainer = Trainer(
        model, instantiate(cfg.loss, class_weights=None).to(device),
        app.build_optimizer(cfg, app.param_groups(cfg, model)),
        instantiate(cfg.lr)(max_iters=steps), lambda start: timed(itertools.cycle(batches)),
        run_dir, max_iters=steps, iter_size=t.iter_size, precision=precision,
        clip_grad_norm=t.clip_grad_norm, log_interval=t.log_interval, seed=cfg.seed,
        device=device, callbacks=callbacks, dist=DistInfo(),
        checkpoint_interval=t.checkpoint_interval, **options)
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar stays in the run
        trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images_per_s(stamps, warmup, app.train_batch(cfg, 1).per_rank)


def alternate(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """``repeats`` rounds, each running every case once back to back, so that a drift of the
    machine's load hits the cases of a round alike; the rates per case, round by round."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            rates[name].append(fn())
    return rates


def paired_ratio(rates: dict[str, list[float]], case: str, reference: str) -> float:
    """Median over rounds of ``case / reference``: robust to the odd disturbed run."""
    return statistics.median(a / b for a, b in zip(rates[case], rates[reference]))


# -- sections ---------------------------------------------------------------------------------
def section_train(args, rows: list[list[str]], tmp: Path) -> dict[str, float]:
    baseline = {}
    cpu = torch.device("cpu")
    for name, overrides in MODELS.items():
        cfg = config(*overrides)
        batches = memory_batches(cfg, 8)
        run_dir = tmp / f"train_{len(baseline)}"
        rates = alternate({
            "bare": lambda c=cfg, b=batches: bare_loop(c, b, args.steps, args.warmup, cpu),
            "trainer": lambda c=cfg, b=batches, d=run_dir: trainer_loop(
                c, b, args.steps, args.warmup, cpu, d),
        }, args.repeats)
        ratio = paired_ratio(rates, "trainer", "bare")
        spread = max(r / b for r, b in zip(rates["trainer"], rates["bare"])) - min(
            r / b for r, b in zip(rates["trainer"], rates["bare"]))
        rows.append(["1 train", f"{name}: Trainer / bare loop",
                     f"{statistics.median(rates['trainer']):.1f} / "
                     f"{statistics.median(rates['bare']):.1f} img/s", f"{ratio:.3f}",
                     ">= 0.97", ("ok" if ratio >= 0.97 else "below target")
                     + f"; median of {args.repeats} paired rounds, spread {spread:.3f}"])
        baseline[name] = statistics.median(rates["trainer"])
    return baseline


def section_data(args, rows: list[list[str]]) -> None:
    if args.camvid is None or not (args.camvid / "train").is_dir():
        rows.append(["2 data", "CamVid loader", "-", "-", "-",
                     "skipped: no --camvid" if args.camvid is None
                     else f"skipped: no CamVid at {args.camvid}"])
        return
    cfg = config("dataset=camvid", f"dataset.root={args.camvid}", "model=deeplabv3plus",
                 "model.backbone=mobilenetv2", "trainer.global_batch_size=4")
    batch_size = app.train_batch(cfg, 1).per_rank
    batches = memory_batches(cfg, 2)
    # the model's consumption: bare training steps at the full 360x480 crop, on the wall
    # clock like the loader
    global CLOCK
    clock, CLOCK = CLOCK, time.perf_counter
    try:
        consume = bare_loop(cfg, batches, 4, 1, torch.device("cpu"))
    finally:
        CLOCK = clock
    dataset = app.build_train_set(cfg)
    for workers in (0, 1, 2):
        loader = iter(train_loader(dataset, batch_size, workers, cfg.seed))
        next(loader)  # worker start-up and the first decode are not throughput
        start = time.perf_counter()  # wall: the workers are other processes
        for _ in range(args.data_batches):
            next(loader)
        rate = args.data_batches * batch_size / (time.perf_counter() - start)
        del loader
        rows.append(["2 data", f"CamVid loader, {workers} workers / model consumption",
                     f"{rate:.1f} / {consume:.1f} img/s", f"{rate / consume:.2f}",
                     "> 1", "loading keeps up" if rate > consume else "loading is the bottleneck"])


def section_eval(args, rows: list[list[str]]) -> None:
    size, crop, stride = 128, 96, 32
    common = [f"dataset.image_size={size}", "dataset.val.num_samples=3", "trainer.num_workers=0"]
    scales = [0.5, 0.75, 1.0]
    msc = sum(s * s for s in scales)
    windows = len(range(0, size - crop + 1, stride)) ** 2
    cases = [
        ("whole", ["eval=whole"], 1.0),
        ("MSC 0.5/0.75/1 (max)", ["eval=msc"], msc),
        ("MSC + flip", ["eval=msc_flip"], 2 * msc),
        (f"slide {crop}x{crop} stride {stride}",
         ["eval=slide", f"eval.predictor.crop_size=[{crop},{crop}]",
          f"eval.predictor.stride=[{stride},{stride}]"], windows * crop * crop / size**2),
        # the CRF rows in wall time: the parallel one runs in worker processes, whose CPU
        # time the process clock does not see
        ("MSC + CRF, serial (wall clock)", ["eval=msc_crf", "eval.crf_workers=0"], None),
        ("MSC + CRF, 2 workers (wall clock)", ["eval=msc_crf", "eval.crf_workers=2"], None),
    ]
    cfg0 = config(*common)
    model = fresh_model(cfg0, torch.device("cpu"))
    per_image, wall = {}, {}
    for i, (name, overrides, _) in enumerate(cases):
        cfg = config(*common, *overrides)
        val_set = app.build_val_set(cfg)
        evaluator = app.build_evaluator(cfg, val_set, DistInfo())
        if i == 0:
            evaluator.run(model, torch.device("cpu"))  # warm-up
        start, start_wall = CLOCK(), time.perf_counter()
        evaluator.run(model, torch.device("cpu"))
        per_image[name] = (CLOCK() - start) / len(val_set)
        wall[name] = (time.perf_counter() - start_wall) / len(val_set)
    for name, _, ideal in cases:
        if "wall clock" in name:
            per_image[name] = wall[name] * per_image["whole"] / wall["whole"]
        ratio = per_image[name] / per_image["whole"]
        rows.append(["3 eval", f"{name} / whole ({size}x{size})",
                     f"{1000 * per_image[name]:.0f} ms/img", f"{ratio:.2f}",
                     "-" if ideal is None else f"{ideal:.2f} (FLOPs)", ""])


def section_knobs(args, rows: list[list[str]], tmp: Path, baseline: dict[str, float]) -> None:
    name = next(iter(MODELS))
    cfg = config(*MODELS[name])
    batches = memory_batches(cfg, 8)
    cpu = torch.device("cpu")
    runs = {"default": lambda: trainer_loop(cfg, batches, args.steps, args.warmup, cpu,
                                            tmp / "knob_default"),
            "channels_last": lambda: trainer_loop(cfg, batches, args.steps, args.warmup, cpu,
                                                  tmp / "knob_cl", channels_last=True)}
    rates = alternate(runs, args.repeats)
    default = statistics.median(rates["default"])
    rows.append(["4 knobs", f"{name}: trainer.channels_last=true / default",
                 f"{statistics.median(rates['channels_last']):.1f} / {default:.1f} img/s",
                 f"{paired_ratio(rates, 'channels_last', 'default'):.3f}", "> 1 to switch on",
                 ""])
    try:  # compile once (its first steps are the warm-up), then time it
        compiled = trainer_loop(cfg, batches, args.steps, max(args.warmup, 5), cpu,
                                tmp / "knob_compile", compile=True)
        rows.append(["4 knobs", f"{name}: trainer.compile=true / default",
                     f"{compiled:.1f} / {default:.1f} img/s",
                     f"{compiled / default:.3f}", "> 1 to switch on",
                     "compilation time excluded"])
    except Exception as exc:  # noqa: BLE001 - a missing compiler must not end the table
        rows.append(["4 knobs", f"{name}: trainer.compile=true", "-", "-", "-",
                     f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"])


# -- section 5: CUDA ---------------------------------------------------------------------------
ZOO_PRECISION = "bf16"  # trainer.precision=auto on a GPU with bf16
# the model of the precision rows (tests swap in a small backbone to keep the dry run short)
PRECISION_MODEL = ["model=deeplabv3"]


@dataclasses.dataclass(frozen=True)
class CudaPlan:
    """Sizes of section 5: the real ones on a GPU, tiny ones for the CPU dry run (same code)."""

    device: torch.device
    size: int        # DeepLab v3 ResNet-101 input side
    batch: int
    steps: int       # timed runs: ``warmup`` untimed steps, then the rest
    warmup: int
    zoo_scale: float  # each zoo input side times this
    zoo_batch: int
    zoo_steps: int

    @property
    def dry_run(self) -> bool:
        return self.device.type != "cuda"


def cuda_plan(args) -> CudaPlan | None:
    """The plan for ``args``; None where there is no CUDA device and no ``--cuda-dry-run``."""
    if args.cuda_dry_run:
        return CudaPlan(torch.device("cpu"), 32, 2, 3, 1, 1 / 8, 2, 3)
    if not torch.cuda.is_available():
        return None
    return CudaPlan(torch.device("cuda"), 512, args.cuda_batch, args.cuda_steps, 3, 1.0,
                    args.zoo_batch, args.zoo_steps)


def random_batches(num_classes: int, in_channels: int, size: tuple[int, int], batch: int,
                   count: int, device: torch.device, seed: int = 0) -> list[dict]:
    """``count`` batches on ``device`` (no host copy inside the timed loop): normal images
    and label maps of random classes in 16x16 blocks (a pixel-wise random map would make
    per-region costs, e.g. U-Net's weight map, unlike real labels)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batches = []
    for _ in range(count):
        blocks = torch.randint(0, num_classes, (batch, 1, -(-h // 16), -(-w // 16)), generator=g)
        mask = F.interpolate(blocks.float(), scale_factor=16, mode="nearest")[:, 0, :h, :w]
        batches.append({"image": torch.randn(batch, in_channels, h, w, generator=g).to(device),
                        "mask": mask.long().to(device)})
    return batches


def _peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120] if text else ''}"


def deeplabv3_precisions(plan: CudaPlan, tmp: Path) -> list[dict]:
    """fp32 / bf16 / fp16 training of DeepLab v3 ResNet-101 at plan.size: img/s (segtrain's
    Trainer on batches already on the device), peak memory, model FLOP utilisation."""
    size = (plan.size, plan.size)
    cfg = config(*PRECISION_MODEL, f"dataset.image_size={plan.size}",
                 f"trainer.global_batch_size={plan.batch}")
    batches = random_batches(cfg.dataset.num_classes, 3, size, plan.batch, 4, plan.device)
    flops = train_step_flops(cfg, size)
    name = torch.cuda.get_device_name(plan.device) if not plan.dry_run else "cpu (dry run)"
    peak = peak_tflops(name)
    results = []
    for precision in ("fp32", "bf16", "fp16"):
        _fresh_memory(plan.device)
        rate = trainer_loop(cfg, batches, plan.steps, plan.warmup, plan.device,
                            tmp / f"cuda_{precision}", precision=precision)
        tflops = peak[1][precision] if peak else None
        results.append({
            "precision": precision, "size": list(size), "batch": plan.batch,
            "steps": plan.steps, "warmup": plan.warmup, "img_s": rate,
            "peak_memory_gib": _peak_memory_gib(plan.device),
            "step_gflop_per_image": flops / 1e9, "peak_tflops": tflops,
            "mfu": rate * flops / (tflops * 1e12) if tflops else None})
    return results


def zoo_experiments() -> list[str]:
    """Every experiment config (conf/experiment/*.yaml): the zoo at its papers' settings."""
    return sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def zoo_config(experiment: str, scale: float) -> tuple[DictConfig, tuple[int, int], str]:
    """The experiment's config without downloads (``model.pretrained=null``), its input
    size times ``scale`` and a note of what was changed; a prior grid (CPNet) follows the
    input, as the paper sizes it. Frozen BatchNorm (DeepLab v2) is trained instead: its
    statistics are the ImageNet model's, and with random weights the activations of 100
    layers without normalisation overflow (conf/model/deeplabv2.yaml: from scratch,
    BatchNorm must learn)."""
    cfg = config(f"experiment={experiment}")
    note = ""
    h, w = paper_input(cfg, experiment)
    size = (max(32, round(h * scale)), max(32, round(w * scale)))
    stride = cfg.loss.get("label_stride")
    if stride:  # labels shrunk by s (DeepLab v1/v2): sides s k + 1, as the released 321 crops
        size = tuple(int(stride) * max(1, round((n - 1) / int(stride))) + 1 for n in size)
    if "pretrained" in cfg.model:
        cfg.model.pretrained = None
    if "prior_size" in cfg.model:
        stride = int(cfg.model.output_stride)
        cfg.model.prior_size = [-(-size[0] // stride), -(-size[1] // stride)]
    if cfg.model.get("freeze_bn"):
        cfg.model.freeze_bn = False
        note = "BatchNorm trained (frozen needs the ImageNet weights)"
    return cfg, size, note


def zoo_throughput(plan: CudaPlan, tmp: Path, experiments: list[str],
                   progress: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Training img/s (bf16, segtrain's Trainer) of each experiment's model at its paper's
    input size, batch plan.zoo_batch; a failure (out of memory, ...) is a row, not the end.
    ``progress`` gets the rows so far after each one."""
    rows: list[dict] = []
    for i, experiment in enumerate(experiments):
        row: dict = {"experiment": experiment, "batch": plan.zoo_batch,
                     "precision": ZOO_PRECISION}
        try:
            cfg, size, note = zoo_config(experiment, plan.zoo_scale)
            row.update(model=str(cfg.model._target_).rsplit(".", 1)[-1],
                       backbone=cfg.model.get("backbone"), size=list(size), note=note)
            _fresh_memory(plan.device)
            batches = random_batches(cfg.dataset.num_classes,
                                     int(cfg.model.get("in_channels") or 3), size,
                                     plan.zoo_batch, 2, plan.device)
            row["img_s"] = trainer_loop(cfg, batches, plan.zoo_steps, min(3, plan.zoo_steps - 2),
                                        plan.device, tmp / f"zoo_{i}", precision=ZOO_PRECISION)
            row["peak_memory_gib"] = _peak_memory_gib(plan.device)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not end the table
            row["error"] = _first_line(exc)
        finally:
            batches = None
            _fresh_memory(plan.device)
            shutil.rmtree(tmp / f"zoo_{i}", ignore_errors=True)  # its checkpoint
        rows.append(row)
        progress(rows)
    return rows


def cuda_environment(device: torch.device) -> dict:
    """What the timings depend on: device, versions, math flags."""
    env = {"device": "cpu (dry run)", "torch": torch.__version__,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, memory_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), device_count=torch.cuda.device_count())
        match = peak_tflops(props.name)
        env["peak_tflops"] = {"pattern": match[0], **match[1]} if match else None
    return env


def section_cuda(args, rows: list[list[str]], tmp: Path) -> dict | None:
    """Section 5 (see the module docstring); returns its results for ``--json``."""
    plan = cuda_plan(args)
    if plan is None:
        rows.append(["5 cuda", "DeepLab v3 R101 512x512, zoo", "-", "-", "-",
                     "skipped: no CUDA device"])
        return None
    global CLOCK
    clock, CLOCK = CLOCK, time.perf_counter  # GPU time is wall time, not this process's CPU
    started = time.perf_counter()

    def results(v3: list[dict], zoo: list[dict], partial: bool) -> dict:
        return {"environment": env, "dry_run": plan.dry_run, "partial": partial,
                "plan": dataclasses.asdict(plan) | {"device": str(plan.device)},
                "deeplabv3": v3, "zoo": zoo, "seconds": time.perf_counter() - started}

    def progress(zoo: list[dict]) -> None:
        """Results so far into --json: a time limit that ends the bench keeps them."""
        if args.json:
            args.json.write_text(json.dumps({"cuda": results(v3, zoo, True)}, indent=1))

    try:
        env = cuda_environment(plan.device)
        v3 = deeplabv3_precisions(plan, tmp)
        progress([])
        zoo = zoo_throughput(plan, tmp, args.zoo or zoo_experiments(), progress)
    finally:
        CLOCK = clock
    tag = "5 cuda" + (" (dry run, CPU)" if plan.dry_run else "")
    fp32 = v3[0]["img_s"]
    for r in v3:
        memory = "" if r["peak_memory_gib"] is None else f", {r['peak_memory_gib']:.1f} GiB"
        mfu = "n/a (unknown peak)" if r["mfu"] is None else f"{r['mfu']:.1%}"
        rows.append([tag, f"{env['device']}: DeepLab v3 R101 {r['size'][0]}x{r['size'][1]} "
                     f"{r['precision']}, batch {r['batch']}", f"{r['img_s']:.1f} img/s{memory}",
                     f"{r['img_s'] / fp32:.2f}", "vs fp32",
                     f"MFU {mfu} ({r['step_gflop_per_image']:.0f} GFLOP/img per step)"])
    for r in zoo:
        size = "x".join(map(str, r.get("size", []))) or "?"
        if "error" in r:
            rows.append([tag, f"zoo {r['experiment']} {size}", "-", "-", "-",
                         f"failed: {r['error']}"])
            continue
        memory = "" if r["peak_memory_gib"] is None else f", {r['peak_memory_gib']:.1f} GiB"
        rows.append([tag, f"zoo {r['experiment']}: {r['model']} {size}, batch {r['batch']} "
                     f"{r['precision']}", f"{r['img_s']:.1f} img/s{memory}", "-", "-",
                     r.get("note", "")])
    return results(v3, zoo, False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both loops)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="process CPU time (default) or wall time")
    parser.add_argument("--steps", type=int, default=25, help="steps per timed training run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of back-to-back runs; ratios are medians over rounds")
    parser.add_argument("--data-batches", type=int, default=6, help="loader batches timed")
    parser.add_argument("--camvid", type=Path, default=None,
                        help="CamVid root (train/, trainannot/, ...); without it: skipped")
    parser.add_argument("--cuda-batch", type=int, default=8)
    parser.add_argument("--cuda-steps", type=int, default=20,
                        help="steps per precision (3 untimed)")
    parser.add_argument("--zoo-batch", type=int, default=4)
    parser.add_argument("--zoo-steps", type=int, default=8,
                        help="steps per zoo model (3 untimed)")
    parser.add_argument("--zoo", nargs="*", default=None,
                        help="experiment configs of the zoo rows (default: all)")
    parser.add_argument("--cuda-dry-run", action="store_true",
                        help="section 5's code on the CPU at tiny sizes (a check, not a timing)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["train", "data", "eval", "knobs", "cuda"])
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--json", type=Path, help="write section 5's results (JSON) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    rows: list[list[str]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        baseline = section_train(args, rows, tmp) if "train" not in args.skip else {}
        if "data" not in args.skip:
            section_data(args, rows)
        if "eval" not in args.skip:
            section_eval(args, rows)
        if "knobs" not in args.skip:
            section_knobs(args, rows, tmp, baseline)
        cuda = section_cuda(args, rows, tmp) if "cuda" not in args.skip else None
    header = ["section", "case", "measured", "ratio", "target / ideal", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append("")
    lines.append(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, "
                 f"{os.cpu_count()} CPUs, "
                 f"load average {load:.1f}, {time.perf_counter() - started:.0f} s")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"cuda": cuda, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
