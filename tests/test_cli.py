"""The command line: synth, evaluate and select end to end (train and distill run in test_engine/test_distill)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from pkdkit.cli import main
from pkdkit.data import CocoDetection
from pkdkit.models import DetectorSpec, build_detector, save_detector
from pkdkit.plan import load_plan

SIZE = dict(fpn_channels=32, min_size=96, max_size=96, anchor_sizes=(8, 16, 32, 64, 128))


def test_synth_writes_the_same_dataset_for_the_same_seed(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["synth", "--out", str(tmp_path / name), "--train", "4", "--val", "2", "--size", "64"]) == 0
    printed = json.loads(capsys.readouterr().out.split("}\n")[0] + "}")
    assert printed["train_json"].endswith("instances_train.json")
    for split in ("train", "val"):
        a = (tmp_path / "a" / "annotations" / f"instances_{split}.json").read_bytes()
        assert a == (tmp_path / "b" / "annotations" / f"instances_{split}.json").read_bytes()


def _checkpoints(tiny_coco, tmp_path) -> dict[str, str]:
    lm = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"]).label_map
    paths = {}
    for name, arch, backbone in (("student", "retinanet", "resnet18"), ("t34", "fcos", "resnet34"),
                                 ("t50", "retinanet", "resnet50")):
        torch.manual_seed(len(name))
        spec = DetectorSpec(arch=arch, backbone=backbone, num_classes=lm.num_classes, **SIZE)
        paths[name] = str(save_detector(tmp_path / name / "model.pt", build_detector(spec), spec, lm))
    return paths


def test_evaluate_prints_a_table_and_writes_metrics_per_checkpoint(tiny_coco, tmp_path, capsys):
    ckpts = _checkpoints(tiny_coco, tmp_path)
    out = tmp_path / "eval"
    assert main(["--quiet", "evaluate", "--data", str(tiny_coco["root"]), ckpts["student"], ckpts["t34"],
                 "--out", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| student |" in table and "| t34 |" in table
    record = json.loads((out / "student.json").read_text())
    assert record["config"] == {} and len(record["metrics"]["bbox"]["stats"]) == 12
    assert (out / "t34_results.json").exists()


def test_select_writes_selection_json_and_heatmap(tiny_coco, tmp_path, capsys):
    ckpts = _checkpoints(tiny_coco, tmp_path)
    out = tmp_path / "selection"
    assert main(["--quiet", "select", "--data", str(tiny_coco["root"]), "--student", ckpts["student"],
                 "--teachers", f"t34={ckpts['t34']}", f"t50={ckpts['t50']}", "--ap", "t34=0.2", "t50=0.3",
                 "--out", str(out), "--images", "8", "--plan", str(tmp_path / "plan.yaml")]) == 0
    saved = json.loads((out / "selection.json").read_text())
    assert saved["order"][-1] == "t50" and set(saved["cost_matrix"]["names"]) == {"student", "t34", "t50"}
    assert (out / "selection.png").read_bytes()[:4] == b"\x89PNG"
    assert "selection written to" in capsys.readouterr().out
    plan = load_plan(tmp_path / "plan.yaml")  # the selection becomes a runnable plan
    assert [s.name for s in plan.stages] == saved["order"] and plan.stages[-1].teacher == ckpts["t50"]
    assert plan.student_init is None and plan.student.arch == "retinanet"  # the paper's protocol
    assert plan.inherits(0) and not any(plan.inherits(k) for k in range(1, len(plan.stages)))


def test_inspect_before_notebook_3_says_what_to_run_first_in_one_line(tiny_coco, tmp_path):
    import os
    import subprocess
    import sys

    from pkdkit import workflow

    workflow.save_settings(tmp_path / "run", workflow.RunSettings(data_root=str(tiny_coco["root"])))
    proc = subprocess.run([sys.executable, "-m", "pkdkit.cli", "inspect", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0] == (f"pkdkit inspect: error: no comparison in {tmp_path / 'run'}: run notebook 03 "
                        "(staged distillation) first")


# ----------------------------------------------------------------------------------------------------
# `notebooks experiment --jobs N` / `--launcher slurm|local`: the launcher the command uses (pkdkit.jobs), on
# real subprocesses and submitit's local executor; a whole notebooks run per seed would take minutes, so the
# jobs here are short commands, and the command's own seeds fail fast (their run folders are in use).
JOB = """
import os, signal, sys, time
from pathlib import Path
marker, mode = Path(sys.argv[1]), sys.argv[2]
print("gpu", os.environ.get("CUDA_VISIBLE_DEVICES"), "start", time.time(), flush=True)
if mode == "fail":
    sys.exit(3)
if mode == "requeued" and not marker.exists():  # the first run: signal the submitit job as SLURM does
    marker.write_text("started")
    os.kill(os.getppid(), signal.SIGUSR2)
    time.sleep(60)
time.sleep(0.4)
print("end", time.time(), flush=True)
"""


def _job(tmp_path, name: str, mode: str = "ok"):
    import sys

    from pkdkit.jobs import Job

    return Job(name, [sys.executable, "-c", JOB, str(tmp_path / f"{name}.marker"), mode], tmp_path / name / "run.log")


def _log(job) -> dict[str, float | str]:
    """The job's printed values: gpu, start, end."""
    words = " ".join(l for l in job.log.read_text().splitlines() if l.startswith(("gpu ", "end "))).split()
    return dict(zip(words[::2], words[1::2]))


