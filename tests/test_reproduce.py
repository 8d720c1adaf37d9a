"""segtrain.reproduce: a paper file -> jobs (rows x seeds, stages first) -> runs -> table.

The plan is checked against the paper files themselves (TABLE 2's five rows, TABLE 4's COCO
stage and CRF row, FCN's 32s -> 16s -> 8s chain); the runs at ``scale=tiny`` go through
Hydra's launchers and the real trainer."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from segtrain import reproduce, runs
from segtrain.errors import ConfigError
from segtrain.flops import peak_tflops

REPO = Path(__file__).resolve().parents[1]


def plan(paper, tmp_path, *args, seeds=1, scale="paper"):
    data = reproduce.read_paper(paper)
    jobs = reproduce.plan_jobs(paper, seeds, list(args), data)
    reproduce.resolve(jobs, scale, tmp_path)
    return jobs, data


def run_main(capsys, *argv, repo=None):
    rc = reproduce.main(list(argv), repo=repo)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _costs(out):
    return re.findall(r"cost: ([\d,]+) iterations x (\d+) images = ([\d,]+) images x "
                      r"([\d.]+) GFLOP \(321x321\) = \S+ FLOP -> ([\d.]+) GPU-hours", out)


def _check_hours(costs, flop_per_s):
    for iters, batch, images, gflop, hours in costs:
        assert int(images.replace(",", "")) == int(iters.replace(",", "")) * int(batch)
        expected = int(images.replace(",", "")) * float(gflop) * 1e9 / flop_per_s / 3600
        assert float(hours) == pytest.approx(expected, abs=0.006)


def test_dry_run_lists_table2_five_rows_with_gpu_hours(tmp_path, capsys):
    rc, out, _ = run_main(capsys, "paper=deeplabv2_lr_policy", "dry_run=true", f"out={tmp_path}",
                          repo=tmp_path)  # no docs/gpu.md there: the assumption
    assert rc == 0
    jobs = re.findall(r"^job (\d)/5: (.+?) \(seed 0\) \[new\]", out, re.M)
    assert [name for _, name in jobs] == ["step, batch 30, 6K", "poly, batch 30, 6K",
                                          "poly, batch 30, 10K", "poly, batch 10, 10K",
                                          "poly, batch 10, 20K"]
    costs = _costs(out)
    assert [int(c[0].replace(",", "")) for c in costs] == [6000, 6000, 10000, 10000, 20000]
    # GPU-hours = images x FLOPs per image / (the assumed MFU x the H100's dense bf16 peak);
    # the plan says it is an assumption, where it comes from and how to replace it
    assert "throughput 20%: ASSUMED, not measured" in out and "set mfu=<fraction>" in out
    assert "NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5" in out
    assert "at 20% of its dense peak" in out and "989.5 TFLOP/s -> 198 TFLOP/s" in out
    _check_hours(costs, 0.2 * peak_tflops("H100")[1]["bf16"] * 1e12)
    assert re.search(r"^total: [\d.]+ GPU-hours, checkpoints [\d.]+ GB$", out, re.M)
    assert out.count("dataset: voc: NOT SET: give dataset.root=") == 5
    assert not (tmp_path / "runs").exists()  # nothing run, nothing written


def test_cost_plan_takes_a_given_or_measured_utilisation(tmp_path, capsys):
    rc, out, _ = run_main(capsys, "paper=deeplabv2_lr_policy", "dry_run=true", "mfu=0.05",
                          "gpu=A100", f"out={tmp_path}", repo=tmp_path)
    assert rc == 0 and "throughput 5%: mfu=0.05 as given on the command line" in out
    assert "ASSUMED" not in out
    _check_hours(_costs(out), 0.05 * 312.0e12)  # the A100's dense bf16 peak (data sheet)
    # docs/gpu.md, as scripts/gpu_report.py writes it, holds segtrain's measured MFU
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "gpu.md").write_text(
        "| precision | batch | img/s | vs fp32 | peak memory GiB | GFLOP per image and step "
        "| peak TFLOP/s | MFU |\n|---|---|---|---|---|---|---|---|\n"
        "| fp32 | 8 | 20.0 | 1.00 | 30.0 | 1200 | 494.5 | 4.9% |\n"
        "| bf16 | 8 | 50.0 | 2.50 | 20.0 | 1200 | 989.5 | 6.1% |\n")
    mfu, source = reproduce.utilisation(tmp_path, None, "H100")
    assert mfu == pytest.approx(0.061)
    assert source.startswith("measured: the bf16 MFU of segtrain's DeepLab v3 in docs/gpu.md")
    for bad, says in (("mfu=2", "mfu=2: expected the fraction"), ("mfu=x", "mfu=x"),
                      ("gpu=V100", "gpu=V100: no dense peak known for it; one of")):
        rc, _, err = run_main(capsys, "paper=deeplabv2_lr_policy", "dry_run=true", bad)
        assert rc == 1 and says in err


def test_table4_plans_the_coco_stage_first_and_reaches_the_crf_row(tmp_path):
    jobs, data = plan("deeplabv2_voc", tmp_path, "dataset.root=/data/VOC2012")
    coco = jobs[0]
    assert coco.stage == "coco" and "dataset=coco" in coco.overrides
    assert [j.after for j in jobs[1:3]] == [None, None]  # ImageNet-only rows
    assert all(j.after is coco for j in jobs[3:])         # one COCO model for the table
    assert jobs[2].config.model.head == "plain" and jobs[2].config.model.msc.train_scales
    aspp = jobs[-1]
    assert aspp.config.model.head == "aspp_l"
    rows = [data["rows"][i]["value"] for i in aspp.rows]
    assert rows == [76.35, 77.69]  # ASPP and ASPP + CRF share the training run
    (crf,) = aspp.evaluations
    assert crf["overrides"] == {"eval": "msc_crf", "eval.predictor.scales": "[1.0]"}
    assert f"model.init_from={coco.run_dir}" in aspp.all_overrides()
    assert str(aspp.config.model.init_from) == str(coco.run_dir)


def test_jobs_are_matched_by_settings_not_folder_names(tmp_path):
    jobs, _ = plan("fcn8s_voc", tmp_path, "dataset.root=/data/a")
    again, _ = plan("fcn8s_voc", tmp_path, "dataset.root=/elsewhere", "trainer.num_workers=7")
    assert [j.key for j in jobs] == [j.key for j in again]  # paths and workers: no setting
    other, _ = plan("fcn8s_voc", tmp_path, "dataset.root=/data/a", "optim.lr=0.5")
    assert all(a.key != b.key for a, b in zip(jobs, other))
    # a stage's key flows into its dependants' keys (the run they start from)
    assert jobs[1].after is jobs[0] and jobs[2].after is jobs[1] and jobs[3].after is jobs[1]
    # a renamed run folder is still this job's run
    job = jobs[1]
    reproduce.write_provenance(job, "fcn8s_voc")
    job.run_dir.rename(tmp_path / "runs" / "renamed")
    found, _ = plan("fcn8s_voc", tmp_path, "dataset.root=/data/a")
    assert found[1].run_dir == tmp_path / "runs" / "renamed"
    assert found[2].run_dir != found[1].run_dir


def test_tiny_scale_keeps_class_count_and_shrinks_the_networks(tmp_path):
    jobs, _ = plan("fcn8s_voc", tmp_path, scale="tiny")
    for job in jobs:
        cfg = job.config
        assert cfg.dataset.name == "synthetic" and cfg.dataset.num_classes == 21
        assert cfg.model.width == reproduce.TINY_VGG_WIDTH and cfg.model.pretrained is None
        assert cfg.trainer.max_iters == 50  # the reference solver's 100,000 / 2000
    lr_policy, _ = plan("deeplabv2_lr_policy", tmp_path, scale="tiny")
    assert [j.config.trainer.max_iters for j in lr_policy] == [3, 3, 5, 5, 10]
    assert all(j.config.model.backbone == "resnet18" for j in lr_policy)
    assert any("resnet18 instead of vgg16" in n for n in lr_policy[0].notes)


def test_bad_input_is_one_line(tmp_path, capsys):
    rc, _, err = run_main(capsys, "paper=no_such_paper")
    assert rc == 1 and err.startswith("error: paper=no_such_paper: no file no_such_paper.yml")
    rc, _, err = run_main(capsys, "paper=fcn8s_voc", "stages.nope.dataset.root=/x")
    assert rc == 1 and "has no such stage (its stages: fcn32s, fcn16s)" in err
    rc, _, err = run_main(capsys, "paper=fcn8s_voc", "seeds=0")
    assert rc == 1 and "seeds=0" in err
    with pytest.raises(ConfigError, match="rows\\[0\\].stage=nowhere"):
        (tmp_path / "x.yml").write_text("rows:\n  - {stage: nowhere, value: 1}\n")
        reproduce.read_paper("x", tmp_path)


# -- runs ---------------------------------------------------------------------------------
def _checkpoint_times(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoints/*.pt")}


def _scores(out: Path) -> dict[str, dict]:
    """key -> the final scores of each run under ``out``."""
    scores = {}
    for record in out.glob(f"runs/*/{reproduce.PROVENANCE}"):
        metrics = json.loads((record.parent / "metrics.json").read_text())
        scores[json.loads(record.read_text())["key"]] = {
            k: metrics[k] for k in ("miou", "pixel_acc", "iou", "iteration")}
    return scores


def _numbers(table: str) -> list[str]:
    return [line.split(" | ")[3] for line in table.splitlines() if line.startswith("| ")][1:]


@pytest.mark.slow
def test_tiny_table2_end_to_end_then_a_second_run_trains_nothing(tmp_path, capsys):
    out = tmp_path / "t2"
    rc, _, _ = run_main(capsys, "paper=deeplabv2_lr_policy", "scale=tiny", f"out={out}")
    assert rc == 0
    table = (out / "table.md").read_text()
    assert table.count("| ok |") == 5 and "NOT comparable with the paper" in table
    assert (out / "table.csv").read_text().count("\n") == 6
    before, scores = _checkpoint_times(out), _scores(out)
    assert len(scores) == 5 and all(s["iteration"] in (3, 5, 10) for s in scores.values())
    rc, _, _ = run_main(capsys, "paper=deeplabv2_lr_policy", "scale=tiny", f"out={out}")
    assert rc == 0
    assert _checkpoint_times(out) == before  # no job trained again
    assert (out / "table.md").read_text() == table


@pytest.mark.slow
def test_fcn_stages_train_in_order_each_from_the_previous(tmp_path, capsys):
    out = tmp_path / "fcn"
    rc, _, _ = run_main(capsys, "paper=fcn8s_voc", "scale=tiny", f"out={out}",
                        "trainer.max_iters=2", "trainer.eval_interval=2")
    assert rc == 0, (out / "table.md").read_text()
    records = {json.loads(p.read_text())["label"]: (p.parent, json.loads(p.read_text()))
               for p in out.glob(f"runs/*/{reproduce.PROVENANCE}")}
    (d32, r32), (d16, r16) = records["stage fcn32s"], records["stage fcn16s"]
    assert r32["init_from"] is None and r16["init_from"]["run"] == str(d32)
    rows = [v for k, v in records.items() if not k.startswith("stage")]
    assert len(rows) == 2 and all(r["init_from"]["run"] == str(d16) for _, r in rows)
    # each run's saved config (.hydra/, written when the run folder was claimed) starts
    # from the previous stage's run
    saved = {d: OmegaConf.load(d / ".hydra" / "config.yaml") for d in (d32, d16)}
    assert saved[d32].model.init_from is None and saved[d16].model.init_from == str(d32)
    for folder, _ in rows:
        assert OmegaConf.load(folder / ".hydra" / "config.yaml").model.init_from == str(d16)
    # the trainer copied the previous net's weights (segtrain/models/init_from.py's log)
    assert f"init_from {d32}/checkpoints/last.pt: copied" in (d16 / "train.log").read_text()
    for folder, _ in rows:
        assert f"init_from {d16}/checkpoints/last.pt: copied" in \
            (folder / "train.log").read_text()
    # in order: each stage finished before its dependants started
    done32 = (d32 / "metrics.json").stat().st_mtime
    assert done32 <= min((d16 / ".hydra").stat().st_mtime, *(
        (f / ".hydra").stat().st_mtime for f, _ in rows))
    assert (d16 / "metrics.json").stat().st_mtime <= min((f / ".hydra").stat().st_mtime
                                                         for f, _ in rows)


@pytest.mark.slow
def test_killed_midway_the_rerun_gives_the_uninterrupted_numbers(tmp_path, capsys):
    whole = tmp_path / "whole"
    assert run_main(capsys, "paper=deeplabv2_lr_policy", "scale=tiny", f"out={whole}")[0] == 0
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "segtrain.reproduce",
                             "paper=deeplabv2_lr_policy", "scale=tiny", f"out={cut}"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    # kill it once the second job has a checkpoint: one run finished, one half done
    while time.time() < deadline and proc.poll() is None:
        if len(list(cut.glob("runs/*/checkpoints/last.pt"))) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "table.md").exists()
    done = [runs.finished(p.parent) for p in cut.glob(f"runs/*/{reproduce.PROVENANCE}")]
    assert 1 <= sum(done) < 5, done  # killed midway: some runs finished, not all
    assert run_main(capsys, "paper=deeplabv2_lr_policy", "scale=tiny", f"out={cut}")[0] == 0
    assert _scores(cut) == _scores(whole)
    assert _numbers((cut / "table.md").read_text()) == _numbers((whole / "table.md").read_text())


def _submitit_jobs(out: Path) -> list[Path]:
    """submitit's job folders (named by job id; ``%j`` holds the pickled calls)."""
    return [p for p in out.glob("runs/.submitit/*") if p.name.isdigit()]


