"""What each paper experiment trains, resolved by training's own code (``segtrain.protocol``
calls ``app.train_batch``, ``app.build_model`` on the meta device, ``app.param_groups`` and
``app.build_inference``), against the paper's stated values: the protocol block of each
``conf/experiment/paper/*.yml``, the paper tables, the one batch convention."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from segtrain import app, protocol
from segtrain.errors import ConfigError
from tests.cli_in_process import run_module
from tests.conftest import REPO, compose_config

PAPER_FILES = sorted(protocol.PAPER_DIR.glob("*.yml"))
EXPERIMENTS = protocol.experiments()
PAPER_EXPERIMENTS = [p.stem for p in PAPER_FILES]


def _effective(*overrides: str, ranks: int = 1) -> dict:
    return protocol.effective(compose_config(list(overrides)), ranks)


# --- the one batch convention ----------------------------------------------------------------

def test_a_per_rank_and_a_global_batch_together_are_refused_in_one_line():
    cfg = compose_config(["trainer.batch_size=4", "trainer.global_batch_size=16"])
    with pytest.raises(ConfigError) as err:
        app.train_batch(cfg, 1)
    message = str(err.value)
    assert "\n" not in message
    assert "trainer.batch_size=4" in message and "trainer.global_batch_size=16" in message


def test_a_per_rank_batch_alone_is_per_rank():
    cfg = compose_config(["trainer.global_batch_size=null", "trainer.batch_size=4",
                          "trainer.iter_size=2"])
    batch = app.train_batch(cfg, 3)
    assert (batch.per_rank, batch.images_per_step) == (4, 24)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_state_only_the_global_batch(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.trainer.batch_size is None and cfg.trainer.global_batch_size is not None


def _stated(experiment: str, section: str, key: str) -> bool:
    """Whether ``conf/experiment/<experiment>.yaml`` or an experiment it extends sets it."""
    node = yaml.safe_load((REPO / "conf" / "experiment" / f"{experiment}.yaml").read_text())
    if key in (node.get(section) or {}):
        return True
    return any(_stated(d, section, key) for d in node.get("defaults", [])
               if isinstance(d, str) and d != "_self_")


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_no_paper_experiment_trains_the_trainer_defaults_schedule(experiment):
    """CPNet x3 and DSRL trained the trainer default's 500 iterations."""
    assert _stated(experiment, "trainer", "max_iters"), experiment
    assert _stated(experiment, "trainer", "global_batch_size"), experiment
    assert _effective(f"experiment={experiment}")["max_iters"] >= 1000, experiment


@pytest.mark.parametrize("experiment,paper_batch", [
    ("spnet_ade20k", 16), ("spnet_pascal_context", 16), ("cpnet_ade20k", 16),
    ("cpnet_cityscapes", 16), ("cpnet_pascal_context", 16), ("deeplabv2_pascal_context", 10)])
def test_the_papers_batch_does_not_depend_on_the_number_of_gpus(experiment, paper_batch):
    """These set only a per-rank batch: SPNet on one GPU took 4 images per step."""
    for ranks in (1, 8) if paper_batch % 8 == 0 else (1, 2):
        assert _effective(f"experiment={experiment}", ranks=ranks)["images_per_step"] == \
            paper_batch, (experiment, ranks)


# DeepLab v2 TABLE 2 (arXiv 1606.00915v2): policy, batch, iterations
TABLE2 = {"deeplabv2_table2_step_b30_6k": ("step", 30, 6000),
          "deeplabv2_table2_poly_b30_6k": ("poly", 30, 6000),
          "deeplabv2_table2_poly_b30_10k": ("poly", 30, 10000),
          "deeplabv2_table2_poly_b10_10k": ("poly", 10, 10000),
          "deeplabv2_table2_poly_b10_20k": ("poly", 10, 20000)}


@pytest.mark.parametrize("row", sorted(TABLE2))
def test_deeplabv2_table2_rows_train_their_batch_on_1_2_and_3_ranks(row):
    """The batch-30 rows stopped at start-up and the batch-10 rows trained at 20."""
    policy, batch, iters = TABLE2[row]
    for ranks in (1, 2, 3) if batch == 30 else (1, 2):
        ours = _effective("experiment=deeplabv2_lr_policy", f"+paper_row={row}", ranks=ranks)
        assert (ours["lr_policy"]["name"], ours["images_per_step"], ours["max_iters"]) == \
            (policy, batch, iters), (row, ranks)