def test_experiment_pool_runs_jobs_at_once_one_gpu_each_and_names_a_failed_one(tmp_path, capsys):
    import pytest

    from pkdkit.jobs import JobsFailed, run_jobs

    jobs = [_job(tmp_path, "seed 0"), _job(tmp_path, "seed 1", "fail"), _job(tmp_path, "seed 2"),
            _job(tmp_path, "seed 3")]
    with pytest.raises(JobsFailed, match=r"^1 of 4 jobs failed: seed 1 failed \(exit status 3\); its log: .*seed 1/run\.log$"):
        run_jobs(jobs, launcher="pool", at_once=2, gpus=["0", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("[pkdkit] seed ") for line in lines), lines  # one per job
    assert sum("failed" in line for line in lines) == 1
    runs = {j.name: _log(j) for j in jobs}
    assert jobs[0].log.read_text().startswith("$ ") and "end" in runs["seed 3"]  # the others ran to their end
    spans = [(float(r["start"]), float(r.get("end", r["start"])), r["gpu"]) for r in runs.values()]
    for t0, _, gpu in spans:  # at most 2 at once, and two running at once never share a GPU
        running = [g for s, e, g in spans if s <= t0 <= e]
        assert len(running) <= 2 and len(set(running)) == len(running), runs
    assert {r["gpu"] for r in runs.values()} == {"0", "1"}


def test_experiment_submitit_local_requeues_a_job_near_its_time_limit_and_names_a_failed_one(tmp_path, capsys):
    import pytest

    from pkdkit.jobs import JobsFailed, Slurm, run_jobs

    jobs = [_job(tmp_path, "seed 0", "requeued"), _job(tmp_path, "seed 1", "fail")]
    with pytest.raises(JobsFailed, match=r"^1 of 2 jobs failed: seed 1 failed \(exit status 3\); "
                                         r"its log: .*seed 1/run\.log \(submitit's log: .*submitit/.*\)$"):
        run_jobs(jobs, launcher="local", folder=tmp_path / "submitit", slurm=Slurm(time_min=5))
    log = jobs[0].log.read_text()
    starts = [line.split()[0] for line in log.splitlines() if line.startswith(("$ ", "gpu ", "end "))]
    assert starts == ["$", "gpu", "$", "gpu", "end"], log  # stopped, requeued, run again to its end
    logs = "".join(p.read_text() for p in (tmp_path / "submitit").glob("*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs, logs  # (5 min: near its time limit)
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_experiment_jobs_2_runs_each_seed_as_notebooks_run_with_its_share_of_the_threads(tmp_path, capsys,
                                                                                         monkeypatch):
    """Through the command: each seed is `pkdkit notebooks run` of its report and run folders, with its output in
    its report folder; both seeds' run folders are in use here, so both fail at once and are named with their
    logs, and no study is written. The job's command line, parsed as the command would, is the seed's run."""
    from pkdkit.cli import build_parser
    from pkdkit.files import run_lock
    from pkdkit.notebooks import seed_job

    out, root = tmp_path / "report", tmp_path / "runs"
    with run_lock(root / "seed_0"), run_lock(root / "seed_1"):
        code = main(["notebooks", "experiment", "--jobs", "2", "--seeds", "0", "1", "--out", str(out),
                     "--run-root", str(root), "--device", "cpu", "--threads", "2", "-p", "epochs=1"])
    captured = capsys.readouterr()
    assert code == 1 and not (out / "experiment.json").exists()
    assert "2 of 2 jobs failed: seed 0 failed" in captured.err and str(out / "seed_1" / "run.log") in captured.err
    for seed in (0, 1):
        log = (out / f"seed_{seed}" / "run.log").read_text()
        assert f"--threads 1 -p epochs=1 -p seed={seed}" in log.splitlines()[0], log
        assert f"{root / f'seed_{seed}'} is in use by another run" in log
    params = {"data_root": "data", "loss_ratio": 1e-05, "teachers": ["a b", "true"], "fiftyone_dataset": None}
    argv = seed_job("tiny", 1, out / "seed_1", root / "seed_1", "cuda", params, 2).argv
    args = build_parser(["notebooks"]).parse_args(argv[3:])
    assert (args.action, args.out, args.run_dir, args.device, args.threads) == ("run", str(out / "seed_1"),
                                                                                str(root / "seed_1"), "cuda", 2)
    assert dict(p.split("=", 1) for p in args.param)["loss_ratio"] == "1.0e-05"  # YAML reads 1e-05 as text
    assert {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)} == \
        {**params, "data_root": str(Path("data").resolve()), "seed": 1}  # as `notebooks run` reads -p
    args = build_parser(["notebooks"]).parse_args(
        ["notebooks", "experiment", "--out", "o", "--launcher", "slurm", "--slurm-partition", "gpu",
         "--slurm-gpus", "2", "--slurm-time", "600", "--slurm-account", "lab"])
    assert (args.launcher, args.slurm_partition, args.slurm_gpus, args.slurm_time, args.slurm_account) == \
        ("slurm", "gpu", 2, 600, "lab")
    import pytest

    from pkdkit.errors import ConfigError
    from pkdkit.jobs import Slurm, make_executor

    slurm = Slurm(args.slurm_partition, args.slurm_gpus, args.slurm_time, args.slurm_account, cpus=2)
    with pytest.raises(ConfigError, match="srun is not on this machine's PATH"):
        make_executor("slurm", tmp_path / "submitit", slurm)
    srun = tmp_path / "bin" / "srun"  # what submitit looks for to know it is on a cluster
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    sbatch = make_executor("slurm", tmp_path / "submitit", slurm)._executor._make_submission_file_text("cmd", "x")
    for line in ("--partition=gpu", "--account=lab", "--gpus-per-node=2", "--time=600", "--cpus-per-task=2",
                 "--signal=USR2@90", "--ntasks-per-node=1"):  # requeued at USR2, 90 s before the time limit
        assert f"#SBATCH {line}\n" in sbatch, sbatch
