"""scripts/bench.py's two training loops on a tiny config: both really train on the shared
in-memory batches, and the table's ratios come from their timings."""

from __future__ import annotations

import sys

import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402

TINY = ["dataset.image_size=32", "dataset.train.num_samples=8", "trainer.global_batch_size=2",
        "trainer.log_interval=2"]


def test_images_per_s_counts_the_steps_between_the_first_and_last_stamp():
    # stamps at the entry of 5 steps, warm-up 1: steps 1..3 took 6 s, 2 images each
    assert bench.images_per_s([0.0, 1.0, 3.0, 5.0, 7.0], warmup=1, batch_size=2) == 1.0


def test_bare_loop_and_trainer_train_on_the_same_batches(tmp_path):
    cfg = bench.config(*TINY)
    batches = bench.memory_batches(cfg, 3)
    assert len(batches) == 3 and batches[0]["image"].shape == (2, 3, 32, 32)
    cpu = torch.device("cpu")
    assert bench.bare_loop(cfg, batches, 5, 1, cpu) > 0
    seen = []
    original = bench.Trainer._step

    def spy(self, it):
        batch = next(it)
        seen.append(batch["image"])
        return original(self, iter([batch]))

    bench.Trainer._step = spy
    try:
        rate = bench.trainer_loop(cfg, batches, 5, 1, cpu, tmp_path / "run", channels_last=True)
    finally:
        bench.Trainer._step = original
    assert rate > 0
    # the trainer got the bench's own batches, in order, cycling
    assert [int(torch.equal(s, batches[i % 3]["image"])) for i, s in enumerate(seen)] == [1] * 5
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert state["iteration"] == 5
    # with a run's callbacks: TensorBoard and the train log lines
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_paired_ratio_is_the_median_of_the_rounds():
    rates = {"trainer": [2.0, 4.0, 9.0], "bare": [1.0, 4.0, 3.0]}  # rounds: 2, 1, 3
    assert bench.paired_ratio(rates, "trainer", "bare") == 2.0
    calls = []
    rounds = bench.alternate({"a": lambda: calls.append("a") or 1.0,
                              "b": lambda: calls.append("b") or 2.0}, 2)
    assert calls == ["a", "b", "a", "b"] and rounds == {"a": [1.0, 1.0], "b": [2.0, 2.0]}