def test_deeplabv2_table2_is_one_sweep_of_the_paper_files_rows():
    rows = yaml.safe_load((protocol.PAPER_DIR / "deeplabv2_lr_policy.yml").read_text())["rows"]
    text = (REPO / "conf" / "experiment" / "deeplabv2_lr_policy.yaml").read_text()
    options = yaml.safe_load(text)["hydra"]["sweeper"]["params"]["+paper_row"].split(",")
    assert [o.strip() for o in options] == [r["overrides"]["+paper_row"] for r in rows] == \
        list(TABLE2)


@pytest.mark.parametrize("experiment,overrides,batch", [
    ("deeplabv3_voc", {"trainer.global_batch_size": 4}, 4),
    ("deeplabv3_voc", {"trainer.global_batch_size": 8}, 8),
    ("deeplabv3_voc", {"trainer.global_batch_size": 12}, 12),
    ("segnet_basic_camvid", {"trainer.global_batch_size": 12, "dataset.val.split": "test"}, 12)])
def test_batch_rows_train_the_batch_they_name(experiment, overrides, batch):
    """DeepLab v3 Table 9 (64.43 at batch 4) and SegNet-Basic's batch-12 rows trained 16 / 4."""
    rows = yaml.safe_load((protocol.PAPER_DIR / f"{experiment}.yml").read_text())["rows"]
    assert overrides in [r["overrides"] for r in rows]
    ours = _effective(f"experiment={experiment}",
                      *protocol.row_overrides({"overrides": overrides}))
    assert ours["images_per_step"] == batch


# --- the defects of issue 20, each through the effective settings ---------------------------

def test_deeplab_v3_resnet_decay_and_batchnorm_momentum_are_the_official_codes():
    """train.py: weight decay 1e-4 for ResNet; Sec. 4.1 BN decay 0.9997 (PyTorch 0.0003)."""
    for experiment in ("deeplabv3_voc", "deeplabv3plus_voc"):
        ours = _effective(f"experiment={experiment}")
        assert ours["weight_decay"] == pytest.approx(1e-4), experiment
        assert ours["batchnorm"] == {"mode": "sync", "momentum": pytest.approx(3e-4)}


def test_segnet_follows_the_reference_solver():
    ours = _effective("experiment=segnet_camvid")
    assert ours["base_lr"] == pytest.approx(0.001) and ours["max_iters"] == 40000
    assert ours["augmentation"]["scales"] is None and ours["augmentation"]["hflip"] == 0.0
    assert ours["crop_size"] is None


def test_pspnet_blurs_synchronises_bn_and_scores_voc_in_473_windows():
    for experiment in ("pspnet_voc", "pspnet_cityscapes"):
        ours = _effective(f"experiment={experiment}")
        assert ours["augmentation"]["blur"] == 0.5 and ours["batchnorm"]["mode"] == "sync"
    ours = _effective("experiment=pspnet_voc")
    assert (ours["evaluation"]["mode"], ours["evaluation"]["window"]) == ("slide", [473, 473])


def test_cpnet_cityscapes_weight_decay_and_batch_are_the_papers():
    ours = _effective("experiment=cpnet_cityscapes")
    assert ours["weight_decay"] == pytest.approx(1e-4) and ours["images_per_step"] == 16


def test_fcn_2x_upsamplers_are_fixed_as_in_the_reference():
    """voc-fcn16s/net.py: upscore2 lr_mult 0, the fixed bilinear kernel."""
    for experiment in ("fcn16s_voc", "fcn8s_voc"):
        cfg = compose_config([f"experiment={experiment}", "model.init_from=null"])
        model = protocol._meta_model(cfg)
        trainable = {id(p) for g in app.param_groups(cfg, model) for p in g["params"]}
        ups = [m for name, m in model.named_modules() if name in ("upscore2", "upscore_pool4")]
        assert ups and not any(id(m.weight) in trainable for m in ups), experiment


def test_hanet_is_scored_like_the_authors_eval_script():
    ours = _effective("experiment=hanet_cityscapes")["evaluation"]
    assert (ours["mode"], ours["scales"], ours["flip"]) == ("slide", [0.5, 1.0, 2.0], True)


