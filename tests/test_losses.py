"""Losses: cross-entropy, OHEM and CPNet's affinity loss.

Hand-made examples with values computed independently (a literal ideal affinity map, the
closed form of the affinity terms at a uniform prior, OHEM's kept pixels by hand), class
weights and the auxiliary weight for every loss config, and the keys each loss requires.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from segtrain.app import class_weights
from segtrain.errors import ConfigError
from segtrain.losses.affinity import AffinityLoss, affinity_terms, ideal_affinity
from segtrain.losses.ce import CrossEntropyLoss, OhemCrossEntropyLoss
from tests.conftest import CONF_DIR, compose_config

IGNORE = 255
# A 4x4 label: class 0 top-left, class 1 top-right, class 2 below, two ignored pixels.
LABEL = torch.tensor([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 2, IGNORE],
                      [2, 2, 2, IGNORE]])
# Its ideal affinity map, written out row by row (position = 4 * row + column): a row is
# 1 at the positions of the same class; the rows and columns of positions 11 and 15
# (ignored) are zero.
C0, C1, C2, IG = ("1100110000000000", "0011001100000000", "0000000011101110",
                  "0000000000000000")
EXPECTED_A = torch.tensor([[float(c) for c in row] for row in (
    C0, C0, C1, C1, C0, C0, C1, C1, C2, C2, C2, IG, C2, C2, C2, IG)])


def test_ideal_affinity_map_of_a_hand_made_label():
    a, valid = ideal_affinity(LABEL[None], (4, 4), IGNORE)
    assert a.shape == (1, 16, 16)
    assert torch.equal(a[0], EXPECTED_A)
    assert valid[0].tolist() == [i not in (11, 15) for i in range(16)]
    # the label downsampled (nearest) from 8x8: each label pixel is a 2x2 block
    big = LABEL.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(ideal_affinity(big[None], (4, 4), IGNORE)[0][0], EXPECTED_A)


def test_ignored_pixels_do_not_enter_the_affinity_loss():
    a, valid = ideal_affinity(LABEL[None], (4, 4), IGNORE)
    torch.manual_seed(0)
    prior = torch.rand(1, 16, 16)
    before = affinity_terms(prior, a, valid)
    changed = prior.clone()
    changed[:, [11, 15], :] = torch.rand(2, 16)
    changed[:, :, [11, 15]] = torch.rand(16, 2)
    after = affinity_terms(changed, a, valid)
    assert torch.allclose(before[0], after[0]) and torch.allclose(before[1], after[1])
    # the same two pixels labelled (class 1) do enter it
    labelled = LABEL.clone()
    labelled[2:, 3] = 1
    a2, valid2 = ideal_affinity(labelled[None], (4, 4), IGNORE)
    assert not torch.allclose(affinity_terms(changed, a2, valid2)[0],
                              affinity_terms(prior, a2, valid2)[0])


def test_affinity_terms_at_a_uniform_prior_closed_form():
    """P = 1/2: BCE = log 2 everywhere; per row, recall = 1/2 and specificity = 1/2;
    precision = (n_same - 1) / n_valid without the diagonal (the official code's default),
    n_same / n_valid with it, so the global term is mean_i -log(precision_i) + 2 log 2."""
    a, valid = ideal_affinity(LABEL[None], (4, 4), IGNORE)
    half = torch.full((1, 16, 16), 0.5)
    unary, global_ = affinity_terms(half, a, valid)
    assert unary.item() == pytest.approx(math.log(2), rel=1e-6)
    sizes = [4] * 4 + [4] * 4 + [6] * 6  # rows of class 0, class 1, class 2
    expected = sum(-math.log((n - 1) / 14) for n in sizes) / 14 + 2 * math.log(2)
    assert global_.item() == pytest.approx(expected, rel=1e-6)
    with_diagonal = affinity_terms(half, a, valid, include_diagonal=True)[1]
    expected = sum(-math.log(n / 14) for n in sizes) / 14 + 2 * math.log(2)
    assert with_diagonal.item() == pytest.approx(expected, rel=1e-6)


def test_affinity_loss_is_lower_at_the_ideal_prior_than_at_a_uniform_one():
    loss = AffinityLoss(IGNORE, None, 0.4, (4, 4))
    mask = LABEL.repeat_interleave(2, 0).repeat_interleave(2, 1)[None]  # 8x8
    logits = torch.zeros(1, 3, 8, 8)
    a, _ = ideal_affinity(mask, (4, 4), IGNORE)
    ideal = loss({"out": logits, "prior": a}, {"mask": mask})
    uniform = loss({"out": logits, "prior": torch.full_like(a, 0.5)}, {"mask": mask})
    # the official precision keeps p_ii in its denominator only: at P = A it is
    # (n - 1) / n for a class of n positions (here 4, 4 and 6 of the 14 valid)
    sizes = [4] * 8 + [6] * 6
    assert ideal["unary"] < 1e-5
    assert ideal["global"].item() == pytest.approx(
        sum(-math.log((n - 1) / n) for n in sizes) / 14, abs=1e-4)
    literal = AffinityLoss(IGNORE, None, 0.4, (4, 4), include_diagonal=True)
    assert literal({"out": logits, "prior": a}, {"mask": mask})["global"] < 1e-4
    assert uniform["unary"] > 0.6 and uniform["global"] > 1.0
    assert ideal["total"] < uniform["total"]
    assert set(ideal) == {"ce", "unary", "global", "total"}
    assert ideal["total"] == pytest.approx(
        (ideal["ce"] + ideal["unary"] + ideal["global"]).item(), rel=1e-6)


def test_affinity_loss_needs_the_models_prior_grid():
    loss = AffinityLoss(IGNORE, None, 0.4, (3, 3))
    out = {"out": torch.zeros(1, 3, 8, 8), "prior": torch.full((1, 16, 16), 0.5)}
    with pytest.raises(ConfigError, match="prior_size"):
        loss(out, {"mask": torch.zeros(1, 8, 8, dtype=torch.long)})


# ---- OHEM -------------------------------------------------------------------------------

# true-class probabilities of six labelled pixels (class 0 of two), and an ignored one
PROBS = [0.1, 0.5, 0.69, 0.71, 0.9, 0.95, 0.05]


def ohem_example() -> tuple[torch.Tensor, torch.Tensor]:
    """1 x 2 x 1 x 7 logits whose class-0 softmax is PROBS; the last pixel is ignored."""
    p = torch.tensor(PROBS, dtype=torch.float64)
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)])  # sigmoid(z) = p
    target = torch.zeros(1, 1, 7, dtype=torch.long)
    target[0, 0, 6] = IGNORE
    return logits[None, :, None, :].float(), target


@pytest.mark.parametrize("min_kept, kept", [
    (2, [0, 1, 2]),              # three pixels below 0.7 >= 2: the threshold stays 0.7
    (5, [0, 1, 2, 3, 4]),        # only three below 0.7: raised to the 5th smallest, 0.9
    (6, [0, 1, 2, 3, 4, 5]),     # min_kept >= the labelled pixels: all of them
    (0, [0, 1, 2]),
])
def test_ohem_keeps_exactly_the_hard_pixels(min_kept, kept):
    logits, target = ohem_example()
    loss = OhemCrossEntropyLoss(IGNORE, None, 0.4, thresh=0.7, min_kept=min_kept)
    mask = loss.kept_mask(logits, target)[0, 0]
    assert torch.nonzero(mask).flatten().tolist() == kept  # the ignored pixel never
    expected = sum(-math.log(PROBS[i]) for i in kept) / len(kept)
    assert loss({"out": logits}, {"mask": target})["ce"].item() == pytest.approx(
        expected, rel=1e-5)


# ---- class weights and the auxiliary weight, for every loss -----------------------------

def make_losses(weights):
    return {
        "ce": CrossEntropyLoss(IGNORE, weights, 0.4),
        "ohem": OhemCrossEntropyLoss(IGNORE, weights, 0.4, thresh=0.7, min_kept=10**9),
        "affinity": AffinityLoss(IGNORE, weights, 0.4, (2, 2)),
    }


def test_class_weights_and_aux_weight_act_in_every_loss():
    torch.manual_seed(0)
    logits, aux = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    mask = torch.randint(0, 3, (2, 6, 6))
    mask[0, 0] = IGNORE
    outputs = {"out": logits, "aux": aux, "prior": torch.rand(2, 4, 4)}
    weights = [0.2, 1.0, 5.0]
    w = torch.tensor(weights)
    ref = F.cross_entropy(logits, mask, weight=w, ignore_index=IGNORE)
    ref_aux = F.cross_entropy(aux, mask, weight=w, ignore_index=IGNORE)
    plain = F.cross_entropy(logits, mask, ignore_index=IGNORE)
    weighted, unweighted = make_losses(weights), make_losses(None)
    for name, loss in weighted.items():
        terms = loss(outputs, {"mask": mask})
        assert terms["ce"].item() == pytest.approx(ref.item(), rel=1e-5), name
        assert terms["aux"].item() == pytest.approx(ref_aux.item(), rel=1e-5), name
        extra = sum(terms[k] for k in ("unary", "global") if k in terms)
        assert terms["total"].item() == pytest.approx(
            (ref + 0.4 * ref_aux + extra).item(), rel=1e-5), name
        base = unweighted[name](outputs, {"mask": mask})
        assert base["ce"].item() == pytest.approx(plain.item(), rel=1e-5), name
        assert abs(base["ce"].item() - terms["ce"].item()) > 1e-3, name


def test_every_loss_config_takes_class_weights_from_the_app():
    """``loss=<any> loss.class_weights=[...]``: the app resolves them and every loss uses
    them (``median_freq`` goes through the same argument)."""
    names = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
    assert {"ce", "ohem", "affinity"} <= set(names)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # the embedded dataset's 6 classes
    for name in names:
        cfg = compose_config([f"loss={name}", "model=cpnet",
                              f"loss.class_weights=[{','.join(map(str, weights))}]"])
        loss = instantiate(cfg.loss, class_weights=class_weights(cfg))
        assert loss.weight.tolist() == weights, name
        assert loss.aux_weight == 0.4, name


def test_required_keys():
    assert CrossEntropyLoss.required_keys == frozenset({"out"})
    assert OhemCrossEntropyLoss.required_keys == frozenset({"out"})
    assert AffinityLoss.required_keys == frozenset({"out", "prior"})


def _hand_weighted_ce(logits: np.ndarray, target: np.ndarray, weights: np.ndarray,
                      ignore: int) -> tuple[float, float, float]:
    """sum_i w_{y_i} * -log softmax(x_i)[y_i] over the valid pixels, sum_i w_{y_i}, count."""
    total = weight_sum = count = 0.0
    n, c, h, w = logits.shape
    for b in range(n):
        for y in range(h):
            for x in range(w):
                label = int(target[b, y, x])
                if label == ignore:
                    continue
                z = logits[b, :, y, x].astype(np.float64)
                log_p = z[label] - (np.log(np.exp(z - z.max()).sum()) + z.max())
                total += weights[label] * -log_p
                weight_sum += weights[label]
                count += 1
    return total, weight_sum, count


@pytest.mark.parametrize("loss_cls", [CrossEntropyLoss, OhemCrossEntropyLoss])
def test_loss_normalization_weight_sum_and_valid_count_by_hand(loss_cls):
    """PyTorch's weighted mean divides by the valid pixels' summed weights; Caffe's
    SoftmaxWithLoss (the SegNet reference) by their number."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=gen)
    target = torch.randint(0, 3, (2, 4, 5), generator=gen)
    target[0, 0, :3] = 255
    weights = np.array([0.2, 1.0, 4.5])
    total, weight_sum, count = _hand_weighted_ce(logits.numpy(), target.numpy(), weights, 255)
    assert abs(weight_sum - count) > 1  # the two normalisations differ on this batch
    extra = {"min_kept": 10**6} if loss_cls is OhemCrossEntropyLoss else {}  # keeps all
    for normalization, expected in (("weight_sum", total / weight_sum),
                                    ("valid_count", total / count)):
        loss = loss_cls(255, list(weights), normalization=normalization, **extra)
        got = loss({"out": logits}, {"mask": target})["ce"]
        assert got.item() == pytest.approx(expected, rel=1e-5), normalization


def test_loss_normalization_is_checked_and_set_by_the_segnet_experiments(tmp_path):
    with pytest.raises(ConfigError, match="loss.normalization must be one of"):
        CrossEntropyLoss(255, normalization="mean")
    assert compose_config([]).loss.normalization == "weight_sum"
    for name in ("segnet_basic_camvid", "segnet_camvid"):
        cfg = compose_config([f"experiment={name}", f"dataset.root={tmp_path}"])
        assert cfg.loss.normalization == "valid_count", name


# -- label_grid: where a resized label reads the full one -------------------------------------
@pytest.mark.parametrize("size_in,size_out", [((768, 768), (96, 96)), ((65, 70), (9, 9)),
                                              ((64, 48), (8, 6)), ((33, 17), (5, 4))])
def test_floor_grid_is_pytorch_nearest_interpolation(size_in, size_out):
    """label_grid=floor reads what F.interpolate(mode="nearest") reads (HANet's aux labels)."""
    from segtrain.losses.ce import resize_labels

    mask = torch.randint(0, 19, (2, *size_in))
    ref = F.interpolate(mask[:, None].float(), size=size_out, mode="nearest")[:, 0].long()
    assert torch.equal(resize_labels(mask, size_out, "floor"), ref)


def test_aligned_grid_reads_every_8th_label_of_a_321_crop():
    """label_grid=aligned (default): 321 -> 41 reads rows 0, 8, ..., 320 (Caffe's Interp)."""
    from segtrain.losses.ce import resize_labels

    mask = torch.arange(321).view(1, 321, 1).expand(1, 321, 3)
    assert resize_labels(mask, (41, 3))[0, :, 0].tolist() == list(range(0, 321, 8))
    # the two grids differ on a 768 crop at stride 8: the last row reads 767 vs 760
    tall = torch.arange(768).view(1, 768, 1)
    assert resize_labels(tall, (96, 1))[0, -1, 0] == 767
    assert resize_labels(tall, (96, 1), "floor")[0, -1, 0] == 760


def test_the_aux_term_uses_the_configured_grid():
    mask = torch.randint(0, 3, (1, 64, 64))
    aux = torch.randn(1, 3, 7, 7)
    out = {"out": torch.randn(1, 3, 64, 64), "aux": aux}
    floor = CrossEntropyLoss(label_grid="floor")(out, {"mask": mask})["aux"]
    aligned = CrossEntropyLoss()(out, {"mask": mask})["aux"]
    expected = F.cross_entropy(aux, F.interpolate(mask[:, None].float(), size=(7, 7),
                                                  mode="nearest")[:, 0].long())
    assert torch.allclose(floor, expected) and not torch.allclose(aligned, expected)


def test_hanet_experiment_samples_aux_labels_as_its_reference():
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=hanet_cityscapes", "dataset.root=/x"])
    assert cfg.loss.label_grid == "floor"
    assert compose_config([]).loss.label_grid == "aligned"


def test_a_bad_label_grid_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="loss.label_grid must be one of aligned, floor"):
        CrossEntropyLoss(label_grid="bilinear")