@pytest.mark.slow
def test_submitit_local_launcher_waits_for_stages_and_skips_after_a_failed_one(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / "sub"
    rc, _, _ = run_main(capsys, "paper=fcn16s_voc", "scale=tiny", f"out={out}",
                        "trainer.max_iters=2", "trainer.eval_interval=2",
                        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert rc == 0
    assert "| ok |" in (out / "table.md").read_text()
    assert len(_submitit_jobs(out)) == 2  # the stage, then the row once the stage succeeded
    stage = next(out.glob("runs/stage_fcn32s_*"))
    row = next(p for p in out.glob("runs/*_seed0_*") if p != stage)
    assert (stage / "metrics.json").stat().st_mtime <= (row / ".hydra").stat().st_mtime
    # a stage that fails: its dependant is never submitted
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "fcn16s_voc.yml").write_text(
        "stages:\n  fcn32s: {experiment: fcn32s_voc, overrides: {optim.lr: -1.0}}\n"
        "rows:\n  - {overrides: {}, stage: fcn32s, value: 65.0, metric: miou}\n")
    monkeypatch.setattr(reproduce, "PAPER_DIR", papers)
    bad = tmp_path / "bad"
    rc, _, _ = run_main(capsys, "paper=fcn16s_voc", "scale=tiny", f"out={bad}",
                        "trainer.max_iters=2", "hydra/launcher=submitit_local")
    assert rc == 0
    table = (bad / "table.md").read_text()
    assert "blocked: stage fcn32s did not finish" in table
    assert len(_submitit_jobs(bad)) == 1  # only the stage was submitted


def test_slurm_dependants_are_submitted_with_afterok(tmp_path, monkeypatch):
    """SLURM: every job submitted at once, a dependant with --dependency=afterok:<stage id>
    and --kill-on-invalid-dep=yes (submitit's sbatch text, sbatch itself mocked)."""
    from submitit.slurm.test_slurm import mocked_slurm

    jobs, _ = plan("fcn8s_voc", tmp_path)
    for job in jobs:
        reproduce.write_provenance(job, "fcn8s_voc")
    with mocked_slurm():
        # _launcher sets Hydra's job config as a launch does; put it back after the test
        monkeypatch.setattr(reproduce.HydraConfig.instance(), "cfg", None)
        launcher = reproduce._launcher(["hydra/launcher=slurm"], tmp_path / "runs")
        submitted = []  # the mocked jobs never run: not waited for
        results = reproduce._launch_submitit(launcher, jobs, wait=False, record=submitted)
        reproduce.GlobalHydra.instance().clear()
    assert type(launcher).__name__ == "SlurmLauncher" and results == {}
    scripts = [Path(job.paths.submission_file).read_text() for job in submitted]
    ids = [job.job_id for job in submitted]
    assert "--dependency" not in scripts[0]
    assert f"#SBATCH --dependency=afterok:{ids[0]}" in scripts[1]
    assert f"#SBATCH --dependency=afterok:{ids[1]}" in scripts[2]
    assert f"#SBATCH --dependency=afterok:{ids[1]}" in scripts[3]
    assert all("#SBATCH --kill-on-invalid-dep=yes" in s for s in scripts[1:])
    assert all("#SBATCH --requeue" in s for s in scripts)  # conf/hydra/launcher/slurm.yaml


def test_row_scores_are_read_where_segtrain_evaluate_writes_them(tmp_path):
    """A run that never evaluated during training has no best.pt: segtrain.evaluate (its
    default checkpoint=best falls back to last.pt) writes eval_<name>_last.json, and the
    table reads the row from there; metrics.json counts only once finished."""
    jobs, data = plan("deeplabv2_voc", tmp_path, "dataset.root=/data/VOC2012")
    aspp = jobs[-1]
    (crf,) = aspp.evaluations
    crf_row = crf["row"]
    plain_row = next(i for i in aspp.rows if i != crf_row)
    ckpts = aspp.run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.pt").write_bytes(b"")
    (aspp.run_dir / "metrics.json").write_text(json.dumps({"miou": 0.5, "finished": False}))
    assert reproduce.row_values(aspp, plain_row, "miou") is None  # unfinished: no number
    (aspp.run_dir / "metrics.json").write_text(json.dumps({"miou": 0.5, "finished": True}))
    assert reproduce.row_values(aspp, plain_row, "miou") == pytest.approx(50.0)
    assert reproduce.state(aspp) == "evaluate"
    stem = runs.evaluation_stem(aspp.run_dir, ckpts / "last.pt", crf["name"])
    assert stem == f"eval_{crf['name']}_last"  # segtrain.evaluate's name for last.pt
    (aspp.run_dir / f"{stem}.json").write_text(json.dumps({"miou": 0.6}))
    assert reproduce.row_values(aspp, crf_row, "miou") == pytest.approx(60.0)
    assert reproduce.state(aspp) == "done"


def test_slurm_rerun_waits_for_queued_jobs_and_resubmits_ended_ones(tmp_path, monkeypatch):
    """Each submission's job id is kept in its run folder (reproduce_job.json); a rerun asks
    SLURM (sacct through submitit) for its state: a pending or running job is waited for and
    stays its dependants' afterok, a failed or cancelled one is submitted again."""
    from submitit.slurm.test_slurm import mocked_slurm

    jobs, _ = plan("fcn8s_voc", tmp_path)
    for job in jobs:
        reproduce.write_provenance(job, "fcn8s_voc")
    with mocked_slurm() as sacct:
        # _launcher sets Hydra's job config as a launch does; put it back after the test
        monkeypatch.setattr(reproduce.HydraConfig.instance(), "cfg", None)
        launcher = reproduce._launcher(["hydra/launcher=slurm"], tmp_path / "runs")
        first = []
        reproduce._launch_submitit(launcher, jobs, wait=False, record=first)
        ids = [j.job_id for j in first]
        records = [json.loads((j.run_dir / reproduce.SUBMISSION).read_text()) for j in jobs]
        assert [r["job_id"] for r in records] == ids and {r["cluster"] for r in records} == \
            {"slurm"}
        # SLURM's view now: fcn32s running, fcn16s queued, one row failed, one cancelled
        for job_id, state in zip(ids, ["RUNNING", "PENDING", "FAILED", "CANCELLED by 0"]):
            sacct.set_job_state(job_id, state)
        # what the dry run's plan shows beside each job
        assert [reproduce.earlier_submission(j)[1] for j in jobs] == \
            ["RUNNING", "PENDING", "FAILED", "CANCELLED"]
        again = []
        reproduce._launch_submitit(launcher, jobs, wait=False, record=again)
        reproduce.GlobalHydra.instance().clear()
    assert [j.job_id for j in again[:2]] == ids[:2]  # waited for, not submitted again
    new_ids = [j.job_id for j in again[2:]]
    assert len(new_ids) == 2 and not set(new_ids) & set(ids)
    for job, handle in zip(jobs[2:], again[2:]):
        script = Path(handle.paths.submission_file).read_text()
        assert f"#SBATCH --dependency=afterok:{ids[1]}" in script  # the queued fcn16s
        record = json.loads((job.run_dir / reproduce.SUBMISSION).read_text())
        assert record["job_id"] == handle.job_id
        assert [e["job_id"] for e in record["earlier"]] == [ids[jobs.index(job)]]


@pytest.mark.slow
def test_submitit_local_rerun_waits_for_the_job_still_running(tmp_path, capsys, monkeypatch):
    """The command is killed while its stage job runs under submitit's local executor (the
    job outlives it, as a SLURM job does); the rerun finds the job id in the stage's run
    folder, sees the job running and waits for it instead of submitting it again."""
    out, go = tmp_path / "sub", tmp_path / "GO"
    args = ["paper=fcn16s_voc", "scale=tiny", f"out={out}", "trainer.max_iters=2",
            "trainer.eval_interval=2", "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",  # the job waits for GO before it starts:
            f"+hydra.launcher.setup=['while [ ! -e {go} ]; do sleep 0.2; done']"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "segtrain.reproduce", *args], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, records = time.time() + 300, []
        while time.time() < deadline and not records and proc.poll() is None:
            records = list(out.glob(f"runs/stage_fcn32s_*/{reproduce.SUBMISSION}"))
            time.sleep(0.1)
        assert records, "the stage job was never submitted"
        os.kill(proc.pid, signal.SIGKILL)  # the command alone: its submitted job lives on
        proc.wait()
        stage_id = json.loads(records[0].read_text())["job_id"]
        assert reproduce._controller_alive(stage_id)
        asked = []

        def state_then_go(handle):  # the job starts once the rerun has asked for its state
            asked.append((handle.job_id, real_state(handle)))
            go.touch()
            return asked[-1][1]

        real_state = reproduce.scheduler_state
        monkeypatch.setattr(reproduce, "scheduler_state", state_then_go)
        rc, _, _ = run_main(capsys, *args)
    finally:
        go.touch()
    assert rc == 0 and asked == [(stage_id, "RUNNING")]
    assert "| ok |" in (out / "table.md").read_text()
    record = json.loads(records[0].read_text())
    assert record["job_id"] == stage_id and record["earlier"] == []
    assert len(_submitit_jobs(out)) == 2  # the stage once, then the row
