"""The command line of ``python -m segtrain`` as a newcomer meets it, run in-process: a refused
start leaves no folder behind, a mistyped key gets the nearest existing one, ``--help`` lists
training's groups only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_in_process import run_module
from tests.conftest import CONF_DIR, TINY


@pytest.fixture
def cli():
    """``cli(*args)`` runs ``python -m segtrain *args`` in this process
    (``tests.cli_in_process``): (exit status, stderr); ``cli.out``: its stdout."""

    def run(*args: str) -> tuple[int, str]:
        proc = run_module("segtrain", *args)
        run.out = proc.stdout
        return proc.returncode, proc.stderr

    return run


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b""
            for p in sorted(folder.rglob("*"))}


def test_a_refused_start_leaves_no_folder_behind_and_never_removes_an_existing_one(
        cli, tmp_path):
    # a wrong value (the schema) and a refusal after the data are built (batch > split)
    (tmp_path / "outputs").mkdir()
    for bad in ("trainer.max_iters=0", "trainer.global_batch_size=100000"):
        code, err = cli(*TINY, bad, f"hydra.run.dir={tmp_path / 'outputs' / 'day' / 'run'}")
        assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1, err
        # the run folder and the parent it made go, the parent that was there stays
        assert not (tmp_path / "outputs" / "day").exists()
        assert (tmp_path / "outputs").is_dir()
    # a folder that was there before the start stays, with what it held
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    before = _tree(mine)
    code, err = cli(*TINY, "trainer.max_iters=0", f"hydra.run.dir={mine}")
    assert code == 1, err
    assert {k: v for k, v in _tree(mine).items() if k != "train.log"} == before


@pytest.mark.parametrize("override", ["trainer.max_iter=10", "+trainer.max_iter=10",
                                      "++trainer.max_iter=10"])
def test_a_mistyped_key_is_one_line_naming_the_nearest_existing_key(cli, tmp_path, override):
    code, err = cli(*TINY, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {override.lstrip('+')}: ") and \
        "the nearest existing key: trainer.max_iters" in err, err
    assert "+trainer" not in err and not (tmp_path / "run").exists()


def test_a_key_that_one_option_of_a_swept_group_has_is_not_refused():
    # unet has no output_stride, deeplabv2 has: Hydra composes each job with its own option
    from segtrain import cli as cli_module

    sweep = ["-m", "model=unet,deeplabv2"]
    cli_module.check_override_keys([*sweep, "model.output_stride=8"], CONF_DIR, "config")
    with pytest.raises(SystemExit):
        cli_module.check_override_keys([*sweep, "model.output_strid=8"], CONF_DIR, "config")


def test_plus_adds_only_keys_that_something_reads():
    from segtrain import config_schema
    from segtrain.errors import ConfigError
    from tests.conftest import compose_config

    # what the docs and tests add: a schema's optional key, a constructor's argument
    config_schema.check(compose_config(
        ["+dataset.source_rows=false", "+eval.crf_workers=1", "+loss.nan_step=5",
         "+optim.eps=1e-8"]), strict=True)
    for added, nearest in [("+eval.num_sample=2", "eval.num_samples"),
                           ("+trainer.ema.decy=0.9", "trainer.ema.decay"),
                           ("+format=voc", None)]:
        with pytest.raises(ConfigError) as err:
            config_schema.check(compose_config([added]), strict=True)
        message = str(err.value)
        assert message.startswith(added.lstrip("+").split("=")[0]), message
        assert (f"the nearest existing key: {nearest}" in message) if nearest else \
            "the nearest" not in message, message


def test_help_lists_the_training_groups_only_and_training_refuses_predicts_format(cli, tmp_path):
    code, _ = cli("--help")
    groups = {line.split(":")[0] for line in cli.out.split("== Config ==")[0].splitlines()}
    assert code == 0 and {"dataset", "model", "trainer", "paper_row"} <= groups, cli.out
    assert not {"export", "format"} & groups, cli.out  # export's and predict's own
    code, err = cli(*TINY, "+format=voc", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 1 and err.startswith("error: format='voc': no such key"), err


def test_a_sweep_ends_with_a_summary_of_its_jobs_failed_ones_included(cli, tmp_path):
    sweep = tmp_path / "sweep"
    code, err = cli("-m", *TINY, "trainer.eval_interval=2", "trainer.max_iters=2,0",
                    f"hydra.sweep.dir={sweep}")
    assert code == 1, err  # job 1 was refused: the sweep reports it
    lines = cli.out[cli.out.index("sweep "):].splitlines()
    assert lines[0] == f"sweep {sweep}: 2 jobs, 1 finished, 1 failed", cli.out
    rows = {line.split()[0]: line for line in lines[2:4]}
    score = json.loads((sweep / "0" / "metrics.json").read_text())["miou"]
    assert "trainer.max_iters=2" in rows["0"] and "finished" in rows["0"], rows
    assert f"{100 * score:.2f}" in rows["0"], (rows, score)
    assert "trainer.max_iters=0" in rows["1"] and "failed" in rows["1"], rows
    assert "expected an integer >= 1" in rows["1"], rows


def test_a_sweep_that_starts_no_job_prints_no_summary(cli, tmp_path):
    """A sweeper refused at its start (an unknown pruner): its error, no empty job table."""
    code, err = cli("-m", *TINY, "hydra/sweeper=optuna_miou", "optim.lr=choice(0.01,0.001)",
                    "hydra.sweeper.pruner=foo", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 1 and "hydra.sweeper.pruner=foo" in err, err
    assert "0 jobs" not in cli.out and "job  overrides" not in cli.out, cli.out