def test_deeplabv2_aspp_after_crf_rows_use_the_v2_vgg16_crf():
    rows = yaml.safe_load((protocol.PAPER_DIR / "deeplabv2_aspp_ablation.yml").read_text())
    crf_rows = [r for r in rows["rows"] if r["crf"]]
    assert crf_rows
    for row in crf_rows:
        crf = _effective("experiment=deeplabv2_aspp_ablation",
                         *protocol.row_overrides(row))["evaluation"]["crf"]
        assert (crf["pos_w"], crf["pos_xy_std"], crf["bi_w"], crf["bi_xy_std"],
                crf["bi_rgb_std"]) == (2, 2, 4, 65, 3)


# --- every experiment and row against its paper file ----------------------------------------

def _paper(name: str) -> dict:
    return yaml.safe_load((protocol.PAPER_DIR / f"{name}.yml").read_text())


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_protocol_block_values_have_a_source_or_say_why_unknown(experiment):
    data = _paper(experiment)
    assert data.get("protocol"), experiment
    for key, entry in data["protocol"].items():
        if entry["value"] == protocol.UNKNOWN:
            assert len(entry.get("why", "")) > 10, (experiment, key)
        else:
            assert len(entry.get("source", "")) > 5, (experiment, key)
    for dev in data.get("deviations") or []:
        assert dev["key"] in data["protocol"] and len(dev["reason"]) > 20, (experiment, dev)


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_effective_settings_equal_the_protocol_except_the_listed_deviations(experiment):
    result = protocol.report([f"experiment={experiment}"])
    data = _paper(experiment)
    assert set(result["paper"]) <= set(result["effective"]), "a protocol key no run has"
    undeclared = [d for d in result["differences"] if d["deviation"] is None]
    assert not undeclared, undeclared
    # a deviation that no longer differs is stale
    differing = {d["key"] for d in result["differences"]}
    for row in result["rows"]:
        differing |= {d["key"] for d in row["differences"]}
        assert not [d for d in row["differences"] if d["deviation"] is None], \
            (row["name"], row["differences"])
    unknown = {k for k, e in data["protocol"].items() if e["value"] == protocol.UNKNOWN}
    assert {d["key"] for d in data.get("deviations") or []} <= differing | unknown


#: what a row may change beyond what it names: the optimizer groups follow the network and
#: its BatchNorm (a frozen BN has no trainable parameters)
FOLLOWS = {"param_groups": ("network", "batchnorm")}


@pytest.mark.parametrize("experiment", [p for p in PAPER_EXPERIMENTS
                                        if _paper(p).get("rows")])
def test_a_rows_overrides_change_exactly_the_settings_the_row_names(experiment):
    result = protocol.report([f"experiment={experiment}"])
    for row, entry in zip(result["rows"], _paper(experiment)["rows"]):
        named = set(entry.get("protocol") or {})
        changed = set(row["changes"])
        extra = {k for k in changed - named
                 if not any(n in named for n in FOLLOWS.get(k, ()))}
        assert not extra and named <= changed, (row["name"], sorted(changed), sorted(named))


# --- the command ----------------------------------------------------------------------------

def _run(*args: str) -> subprocess.CompletedProcess:
    return run_module("segtrain.protocol", *args)


def test_the_command_prints_json_with_30_images_and_6000_iterations_for_table2s_row():
    proc = _run("experiment=deeplabv2_lr_policy", "+paper_row=deeplabv2_table2_poly_b30_6k",
                "format=json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"effective", "paper", "differences"}
    assert (out["effective"]["images_per_step"], out["effective"]["max_iters"]) == (30, 6000)
    # compared with that row's paper values (TABLE 2: poly, batch 30, 6K), not the experiment's
    assert (out["paper"]["lr_policy"]["name"], out["paper"]["images_per_step"]) == ("poly", 30)
    assert out["differences"] == []


@pytest.mark.parametrize("args", [["experiment=no_such_experiment"], ["trainer.max_iters=abc"],
                                  ["experiment=deeplabv1_voc", "trainer.batch_size=4"],
                                  ["ranks=0"], ["format=xml"]])
def test_a_bad_override_is_one_error_line(args, capsys):
    assert protocol.main(args) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err


def test_docs_protocols_md_is_the_generators_output():
    committed = (REPO / "docs" / "protocols.md").read_text()
    assert committed == protocol.all_markdown()
    for experiment in EXPERIMENTS:
        assert f"## {experiment}\n" in committed
