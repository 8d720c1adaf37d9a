"""HANet indexes its positional encoding by each pixel's row in the full image, as the
authors' code (shachoi/HANet 656bedc): the training pipeline carries the source rows through
scale / pad / crop / flip (``dataset.source_rows``), the trainer hands them to models that
declare ``TAKES_ROWS``, and ``HeightAttention`` turns them into the coarse row index the
reference's way (``network/PosEmbedding.py`` ``PosEncoding1D.forward``), with its training
jitter (``--pos_noise``). Without rows, the network's own rows, as before.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segtrain.data.base import SegmentationDataset
from segtrain.data.transforms import compose, seed_independently, train_augmentation
from segtrain.errors import ConfigError
from segtrain.eval.inference import Predictor
from segtrain.models.base import SegmentationModel
from segtrain.models.modules.height_attention import HeightAttention, coarse_row_index

pytestmark = pytest.mark.usefixtures("one_thread")


def fraction_rows(first: int, count: int, height: int, width: int, batch: int = 1):
    """Rows ``first .. first + count - 1`` of a ``height``-row image as fractions of it,
    N x count x width (what ``dataset.source_rows`` puts in the batch)."""
    rows = (first + torch.arange(count, dtype=torch.float32)) / height
    return rows[None, :, None].expand(batch, count, width).contiguous()


def reference_index(rows_in_full_image: torch.Tensor, coarse_height: int) -> torch.Tensor:
    """The reference's rule, transcribed: datasets/cityscapes.py builds pos_h = row // 8 of
    the 1024-row frame (uint8), the joint transforms resize it by nearest neighbour and
    crop it with the image; PosEncoding1D divides by pos_rfactor (128 // coarse_height),
    takes column 0, and resizes to the coarse height by nearest neighbour."""
    pos_rfactor = 128 // coarse_height
    pos_h = (rows_in_full_image // 8).to(torch.uint8)  # B x H x W
    pos_h = pos_h // pos_rfactor
    pos_h = pos_h.index_select(2, torch.tensor([0])).unsqueeze(1).squeeze(3)  # B x 1 x H
    return F.interpolate(pos_h.float(), size=coarse_height, mode="nearest").long()[:, 0]


def test_crop_from_the_lower_half_uses_the_full_image_rows():
    """Rows 512-767 of a 1024-row frame, fed as a 256-row input: coarse rows 8..11, each
    four times (row 512 + 16 i // 64), not 0..15 (the crop's own rows, the old rule)."""
    rows = fraction_rows(512, 256, 1024, 8, batch=2)
    index = coarse_row_index(rows, 16)
    by_hand = torch.tensor([8 + i // 4 for i in range(16)])
    assert torch.equal(index, by_hand.expand(2, 16))
    full_rows = (512 + torch.arange(256))[None, :, None].expand(2, 256, 8)
    assert torch.equal(index, reference_index(full_rows, 16))


def test_attention_adds_the_encoding_of_the_full_image_rows():
    torch.manual_seed(0)
    module = HeightAttention(32, 6, 16, 8, 3, 0.0).eval()
    low, high = torch.randn(2, 32, 32, 5), torch.randn(2, 6, 32, 5)
    rows = fraction_rows(512, 256, 1024, 40, batch=2)  # the input's rows, 8x the feature map's
    with torch.no_grad():
        out = module(low, high, rows=rows)
        z = F.adaptive_avg_pool2d(low, (16, 1)).squeeze(3)
        index = torch.tensor([8 + i // 4 for i in range(16)])
        q = module.conv1(z) + module.pe[:, index]
        a = torch.sigmoid(module.conv3(module.conv2(q)))
        expected = high * F.interpolate(a, size=32, mode="linear")[..., None]
        relative = module(low, high)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, relative, atol=1e-3)  # the crop's own rows differ


def test_identity_rows_give_the_output_without_rows():
    """Whole-image evaluation: the rows of the input itself change nothing (bit-identical)."""
    from tests.test_hanet import small_hanet

    torch.manual_seed(0)
    model = small_hanet(dropout=0.0).eval()
    image = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        plain = model(image)["out"]
        with_rows = model(image, rows=fraction_rows(0, 64, 64, 48))["out"]
    assert torch.equal(plain, with_rows)
    assert torch.equal(coarse_row_index(fraction_rows(0, 1024, 1024, 3), 16),
                       torch.arange(16)[None])


def test_padding_rows_take_the_tables_last_entry():
    """The reference pads its position map with 128 (IGNORE_POS), i.e. coarse row
    128 // pos_rfactor = 16, the 17th row of its table; segtrain's padding value is 1.0."""
    rows = fraction_rows(960, 64, 1024, 4)
    rows[:, 32:] = 1.0  # bottom half padded
    index = coarse_row_index(rows, 16)
    assert index.tolist() == [[15] * 8 + [16] * 8]
    assert HeightAttention(32, 6, 16, 8, 3, 0.0).pe.shape[1] == 17


def test_training_jitter_follows_the_reference():
    """--pos_noise s: floor(N(0, s)) clamped to +-16 // pos_rfactor (2 at 16 coarse rows),
    then the index clamped to 0..16; only in training."""
    torch.manual_seed(0)
    rows = fraction_rows(0, 64, 64, 4, batch=256)
    index = coarse_row_index(rows, 16)
    jittered = coarse_row_index(rows, 16, noise=0.5)
    shift = jittered - index
    assert shift.abs().max() <= 2 and (shift != 0).any()
    assert jittered.min() >= 0 and jittered.max() <= 16
    assert (shift < 0).any() and (shift > 0).any()  # floor(N(0, 0.5)): mostly -1 or 0
    module = HeightAttention(32, 6, 16, 8, 3, 0.0, pos_noise=0.5)
    low, high = torch.randn(2, 32, 16, 3), torch.randn(2, 6, 16, 3)
    with torch.no_grad():
        module.eval()  # no jitter: the same output twice, with or without rows
        assert torch.equal(module(low, high, rows=rows[:2]), module(low, high, rows=rows[:2]))
        assert torch.equal(module(low, high), module(low, high))
        module.train()  # a jitter drawn per call, also on the input's own rows
        assert not torch.equal(module(low, high, rows=rows[:2]), module(low, high, rows=rows[:2]))
        assert not torch.equal(module(low, high), module(low, high))


# ---- the rows through the data pipeline -------------------------------------------------

class RowImage(SegmentationDataset):
    """One float32 image whose value is its row (0..199), labels all 0."""

    class_names = ("a", "b")
    name = "rows"

    def __init__(self, transforms=None, height: int = 200, width: int = 60,
                 keep_rows: bool = False) -> None:
        super().__init__(transforms, 255, keep_rows=keep_rows)
        self.height, self.width = height, width

    def __len__(self) -> int:
        return 1

    def load(self, index):
        rows = np.arange(self.height, dtype=np.float32)[:, None, None]
        image = np.ascontiguousarray(np.broadcast_to(rows, (self.height, self.width, 3)))
        return image, np.zeros((self.height, self.width), np.uint8), {"name": "rows"}


def test_rows_follow_scale_pad_crop_and_flip_of_the_image():
    """The augmented rows map (x source height) is the row each augmented pixel of the image
    shows: the image is resampled bilinearly, the map by nearest neighbour, so they agree to
    half a source row; padded pixels are 1.0 in the map, the mean in the image, void in the
    mask."""
    steps = train_augmentation(mean=[0, 0, 0], std=[1, 1, 1], ignore_index=255,
                               scales=[0.5, 2.0], continuous_scale=True, rotate=0,
                               elastic_std=0, blur=0.0, crop_size=[150, 48], hflip=0.5,
                               color_jitter=0.0)
    pipeline = compose(steps)
    ds = RowImage(pipeline, keep_rows=True)
    padded = shifted = 0
    for position in range(12):
        seed_independently(pipeline, 0, position)
        item = ds[0]
        rows, shown = item["rows"].numpy(), item["image"][0].numpy() * 255.0
        assert rows.shape == (150, 48) and rows.dtype == np.float32
        pad = rows == 1.0
        source = rows * 200
        assert np.abs(source[~pad] - np.round(source[~pad])).max() < 1e-3  # whole rows
        assert np.abs(source[~pad] - shown[~pad]).max() <= 0.5 + 1e-3
        assert np.all(shown[pad] == 0) and np.all(item["mask"].numpy()[pad] == 255)
        padded += pad.any()
        shifted += source[0, 0] > 0
    assert padded and shifted  # both a padded crop and one away from the top were seen
    assert "rows" not in RowImage(compose(steps))[0]


def test_collate_stacks_rows_only_where_items_have_them():
    from segtrain.data.loader import collate

    normalize = [A.Normalize(mean=[0, 0, 0], std=[1, 1, 1])]
    ds = RowImage(compose(normalize), height=8, width=4)
    assert "rows" not in collate([ds[0], ds[0]])
    ds = RowImage(compose(normalize), height=8, width=4, keep_rows=True)
    batch = collate([ds[0], ds[0]])
    assert batch["rows"].shape == (2, 8, 4)
    assert torch.equal(batch["rows"][0, :, 0], torch.arange(8) / 8)  # no augmentation: identity


# ---- the trainer, the app and inference --------------------------------------------------

def test_hanet_experiment_trains_with_rows_through_the_app(tmp_path, monkeypatch):
    """experiment=hanet_cityscapes on a Cityscapes miniature: the training batches carry
    the rows of the random scale / crop and the trainer hands them to HANet; evaluation on
    whole images passes none."""
    from segtrain import app
    from segtrain.models.hanet import HANet
    from tests.conftest import compose_config
    from tests.dataset_miniatures import make_cityscapes

    make_cityscapes(tmp_path, {"train": {"aachen": 2}, "val": {"frankfurt": 1}},
                    height=64, width=128)
    seen = []
    forward = HANet.forward

    def recording(self, image, rows=None):
        seen.append((self.training, None if rows is None else rows.clone()))
        return forward(self, image, rows)

    monkeypatch.setattr(HANet, "forward", recording)
    cfg = compose_config([
        "experiment=hanet_cityscapes", f"dataset.root={tmp_path}", "model.pretrained=null",
        "model.backbone=resnet18", "model.decoder_channels=32", "model.aux_channels=32",
        "model.output_stride=16", "dataset.crop_size=[32,32]", "dataset.num_workers=0",
        "trainer.num_workers=0", "trainer.device=cpu", "trainer.resume=null",
        "trainer.max_iters=1", "trainer.global_batch_size=2",
        "trainer.eval_interval=1", "trainer.log_interval=1", "trainer.checkpoint_interval=1",
        # two images give no class-uniform crop (tests/test_class_uniform.py samples so)
        "dataset.class_uniform.pct=null",
        # whole-image evaluation (the experiment's own is the authors' sliding windows, whose
        # rows the sliding-window tests below check)
        "eval=whole"])
    assert cfg.dataset.source_rows is True and cfg.model.pos_noise == 0.5
    metrics = app.train(cfg, tmp_path / "run")
    assert 0.0 <= metrics["miou"] <= 1.0
    train_rows = [rows for training, rows in seen if training]
    assert len(train_rows) == 1 and train_rows[0].shape == (2, 32, 32)
    rows = train_rows[0]
    assert rows.min() >= 0 and rows.max() <= 1
    assert torch.all(rows == rows[:, :, :1])  # a row's pixels share their source row
    assert all(rows is None for training, rows in seen if not training)


def test_other_models_get_no_rows_and_refuse_them(tiny_cfg):
    from segtrain import app

    cfg = tiny_cfg()
    assert cfg.dataset.get("source_rows") is None
    assert set(app.build_train_set(cfg)[0]) == {"image", "mask", "meta"}
    cfg = tiny_cfg("+dataset.source_rows=true")
    assert "rows" in app.build_train_set(cfg)[0]
    with pytest.raises(ConfigError, match=r"dataset.source_rows=true: .* takes no rows"):
        app.check_takes_rows(cfg, app.build_model(cfg))


class RowsProbe(SegmentationModel):
    """Records the rows it is given; logits of zeros."""

    TAKES_ROWS = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def forward(self, image, rows=None):
        self.calls.append(rows)
        return {"out": torch.zeros(image.shape[0], 2, *image.shape[-2:])}


def test_sliding_window_passes_each_windows_rows():
    probe = RowsProbe()
    Predictor("slide", crop_size=(8, 8), stride=(6, 6))(probe, torch.zeros(1, 3, 12, 10))
    firsts = sorted({round(float(r[0, 0, 0]) * 12) for r in probe.calls})
    assert firsts == [0, 4]  # windows at rows 0 and 12 - 8
    for rows in probe.calls:
        assert rows.shape == (1, 8, 8)
        first = int(round(float(rows[0, 0, 0]) * 12))
        assert torch.allclose(rows[0, :, 0], (first + torch.arange(8)) / 12)
    Predictor("whole")(probe, torch.zeros(1, 3, 12, 10))
    assert probe.calls[-1] is None
    probe.calls.clear()
    Predictor("slide", crop_size=(16, 8), stride=(6, 6))(probe, torch.zeros(1, 3, 12, 8))
    assert probe.calls[0][0, 12:, 0].eq(1.0).all()  # rows padded below the image
