"""CPNet (Yu et al., "Context Prior for Scene Segmentation", CVPR 2020): the prior grid,
the affinity loss by hand (without the diagonal, the official constant for a lone position),
fitting a tiny batch and two steps through the app with its loss terms logged.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segtrain.app import train
from segtrain.errors import ConfigError
from segtrain.losses.affinity import AffinityLoss, affinity_terms, ideal_affinity
from segtrain.models.cpnet import CPNet
from tests.test_models_zoo import tiny_batch

K = 3

# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


def small_cpnet(prior_size, dropout: float = 0.1, aux: int = 16) -> CPNet:
    return CPNet(K, "resnet18", 8, 32, prior_size, 11, 32, aux, dropout, None)


# ---- CPNet's affinity loss -----------------------------------------------------------------

# a 2 x 2 grid, labels [[0, 0], [1, 255]]: positions 0 and 1 share class 0, position 2 is
# alone in class 1, position 3 is ignored. Rows of P (position i towards j); column 3 and
# row 3 never count.
P = torch.tensor([[0.9, 0.6, 0.2, 0.5],
                  [0.5, 0.8, 0.4, 0.5],
                  [0.3, 0.1, 0.7, 0.5],
                  [0.5, 0.5, 0.5, 0.5]])[None]
MASK = torch.tensor([[[0, 0], [1, 255]]])


def official_global_sum(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The official global term before its mean over rows, written from its definition:
    zero denominators replaced by 1, each ratio r entering as BCE(r, 1) = -max(log r, -100)."""
    vt = a * (1 - torch.eye(a.shape[-1]))
    parts = [(p * vt).sum(-1) / vt.sum(-1).masked_fill(vt.sum(-1) == 0, 1),
             (p * vt).sum(-1) / p.sum(-1),
             ((1 - p) * (1 - a)).sum(-1) / (1 - a).sum(-1).masked_fill((1 - a).sum(-1) == 0, 1)]
    return sum(F.binary_cross_entropy(r, torch.ones_like(r), reduction="sum") for r in parts)


def test_cpnet_resizes_other_feature_sizes_to_its_prior_grid():
    """A 9x12 feature map against a 4x4 prior grid (whole-image evaluation): pooled to the
    grid, contexts brought back; output still at the input size."""
    model = small_cpnet((4, 4)).train()
    out = model(torch.randn(1, 3, 67, 93))
    assert out["prior"].shape == (1, 16, 16) and out["out"].shape == (1, K, 67, 93)
    with pytest.raises(ConfigError, match="prior_size"):
        small_cpnet((4,))


@pytest.mark.slow  # 80 steps of a ResNet-18 CPNet: 25 s on an idle machine
def test_cpnet_fits_one_tiny_batch_with_the_affinity_loss():
    torch.manual_seed(0)
    model = small_cpnet((4, 4), dropout=0.0).train()
    loss_fn = AffinityLoss(255, None, 0.4, (4, 4))
    image, mask = tiny_batch()
    # the sigmoid prior saturates slowly (its BCE falls like 1/steps): a higher rate, and 80
    # steps (60 fell just short once the global term left the diagonal out, as the official
    # code does)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(80):
        terms = loss_fn(model(image), {"mask": mask})
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        losses.append({k: v.item() for k, v in terms.items()})
    assert losses[-1]["total"] < 0.1 * losses[0]["total"], (losses[0], losses[-1])
    assert losses[-1]["unary"] < 0.2 * losses[0]["unary"]
    assert losses[-1]["global"] < 0.2 * losses[0]["global"]


def test_cpnet_with_the_affinity_loss_trains_two_steps_and_logs_its_terms(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("model=cpnet", "model.backbone=resnet18", "model.prior_size=[4,4]",
                   "loss=affinity", "trainer.max_iters=2", "trainer.eval_interval=2",
                   "trainer.log_interval=1", "dataset.val.num_samples=2")
    assert cfg.loss.prior_size == [4, 4]  # read from the model config
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    tags = set(EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"])
    assert {f"train/loss/{t}" for t in ("ce", "aux", "unary", "global", "total")} <= tags


def test_affinity_loss_by_hand_without_the_diagonal():
    a, valid = ideal_affinity(MASK, (2, 2), 255)
    assert valid.tolist() == [[True, True, True, False]]
    unary, global_ = affinity_terms(P, a, valid)
    log = math.log
    # unary: BCE over the 9 valid pairs, diagonal included (a = 1 on 00, 01, 10, 11, 22)
    same, other = [0.9, 0.6, 0.5, 0.8, 0.7], [0.2, 0.4, 0.3, 0.1]
    assert unary.item() == pytest.approx(
        -(sum(map(log, same)) + sum(log(1 - p) for p in other)) / 9, rel=1e-6)
    # row 0: recall p01 / 1, precision p01 / (p00 + p01 + p02), specificity (1 - p02) / 1
    row0 = -(log(0.6) + log(0.6 / 1.7) + log(0.8))
    row1 = -(log(0.5) + log(0.5 / 1.7) + log(0.6))
    row2 = -log((0.7 + 0.9) / 2)  # alone in its class: specificity only
    assert global_.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)
    # with the diagonal (the paper's sums read literally)
    _, with_diag = affinity_terms(P, a, valid, include_diagonal=True)
    row0 = -(log(1.5 / 2) + log(1.5 / 1.7) + log(0.8))
    row1 = -(log(1.3 / 2) + log(1.3 / 1.7) + log(0.6))
    row2 = -(log(0.7) + log(0.7 / 1.1) + log(0.8))
    assert with_diag.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)


def test_affinity_loss_lone_position_official_constant_same_gradient():
    """No ignored position: ours = the official term less 200 per lone row (its clamp's
    constant), with the same gradient."""
    mask = torch.tensor([[[0, 0, 1], [2, 0, 2]]])  # class 1 alone at position 2
    a, valid = ideal_affinity(mask, (2, 3), 255)
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 6, requires_grad=True)
    ours = affinity_terms(torch.sigmoid(logits), a, valid)[1] * 6
    theirs = official_global_sum(torch.sigmoid(logits), a)
    assert theirs.item() - ours.item() == pytest.approx(200.0, rel=1e-5)
    g_ours, = torch.autograd.grad(ours, logits)
    g_theirs, = torch.autograd.grad(theirs, logits)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6)
