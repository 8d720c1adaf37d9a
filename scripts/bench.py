"""What segtrain costs over hand-written PyTorch, as one table of ratios.

    python scripts/bench.py                  # or: make bench
    python scripts/bench.py --threads 2 --steps 40 --repeats 2
    python scripts/bench.py --skip knobs     # leave out a section (train, data, eval, knobs, cuda)

1. train: images/s of segtrain's ``Trainer`` against a bare loop written below (forward,
   cross-entropy, backward, AdamW step, poly lr), same model, same in-memory batches, same
   precision, same threads; for the default model and DeepLab v3+ MobileNetV2. The Trainer's
   loader is replaced by the very batches the bare loop uses, so the ratio is the loop's own
   cost (logging, progress bar, non-finite checks, schedule); section 2 measures loading.
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
5. cuda (only with a CUDA device): fp32 / bf16 / fp16 training of DeepLab v3 ResNet-101 at
   512x512: images/s, peak memory, and model FLOP utilisation (3 x forward FLOPs per image
   against the GPU's dense peak for that precision).

Clock: by default each timing is the process's CPU time (``time.process_time``) with one
thread, which other jobs on a shared machine barely disturb, while wall time there swings with
their load; ``--clock wall`` (and ``--threads`` > 1) measures wall time, as a dedicated machine
should. The parallel-CRF row always uses wall time (its work runs in other processes). The
load average is printed with the table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import os
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from benchmark_models import count_macs  # noqa: E402

from segtrain import app  # noqa: E402
from segtrain.data.loader import train_loader  # noqa: E402
from segtrain.engine import trainer as trainer_module  # noqa: E402
from segtrain.engine.distributed import DistInfo  # noqa: E402
from segtrain.engine.precision import autocast_dtype  # noqa: E402
from segtrain.engine.trainer import Trainer  # noqa: E402

MODELS = {"default (DeepLab v2 ResNet-18)": [],
          "DeepLab v3+ MobileNetV2": ["model=deeplabv3plus", "model.backbone=mobilenetv2"]}
# dense peak FLOP/s by device name and precision (vendor data sheets, SXM parts); fp32 means
# PyTorch's default of TF32 tensor cores for convolutions
PEAK = {"H100": {"fp32": 494e12, "bf16": 989e12, "fp16": 989e12},
        "H200": {"fp32": 494e12, "bf16": 989e12, "fp16": 989e12},
        "A100": {"fp32": 156e12, "bf16": 312e12, "fp16": 312e12}}


def config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["trainer.device=cpu", *overrides])


def memory_batches(cfg: DictConfig, count: int) -> list[dict]:
    """``count`` collated training batches, made once and shared by every loop."""
    loader = train_loader(app.build_train_set(cfg), cfg.trainer.batch_size, 0, cfg.seed)
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
    return images_per_s(stamps, warmup, cfg.trainer.batch_size)


# -- segtrain's trainer ---------------------------------------------------------------------
def trainer_loop(cfg: DictConfig, batches: list[dict], steps: int, warmup: int,
                 device: torch.device, run_dir: Path, precision: str = "fp32",
                 **options) -> float:
    """segtrain's Trainer on the same batches (its loader replaced by them), no evaluator."""
    model = fresh_model(cfg, device)
    t = cfg.trainer
    trainer = Trainer(
        model, instantiate(cfg.loss, class_weights=None).to(device),
        app.build_optimizer(cfg, app.param_groups(cfg, model)),
        instantiate(cfg.lr)(max_iters=steps), app.build_train_set(cfg), None, run_dir,
        max_iters=steps, batch_size=t.batch_size, num_workers=0, iter_size=t.iter_size,
        precision=precision, clip_grad_norm=t.clip_grad_norm, eval_interval=t.eval_interval,
        log_interval=t.log_interval, checkpoint_interval=t.checkpoint_interval, seed=cfg.seed,
        device=device, class_names=[str(i) for i in range(cfg.dataset.num_classes)],
        palette=None, ignore_index=cfg.dataset.ignore_index, dist=DistInfo(), **options)
    stamps: list[float] = []
    step = trainer._step

    def timed_step(it):
        if device.type == "cuda":
            torch.cuda.synchronize()  # a stamp marks finished GPU work, not queued launches
        stamps.append(CLOCK())
        step(it)

    trainer._step = timed_step
    original = trainer_module.train_loader
    trainer_module.train_loader = lambda *a, **k: itertools.cycle(batches)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar stays in the run
            trainer.fit()
    finally:
        trainer_module.train_loader = original
        if trainer.writer is not None:
            trainer.writer.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images_per_s(stamps, warmup, cfg.trainer.batch_size)


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
                 "model.backbone=mobilenetv2", "trainer.batch_size=4")
    batch_size = cfg.trainer.batch_size
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


def section_cuda(args, rows: list[list[str]], tmp: Path) -> None:
    if not torch.cuda.is_available():
        rows.append(["5 cuda", "DeepLab v3 R101 512x512", "-", "-", "-",
                     "skipped: no CUDA device"])
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = next((p for key, p in PEAK.items() if key in name), None)
    cfg = config("model=deeplabv3", "dataset.image_size=512", "trainer.device=cuda",
                 f"trainer.batch_size={args.cuda_batch}")
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
               for b in memory_batches(cfg, 4)]
    flops = 3 * 2 * count_macs(app.build_model(cfg), 512)  # forward + backward, per image
    results = {}
    global CLOCK
    clock, CLOCK = CLOCK, time.perf_counter  # GPU time is wall time, not this process's CPU
    try:
        for precision in ("fp32", "bf16", "fp16"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            rate = trainer_loop(cfg, batches, args.cuda_steps, 3, device,
                                tmp / f"cuda_{precision}", precision=precision)
            memory = torch.cuda.max_memory_allocated(device) / 2**30
            results[precision] = rate
            mfu = f"{rate * flops / peak[precision]:.1%}" if peak else "n/a (unknown peak)"
            rows.append(["5 cuda", f"{name}: DeepLab v3 R101 512x512 {precision}, "
                         f"batch {args.cuda_batch}", f"{rate:.1f} img/s, {memory:.1f} GiB",
                         f"{rate / results['fp32']:.2f}", "vs fp32", f"MFU {mfu}"])
    finally:
        CLOCK = clock

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
    parser.add_argument("--cuda-steps", type=int, default=20)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["train", "data", "eval", "knobs", "cuda"])
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
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
        if "cuda" not in args.skip:
            section_cuda(args, rows, tmp)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
