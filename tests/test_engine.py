"""Supervised training: real torchvision RetinaNet on the tiny synthetic set, resume, NaN, DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_SPEC, TINY_TRAIN, tb_scalars, tb_tags, tb_texts

from pkdkit.data import CocoDetection, make_loader
from pkdkit.engine import (FiniteChecks, NonFiniteLossError, StepAt, TrainConfig, build_optimizer, build_scheduler,
                           epoch_seed, lr_factor, seed_everything, train, train_detector, train_step)
from pkdkit.evaluate import evaluate_detector
from pkdkit.models import DetectorSpec, build_detector, load_checkpoint, load_detector

SPEC = TINY_SPEC
CFG = TrainConfig(**TINY_TRAIN)


def _datasets(tiny_coco):
    train_ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    return train_ds, CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pkdkit.cli", "--quiet", *args]


def _train_args(tiny_coco, out: Path, epochs: int) -> list[str]:
    return ["train", "--data", str(tiny_coco["root"]), "--preset", "tiny", "--out", str(out), "--epochs", str(epochs),
            "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--warmup-iters", "2",
            "--device", "cpu", "--checkpoint-every", "1"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_short_training_run_loss_falls_and_train_ap_is_above_zero(tiny_coco, tmp_path):
    train_ds, _ = _datasets(tiny_coco)
    spec = DetectorSpec(num_classes=train_ds.label_map.num_classes, **SPEC)
    torch.manual_seed(0)
    model = build_detector(spec)
    history = train(model, train_ds, CFG.replace(epochs=6), tmp_path, config={"spec": spec.to_dict()})
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0]
    train_eval = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"])
    model.score_thresh = 0.01
    record = evaluate_detector(model, train_eval, train_ds.label_map, progress=False)
    assert record["metrics"]["bbox"]["stats"]["AP50"] > 0
    metrics = json.loads((tmp_path / "history.json").read_text())
    assert metrics["config"]["spec"]["backbone"] == "resnet18" and metrics["config"]["train"]["lr"] == 1e-3
    assert all(e["alarms"] == [] for e in metrics["epochs"])  # a healthy run raises no alarm
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4, 5, 6]
    state = load_checkpoint(tmp_path / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch"} <= set(state) and state["epoch"] == 6


def _start_and_wait_for(cmd: list[str], line: str, log: Path, timeout: float = 300, **popen: Any) -> subprocess.Popen:
    """Start `cmd` (stderr, its progress bars, into `log`) and read its stdout until a line holding `line`
    (`pkdkit train` prints "epoch k/n:" once epoch k's checkpoint is written); fails with the output if the
    command ends or `timeout` passes first."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, **popen)
    seen: list[str] = []
    timer = threading.Timer(timeout, proc.kill)  # a hung run ends the read below
    timer.start()
    try:
        for out in proc.stdout:
            seen.append(out)
            if line in out:
                return proc
    finally:
        timer.cancel()
    proc.wait()
    pytest.fail(f"{line!r} never came (exit status {proc.returncode}):\n{''.join(seen)}\n{log.read_text()[-3000:]}")


def test_resume_after_kill_matches_uninterrupted_run(tiny_coco, tmp_path):
    """`pkdkit train` killed in its third epoch and run again ends with the uninterrupted run's weights."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(*_train_args(tiny_coco, straight, 3)), check=True, capture_output=True)
    # not --quiet, so that it prints "epoch 2/3:" after epoch 2's checkpoint; epoch 3 then takes seconds
    proc = _start_and_wait_for([sys.executable, "-m", "pkdkit.cli", *_train_args(tiny_coco, killed, 3)], "epoch 2/3:",
                               tmp_path / "killed.log")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.pt").exists(), "the run finished before it could be killed"
    assert load_checkpoint(killed / "last.pt")["epoch"] == 2
    subprocess.run(_cli(*_train_args(tiny_coco, killed, 3)), check=True, capture_output=True)
    _assert_same_weights(load_checkpoint(straight / "model.pt")["model"], load_checkpoint(killed / "model.pt")["model"])
    a = json.loads((straight / "history.json").read_text())["epochs"]
    b = json.loads((killed / "history.json").read_text())["epochs"]
    assert [e["loss"] for e in a] == [e["loss"] for e in b]


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_train_stopped_by_a_signal_says_where_it_resumes_in_one_line_and_resumes(tiny_coco, tmp_path, stop):
    """SIGTERM (services, schedulers) and Ctrl-C stop `pkdkit train` the same way: one line naming the run folder
    to resume, no traceback, exit status 128 + the signal; the same command then resumes from the checkpoint.
    SIGINT is ignored when the run starts (as in a shell's background job): the program installs its own handler."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "pkdkit.cli", *_train_args(tiny_coco, out, 2)]
    proc = _start_and_wait_for(cmd, "epoch 1/2:", log, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    proc.send_signal(getattr(signal, stop))  # epoch 1 is checkpointed; epoch 2 and the evaluation take seconds
    try:
        rest = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    err = log.read_text()
    assert proc.returncode == 128 + getattr(signal, stop), err[-3000:]
    stopped = [line for line in err.splitlines() if "stopped" in line]
    assert stopped == [f"pkdkit train: stopped by {stop}; run the same command again to resume in {out} (its last "
                       f"checkpoint, last.pt)"], err[-3000:]
    assert "Traceback" not in err + rest
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and not (out / "model.pt").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 1/2:" not in again.stdout and "epoch 2/2:" in again.stdout  # resumed at epoch 2
    assert load_checkpoint(out / "last.pt")["epoch"] == 2 and (out / "model.pt").exists()


def test_checkpoint_every_n_epochs_resumes_from_the_last_one_written_and_ends_the_same(tiny_coco, tmp_path):
    """With `checkpoint_every=2` a run stopped at the end of epoch 3 keeps the epoch-2 checkpoint (and
    history.json to match); run again it trains epochs 3-4 and ends with the uninterrupted run's weights."""
    train_ds, _ = _datasets(tiny_coco)
    spec = DetectorSpec(num_classes=train_ds.label_map.num_classes, **SPEC)
    cfg = CFG.replace(epochs=4, checkpoint_every=2)

    def run(out: Path, stop_in_epoch: int | None = None) -> list[dict]:
        torch.manual_seed(0)
        def stop(epoch: int, model) -> dict:
            if epoch + 1 == stop_in_epoch:
                raise KeyboardInterrupt
            return {"metrics": {"bbox": {"stats": {"AP": 0.0, "AP50": 0.0}}}}  # an evaluation that found nothing
        return train(build_detector(spec), train_ds, cfg, out, config={"spec": spec.to_dict()}, on_epoch_end=stop)

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    history = run(straight)
    with pytest.raises(KeyboardInterrupt):
        run(stopped, stop_in_epoch=3)
    assert load_checkpoint(stopped / "last.pt")["epoch"] == 2
    assert [e["epoch"] for e in json.loads((stopped / "history.json").read_text())["epochs"]] == [1, 2]
    resumed = run(stopped)
    assert [e["loss"] for e in resumed] == [e["loss"] for e in history]
    # TensorBoard: the resumed run dropped what it wrote after its checkpoint (epoch 3): each step once
    assert [s for s, _ in tb_scalars(stopped, "loss/total")] == [2, 4, 6, 8]
    assert [v for _, v in tb_scalars(stopped, "loss/total")] == pytest.approx([e["loss"] for e in history])
    assert [s for s, _ in tb_scalars(stopped, "eval/bbox/AP")] == [2, 4, 6, 8]
    # AP 0 at the evaluations past half the schedule (epochs 3 and 4 of 4): an alarm in each epoch's record
    assert [[a["name"] for a in e["alarms"]] for e in resumed] == [[], [], ["ap_zero"], ["ap_zero"]]
    _assert_same_weights(load_checkpoint(straight / "last.pt")["model"], load_checkpoint(stopped / "last.pt")["model"])
    assert load_checkpoint(straight / "last.pt")["epoch"] == 4  # the last epoch is always written


def test_resume_with_other_settings_is_refused(tiny_coco, tmp_path):
    train_ds, _ = _datasets(tiny_coco)
    spec = DetectorSpec(num_classes=train_ds.label_map.num_classes, **SPEC)
    train(build_detector(spec), train_ds, CFG.replace(epochs=1), tmp_path)
    with pytest.raises(RuntimeError, match=r"lr: 0.001 -> 0.1"):
        train(build_detector(spec), train_ds, CFG.replace(epochs=2, lr=0.1), tmp_path)


def test_the_torchrun_path_reuses_a_finished_run_only_with_the_same_settings(tiny_coco, tmp_path):
    """gpus > 1 (`launch.train_detector_distributed`) refuses a finished run made with other settings, as
    `train_detector` does, before torchrun starts; with the same settings (the device and loader workers may
    change) it returns the record without starting torchrun."""
    from pkdkit.data import DataConfig
    from pkdkit.errors import RunMismatchError
    from pkdkit.launch import train_detector_distributed

    train_ds, val_ds = _datasets(tiny_coco)
    spec = DetectorSpec(num_classes=train_ds.label_map.num_classes, **SPEC)
    cfg = CFG.replace(epochs=1)
    record = train_detector(spec, train_ds, val_ds, cfg, tmp_path, config={"role": "student"})
    data = DataConfig(str(tiny_coco["train_images"]), str(tiny_coco["train_json"]), str(tiny_coco["val_images"]),
                      str(tiny_coco["val_json"]))
    for changed in (cfg.replace(lr=0.1), cfg.replace(epochs=2)):
        with pytest.raises(RunMismatchError, match=r"eval.json was written with different settings \(changed: "):
            train_detector_distributed(spec, data, changed, tmp_path, 2, config={"role": "student"})
        with pytest.raises(RunMismatchError):
            train_detector(spec, train_ds, val_ds, changed, tmp_path, config={"role": "student"})
    with pytest.raises(RunMismatchError, match=r"role: 'student' -> 'teacher'"):
        train_detector_distributed(spec, data, cfg, tmp_path, 2, config={"role": "teacher"})
    same = cfg.replace(num_workers=1, device="auto", progress=True)
    assert train_detector_distributed(spec, data, same, tmp_path, 2, config={"role": "student"}) == record
    assert not (tmp_path / "launch.json").exists()  # no torchrun job was written


class PoisonedImages(torch.utils.data.Dataset):
    """The real dataset, but every image becomes NaN once `poisoned` is set (a corrupt input stream)."""

    def __init__(self, dataset: CocoDetection):
        self.dataset, self.poisoned = dataset, False

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, target = self.dataset[i]
        return (image * float("nan"), target) if self.poisoned else (image, target)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tiny_coco, tmp_path):
    train_ds, _ = _datasets(tiny_coco)
    data = PoisonedImages(train_ds)
    spec = DetectorSpec(num_classes=train_ds.label_map.num_classes, **SPEC)

    def poison_after_first_epoch(epoch, model):
        data.poisoned = True
        return {}

    # the checks are read at the epoch's last step (log_every > the 2 steps of an epoch), after the NaN loss of
    # step 1 went through its optimizer step: the error still names step 1, and no checkpoint holds it
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 2, step 1 \(global step 3\): "
                                                 r"classification=nan.*last good checkpoint .*last.pt is intact"):
        train(build_detector(spec), data, CFG.replace(epochs=2, log_every=50), tmp_path,
              on_epoch_end=poison_after_first_epoch)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in tmp_path.iterdir() if "tfevents" not in p.name) == ["history.json", "last.pt"]


