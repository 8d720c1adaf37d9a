"""trainer.global_batch_size (the images per step, whatever the GPUs) and the refusal to
resume a checkpoint with another max_iters, schedule, base rate or batch."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from segtrain import app
from segtrain.app import train
from segtrain.core import checkpoint
from segtrain.engine.batch import per_rank_batch
from segtrain.engine.schedules import poly
from segtrain.engine.trainer import ScheduleChanged, Trainer
from segtrain.errors import ConfigError
from tests.conftest import compose_config


def test_per_rank_batch_divides_the_global_batch():
    assert per_rank_batch(16, 4, 1) == 4
    assert per_rank_batch(10, 1, 5) == 2
    assert per_rank_batch(20, 2, 2) == 5
    with pytest.raises(ConfigError) as err:
        per_rank_batch(10, 4, 5)
    assert "\n" not in str(err.value)
    assert "trainer.global_batch_size=10" in str(err.value) and "4 rank(s)" in str(err.value)


PAPER_BATCH = {"deeplabv1_voc": 20, "deeplabv2_voc": 10, "deeplabv2_aspp_ablation": 10,
               "deeplabv3_voc": 16, "pspnet_voc": 16, "pspnet_cityscapes": 16,
               "segnet_basic_camvid": 4, "segnet_camvid": 12, "fcn8s_voc": 1,
               "hanet_cityscapes": 8, "spnet_cityscapes": 8, "unet": 1}


@pytest.mark.parametrize("name", sorted(PAPER_BATCH))
def test_paper_experiments_train_their_papers_batch_on_1_and_2_ranks(name, tmp_path):
    root = [] if name == "unet" else [f"dataset.root={tmp_path}"]  # unet: embedded data
    cfg = compose_config([f"experiment={name}", *root])
    assert app.train_batch(cfg, 1).images_per_step == PAPER_BATCH[name]
    if PAPER_BATCH[name] % (2 * cfg.trainer.iter_size) == 0:
        assert app.train_batch(cfg, 2).images_per_step == PAPER_BATCH[name]


def test_global_batch_size_sets_the_per_rank_batch_and_the_log_states_it(tiny_cfg, tmp_path,
                                                                         caplog):
    cfg = tiny_cfg("trainer.global_batch_size=4", "trainer.iter_size=2",
                   "trainer.max_iters=1", "trainer.eval_interval=100")
    with caplog.at_level(logging.INFO, logger="segtrain"):
        train(cfg, tmp_path)
    assert "batch: 4 images per step = 2 per rank x trainer.iter_size 2 x 1 rank(s)" \
        in caplog.text
    assert checkpoint.load(tmp_path)["schedule"]["images per step"] == 4


def test_a_per_rank_batch_beside_the_global_batch_is_refused_before_anything_is_built(
        tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.batch_size=3 and "
                                          r"trainer.global_batch_size=2 are both set"):
        train(tiny_cfg("trainer.batch_size=3"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_global_batch_size_that_does_not_divide_is_refused(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="trainer.global_batch_size=5 does not divide"):
        train(tiny_cfg("trainer.global_batch_size=5", "trainer.iter_size=2"), tmp_path)


def test_resume_with_another_max_iters_or_batch_is_refused_with_both_values(tiny_cfg,
                                                                            tmp_path):
    common = ["trainer.max_iters=2", "trainer.eval_interval=100", "trainer.checkpoint_interval=1"]
    train(tiny_cfg(*common), tmp_path / "run")
    resume = f"trainer.resume={tmp_path / 'run'}"
    with pytest.raises(ScheduleChanged) as err:
        train(tiny_cfg(*common, resume, "trainer.max_iters=4"), tmp_path / "a")
    message = str(err.value)
    assert "\n" not in message and "trainer.max_iters 2 -> 4" in message
    assert "trainer.resume_allow_schedule_change=true" in message
    with pytest.raises(ScheduleChanged, match="images per step 2 -> 4"):
        train(tiny_cfg(*common, resume, "trainer.global_batch_size=4"), tmp_path / "b")
    with pytest.raises(ScheduleChanged, match=r"lr \{.*'power': 0.9.*\} -> \{.*'power': 1.0"):
        train(tiny_cfg(*common, resume, "lr.power=1.0"), tmp_path / "c")
    # the same schedule resumes; asked for explicitly, a new max_iters continues to its end
    train(tiny_cfg(*common, resume), tmp_path / "d")
    train(tiny_cfg(*common, resume, "trainer.max_iters=4",
                   "trainer.resume_allow_schedule_change=true"), tmp_path / "e")
    state = checkpoint.load(tmp_path / "e")
    assert state["iteration"] == 4 and state["schedule"]["trainer.max_iters"] == 4


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def _trainer(tmp_path, max_iters: int, base_lr: float, allow: bool = False) -> Trainer:
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=base_lr)
    schedule = {"trainer.max_iters": max_iters, "optim.lr": base_lr}
    return Trainer(model, lambda o, b: {"total": o["out"].mean()}, opt,
                   poly(max_iters, 0.9), lambda start: iter([]), tmp_path,
                   max_iters=max_iters, iter_size=1, precision="fp32", clip_grad_norm=None,
                   log_interval=2, seed=0, device=torch.device("cpu"), schedule=schedule,
                   allow_schedule_change=allow)


def test_an_allowed_change_continues_on_the_new_curve_from_the_first_resumed_step(tmp_path):
    old = _trainer(tmp_path / "old", max_iters=4, base_lr=0.1)
    for _ in range(3):  # three steps of the old poly curve
        old.optimizer.step()
        old.scheduler.step()
    old.iteration = 3
    state = old.state_dict()
    with pytest.raises(ScheduleChanged, match=r"optim.lr 0.1 -> 0.2; trainer.max_iters 4 -> 8"):
        _trainer(tmp_path / "new", max_iters=8, base_lr=0.2).load_state_dict(state, "x")
    new = _trainer(tmp_path / "new", max_iters=8, base_lr=0.2, allow=True)
    new.load_state_dict(state, "x")
    # the step after the resume uses the new curve at iteration 3, not the old one's rate
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * (1 - 3 / 8) ** 0.9)
    new.optimizer.step()
    new.scheduler.step()
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * (1 - 4 / 8) ** 0.9)
