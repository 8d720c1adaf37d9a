"""Class-uniform sampling (``dataset.class_uniform``, segtrain.data.class_uniform): measured on
a Cityscapes miniature in the dataset's own layout, through the functions training calls
(``app.build_train_set``, ``app.build_sampling``, ``loader.train_loader``).

The miniature: 76 images of 32x64 pixels whose labels are 8x8 blocks of 18 of the 19
classes, and one image holding the rare class (``train``, id 16) as a 3x3 patch. With
``pct = 0.5`` each epoch has ``int(76 x 0.5 / 19) = 2`` crops per class, 38 of 76 (the
reference's ``uniform.build_epoch``).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from scipy import ndimage

from segtrain import app, config_schema
from segtrain.data import class_uniform
from segtrain.data.loader import train_loader
from segtrain.errors import ConfigError
from tests.conftest import compose_config
from tests.dataset_miniatures import pattern_image, save_png

IMAGES, HEIGHT, WIDTH, BLOCK = 76, 32, 64, 8
RARE = 16  # trainId of "train"
PCT = 0.5
CROP = 16
BATCH = 4


def write_miniature(root, images: int = IMAGES) -> None:
    """Cityscapes layout with ``*_gtFine_labelTrainIds.png`` labels (read as they are)."""
    common = [c for c in range(19) if c != RARE]
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    for i in range(images):
        block = (rows // BLOCK) * (WIDTH // BLOCK) + cols // BLOCK
        labels = np.asarray(common)[(block + i) % len(common)].astype(np.uint8)
        if i == 7:
            labels[12:15, 40:43] = RARE
        stem = f"aachen_{i:06d}_000019"
        save_png(root / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png",
                 pattern_image(labels))
        save_png(root / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelTrainIds.png",
                 labels)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    write_miniature(root)
    return root


def config(root, *overrides: str):
    return compose_config(["dataset=cityscapes", f"dataset.root={root}",
                           f"dataset.crop_size=[{CROP},{CROP}]", "trainer.num_workers=0",
                           f"dataset.class_uniform.tile={BLOCK}", *overrides])


def stream(cfg, batches: int, start_iter: int = 0, seed: int = 3):
    """The training batches ``start_iter..`` of ``cfg``, as training builds them."""
    train_set = app.build_train_set(cfg)
    loader = train_loader(train_set, BATCH, 0, seed, start_iter=start_iter,
                          class_uniform=app.build_sampling(cfg, train_set))
    it = iter(loader)
    return [next(it) for _ in range(batches)]


def test_tile_centroids_are_the_centres_of_mass_of_each_class_per_tile():
    mask = np.full((20, 30), 255, np.uint8)
    mask[2:5, 3:9] = 1          # tile (0, 0)
    mask[8:10, 1:2] = 1         # tile (0, 0): one centroid of both pieces
    mask[12:20, 16:30] = 2      # tiles (0, 1) and (1, 1), partial ones (the reference drops them)
    mask[0:3, 27:30] = 0        # tile (0, 1)
    got = class_uniform.tile_centroids(mask, 16, 3)
    expected = {}
    for y0 in (0, 16):
        for x0 in (0, 16):
            patch = mask[y0:y0 + 16, x0:x0 + 16]
            for c in range(3):
                if (patch == c).any():
                    cy, cx = ndimage.center_of_mass((patch == c).astype(int))
                    expected.setdefault(c, []).append([x0 + int(cx), y0 + int(cy)])
    assert got == expected and len(got[1]) == 1 and got[2] == [[22, 13], [22, 17]]


def test_each_epoch_centres_pct_of_its_crops_as_the_references_build_epoch(mini):
    cfg = config(mini, f"dataset.class_uniform.pct={PCT}")
    train_set = app.build_train_set(cfg)
    plan = app.build_sampling(cfg, train_set)
    per_class = int(IMAGES * PCT / 19)  # uniform.build_epoch: int(num_epoch * pct / classes)
    assert plan.per_class == per_class == 2
    for epoch in range(3):
        samples = plan.epoch(3, epoch)
        assert len(samples) == IMAGES
        classes = [c.class_id for _, c in samples if c is not None]
        assert sorted(classes) == sorted(list(range(19)) * per_class)
        # the random crops are distinct images (random_sampling of a shuffled list)
        plain = [i for i, c in samples if c is None]
        assert len(set(plain)) == len(plain) == IMAGES - 19 * per_class
        # each centroid lies on its class (tiles and blocks coincide in the miniature)
        for index, c in samples[:20]:
            if c is not None:
                assert train_set.load_mask(index)[0][c.y, c.x] == c.class_id


def test_share_of_centred_crops_and_rare_class_frequency(mini):
    """Over 300 consecutive samples (not whole epochs) the share of centred crops is 0.5
    within 3 binomial standard deviations; the rare class fills crops far more often."""
    n_batches = 75
    uniform = stream(config(mini, f"dataset.class_uniform.pct={PCT}"), n_batches)
    plain = stream(config(mini), n_batches)
    metas = [m for b in uniform for m in b["meta"]]
    centred = [m.get("centroid_class") for m in metas]
    share = np.mean([c is not None for c in centred])
    n = len(metas)
    assert abs(share - PCT) < 3 * np.sqrt(PCT * (1 - PCT) / n), share
    # a centred crop covers its class (the crop holds the centroid, which lies in the class
    # here: tiles and blocks coincide)
    covered = [bool((b["mask"][k] == c).any()) for b in uniform
               for k, c in enumerate(m.get("centroid_class") for m in b["meta"]) if c is not None]
    assert np.mean(covered) > 0.95, np.mean(covered)
    rare_uniform = np.mean([bool((m == RARE).any()) for b in uniform for m in b["mask"]])
    rare_plain = np.mean([bool((m == RARE).any()) for b in plain for m in b["mask"]])
    logging.getLogger("segtrain").info(
        "centred share %.3f; crops with the rare class: %.4f class-uniform, %.4f plain",
        share, rare_uniform, rare_plain)
    # expected: 2 / 76 = 0.026 centred on it, against about 1/76 x 1/8 = 0.0016 plain
    assert rare_uniform > 0.015 and rare_uniform > 5 * rare_plain, (rare_uniform, rare_plain)


def test_a_resumed_stream_is_the_tail_of_the_uninterrupted_one(mini):
    # with HANet's source rows, which follow the same geometry as the centroid
    cfg = config(mini, f"dataset.class_uniform.pct={PCT}", "dataset.augment.hflip=0.5",
                 "+dataset.source_rows=true")
    full = stream(cfg, 24)  # 96 samples: across the epoch boundary at 76
    resumed = stream(cfg, 8, start_iter=16)
    for a, b in zip(full[16:], resumed):
        assert (a["image"] == b["image"]).all() and (a["mask"] == b["mask"]).all()
        assert a["rows"].shape == (BATCH, CROP, CROP) and (a["rows"] == b["rows"]).all()
        assert [m.get("centroid_class") for m in a["meta"]] == \
            [m.get("centroid_class") for m in b["meta"]]
        assert [m["index"] for m in a["meta"]] == [m["index"] for m in b["meta"]]
    other_seed = stream(cfg, 8, start_iter=16, seed=4)
    assert any((a["image"] != b["image"]).any() for a, b in zip(resumed, other_seed))


def test_the_index_is_built_once_cached_and_rebuilt_when_corrupt_or_stale(tmp_path,
                                                                          monkeypatch):
    root = tmp_path / "cityscapes"
    write_miniature(root, images=40)
    builds = []
    real_build = class_uniform.build_index
    monkeypatch.setattr(class_uniform, "build_index",
                        lambda *a, **k: builds.append(1) or real_build(*a, **k))
    cfg = config(root, "dataset.class_uniform.pct=1.0")
    first = app.build_sampling(cfg, app.build_train_set(cfg))
    files = list((root / ".segtrain_cache" / "class_uniform").glob("*.json"))
    assert len(builds) == 1 and len(files) == 1
    assert files[0].name.startswith(f"cityscapes_train_tile{BLOCK}_")
    second = app.build_sampling(cfg, app.build_train_set(cfg))  # a second run: read, not built
    assert len(builds) == 1 and second.epoch(0, 0) == first.epoch(0, 0)
    files[0].write_text(files[0].read_text()[:100])  # a half-written file
    third = app.build_sampling(cfg, app.build_train_set(cfg))
    assert len(builds) == 2 and third.epoch(0, 0) == first.epoch(0, 0)
    assert json.loads(files[0].read_text())["key"]["images"] == 40
    # another tile size, or another image list, is another index
    app.build_sampling(config(root, "dataset.class_uniform.pct=1.0",
                              "dataset.class_uniform.tile=16"), app.build_train_set(cfg))
    assert len(builds) == 3
    write_miniature(root, images=41)
    app.build_sampling(cfg, app.build_train_set(cfg))
    assert len(builds) == 4


def test_a_read_only_root_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    root = tmp_path / "cityscapes"
    write_miniature(root, images=20)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    real_write = class_uniform._write

    def read_only(path, *args):
        if root in path.parents:
            raise PermissionError(30, "Read-only file system")
        return real_write(path, *args)

    monkeypatch.setattr(class_uniform, "_write", read_only)
    cfg = config(root, "dataset.class_uniform.pct=1.0")
    app.build_sampling(cfg, app.build_train_set(cfg))
    assert not (root / ".segtrain_cache").exists() or \
        not list((root / ".segtrain_cache").rglob("*.json"))
    assert len(list((tmp_path / "user" / "segtrain" / "class_uniform").glob("*.json"))) == 1


@pytest.mark.parametrize("override,expected", [
    ("dataset.class_uniform.pct=1.5",
     "dataset.class_uniform.pct=1.5: expected a number in [0, 1] or null"),
    ("dataset.class_uniform.pct=half",
     "dataset.class_uniform.pct='half': expected a number in [0, 1] or null"),
    ("dataset.class_uniform.tile=0", "dataset.class_uniform.tile=0: expected an integer >= 1"),
])
def test_bad_values_are_one_line_errors(override, expected):
    with pytest.raises(ConfigError) as err:
        config_schema.check(compose_config(["dataset=cityscapes", "dataset.root=/x", override]))
    assert str(err.value) == expected


def test_settings_that_cannot_work_are_refused_with_one_line(mini):
    cfg = config(mini, "dataset.class_uniform.pct=0.1")  # 76 x 0.1 / 19 < 1 crop per class
    with pytest.raises(ConfigError) as err:
        app.build_sampling(cfg, app.build_train_set(cfg))
    assert "\n" not in str(err.value) and "dataset.class_uniform.pct=0.1" in str(err.value)
    cfg = config(mini, f"dataset.class_uniform.pct={PCT}", "dataset.augment.crop_size=null")
    with pytest.raises(ConfigError, match="has no crop that takes the centroid") as err:
        app.build_sampling(cfg, app.build_train_set(cfg))
    assert "\n" not in str(err.value)


def test_hanet_samples_as_its_authors_script():
    cfg = compose_config(["experiment=hanet_cityscapes", "dataset.root=/x"])
    # shachoi/HANet scripts/train_r101_os8_hanet.sh: --class_uniform_pct 0.5
    # --class_uniform_tile 1024
    assert cfg.dataset.class_uniform.pct == 0.5 and cfg.dataset.class_uniform.tile == 1024
    assert compose_config(["dataset=cityscapes", "dataset.root=/x"]).dataset.class_uniform.pct \
        is None