def test_lr_schedule_warms_up_then_steps_or_decays():
    cfg = TrainConfig(warmup_iters=10, warmup_factor=0.001, milestones=(0.5, 0.75), gamma=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.001)
    assert lr_factor(10, 100, cfg) == 1.0
    assert lr_factor(60, 100, cfg) == pytest.approx(0.1) and lr_factor(80, 100, cfg) == pytest.approx(0.01)
    cosine = cfg.replace(schedule="cosine", warmup_iters=0)
    assert lr_factor(50, 100, cosine) == pytest.approx(0.5) and lr_factor(100, 100, cosine) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lamb")


def test_train_detector_writes_model_eval_and_config_and_skips_when_done(tiny_run, tmp_path):
    run, record, spec, train_ds, val_ds = (tiny_run[k] for k in ("dir", "record", "spec", "train_ds", "val_ds"))
    assert {"model.pt", "eval.json", "eval_results.json", "last.pt", "history.json"} <= {p.name for p in run.iterdir()}
    # TensorBoard in the run's folder, read back with tensorboard's reader: the training scalars at the logging
    # interval (the epoch's last step, 2), the 12 COCO stats of the evaluation, the AP alarm of an untrained model
    epoch = json.loads((run / "history.json").read_text())["epochs"][0]
    assert tb_scalars(run, "loss/total") == [(2, pytest.approx(epoch["loss"]))]
    for tag in ("loss/classification", "loss/bbox_regression", "train/lr", "train/grad_norm", "train/images_per_s"):
        assert [s for s, _ in tb_scalars(run, tag)] == [2], tag
    assert tb_scalars(run, "eval/bbox/AP") == [(2, pytest.approx(record.ap))]
    assert len([t for t in tb_tags(run)["scalars"] if t.startswith("eval/bbox/")]) == 12
    assert [a["name"] for a in record["alarms"]] == (["ap_zero"] if record.ap == 0 else [])
    assert json.loads((run / "eval.json").read_text())["alarms"] == record["alarms"]
    assert [s for s, _ in tb_texts(run, "alarms")] == ([2] if record.ap == 0 else [])
    assert record["config"]["spec"] == spec.to_dict() and set(record["metrics"]["bbox"]["stats"]) >= {"AP", "AR100"}
    assert record["config"]["ran_on"] == {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
                                          "amp": False, "channels_last": False, "world_size": 1}  # where it trained
    _, spec2, label_map, _ = load_detector(run / "model.pt")
    assert spec2 == spec and label_map == train_ds.label_map
    mtime = (run / "model.pt").stat().st_mtime
    assert train_detector(spec, train_ds, val_ds, CFG.replace(epochs=1), run) == record
    assert (run / "model.pt").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="num_classes=3"):
        train_detector(DetectorSpec(num_classes=3, **SPEC), train_ds, val_ds, CFG, tmp_path / "other")


def test_train_step_is_the_step_train_runs(tiny_coco, tmp_path):
    """One epoch of `train` ends with exactly the weights of the same batches through `train_step` (the function
    bench/timing.py times), with the engine's optimizer, schedule, seeds and loader order."""
    train_ds, _ = _datasets(tiny_coco)
    spec = DetectorSpec(num_classes=train_ds.label_map.num_classes, **SPEC)
    cfg = CFG.replace(epochs=1)
    torch.manual_seed(0)
    trained = build_detector(spec)
    train(trained, train_ds, cfg, tmp_path / "train")

    torch.manual_seed(0)
    model = build_detector(spec).train()
    loader = make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, len(loader), cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    checks = FiniteChecks(model)
    seed_everything(epoch_seed(cfg.seed, 0))
    loader.sampler.set_epoch(0)
    for i, (images, targets) in enumerate(loader):
        losses = train_step(model, images, targets, optimizer, scheduler, scaler, cfg, torch.device("cpu"),
                            checks=checks, at=StepAt(0, i, i))
        assert torch.equal(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    assert len(loader) == 2 and scheduler.last_epoch == 2
    for (name, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_history_of_a_run_written_before_history_json_is_still_read(tmp_path):
    """Runs written before the training history got its own name keep it in metrics.json: still read (and a
    newer history.json, written when such a run is resumed, wins)."""
    from pkdkit.rundir import RunDir
    from pkdkit.workflow import training_history

    folder = RunDir(tmp_path).model_dir("student")
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"config": {}, "epochs": [{"epoch": 1}]}))
    assert RunDir(tmp_path).history("student") == folder / "metrics.json"
    assert training_history(tmp_path, "student") == [{"epoch": 1}]
    (folder / "history.json").write_text(json.dumps({"config": {}, "epochs": [{"epoch": 1}, {"epoch": 2}]}))
    assert [e["epoch"] for e in training_history(tmp_path, "student")] == [1, 2]
    assert training_history(tmp_path, "teacher") == []


def test_torchrun_two_cpu_processes_train_with_gloo(tiny_coco, tmp_path):
    out = tmp_path / "ddp"
    from conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pkdkit.cli", "--quiet", *_train_args(tiny_coco, out, 2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if "tfevents" not in p.name) == ["eval.json", "eval_results.json",
                                                                              "history.json", "last.pt", "model.pt"]
    metrics = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    # TensorBoard: written by rank 0 alone (the process id is in the event files' names), losses over both ranks
    assert len({p.name.split(".")[-2] for p in out.glob("events.out.tfevents.*")}) == 1
    assert tb_scalars(out, "loss/total") == [(1, pytest.approx(metrics["epochs"][0]["loss"])),
                                             (2, pytest.approx(metrics["epochs"][1]["loss"]))]
    # 16 training images over 2 ranks at batch 8: one step per rank per epoch
    assert load_checkpoint(out / "last.pt")["scheduler"]["last_epoch"] == 2
