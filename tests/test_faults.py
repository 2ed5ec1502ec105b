"""The fault suite: each bad input or unsafe re-run a user can make, on tiny data, and its outcome.

Every case checks the three things a user sees: the message (what is wrong and where), the exit status, and
that the files that were there before are unchanged (nothing lost or overwritten silently).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pkdkit.cli import build_parser, main
from pkdkit.data import CocoDetection, DataError, LabelMap
from pkdkit.engine import NonFiniteLossError, TrainConfig, train
from pkdkit.errors import ConfigError, PkdkitError
from pkdkit.evaluate import run_cocoeval
from pkdkit.files import RunLockedError, atomic_write, run_lock, write_json
from pkdkit.models import DetectorSpec, build_detector, save_detector
from pkdkit.plan import PlanError, load_plan
from pkdkit.synthetic import make_synthetic_coco

TINY = ["--preset", "tiny", "--optimizer", "adamw", "--lr", "1e-3", "--warmup-iters", "1", "--device", "cpu"]
SPEC = dict(arch="fcos", backbone="resnet18", fpn_channels=32, min_size=64, max_size=64,
            anchor_sizes=(8, 16, 32, 64, 128))


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run `pkdkit ARGS` in this process; returns (exit status, stderr)."""
    try:
        code = main(["--quiet", *args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(err: str, command: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pkdkit {command}: error: "), err
    assert "Traceback" not in err and not lines[0].rstrip().endswith(":"), err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_data")
    make_synthetic_coco(root, n_train=8, n_val=4, size=64, seed=0)
    return root


@pytest.fixture
def own_data(tmp_path) -> Path:
    """A dataset a test may break."""
    make_synthetic_coco(tmp_path / "data", n_train=4, n_val=2, size=64, seed=1)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["--quiet", "train", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    return out


def _edit_json(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


# ----------------------------------------------------------------------------------------------------
# 1. Nothing is lost or overwritten silently
def test_synth_refuses_an_existing_dataset_and_force_leaves_no_stale_images(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["synth", "--out", str(out), "--train", "4", "--val", "2", "--size", "64"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    code, err = cli(capsys, "synth", "--out", str(out), "--train", "2", "--val", "1", "--size", "64", "--seed", "3")
    assert code == 1 and "already holds a dataset" in one_line_error(err, "synth") and str(out) in err
    assert snapshot(out) == before
    assert main(["synth", "--out", str(out), "--train", "2", "--val", "1", "--size", "64", "--force"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000001.png", "000002.png"]
    assert len(json.loads((out / "annotations" / "instances_train.json").read_text())["images"]) == 2


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder`'s run lock until killed."""
    code = ("import sys, time\nfrom pkdkit.files import run_lock\nwith run_lock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_folder_and_process(data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        t0 = time.time()
        code, err = cli(capsys, "train", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY)
        line = one_line_error(err, "train")
        assert code == 1 and time.time() - t0 < 30
        assert f"{out} is in use by another run (pid {holder.pid}" in line
        assert not (out / "last.pt").exists()
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            train(torch.nn.Linear(1, 1), [], TrainConfig(device="cpu"), out)
    finally:
        holder.kill()
        holder.wait()
    with run_lock(out):  # the lock dies with its holder
        pass
    assert not (out / ".pkdkit.lock").exists()


def test_distill_and_notebook_run_dirs_are_locked_too(data, tmp_path, capsys):
    from pkdkit.notebooks import run_notebooks

    run = tmp_path / "nb_run"
    holder = _hold_lock(run)
    try:
        with pytest.raises(RunLockedError, match=f"{run} is in use by another run \\(pid {holder.pid}"):
            run_notebooks("tiny", tmp_path / "report", run_dir=run, only=["01_data_and_teachers.ipynb"])
        assert not (tmp_path / "report" / "01_data_and_teachers.ipynb").exists()
        plan = _plan(data, tmp_path, out_dir=str(run))
        code, err = cli(capsys, "distill", str(plan))
        assert code == 1 and f"pid {holder.pid}" in one_line_error(err, "distill")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("change, named", [
    (["--arch", "retinanet"], "spec.arch: 'fcos' -> 'retinanet'"),
    (["--epochs", "2"], "train.epochs: 1 -> 2"),
    (["--lr", "0.002"], "train.lr: 0.001 -> 0.002"),
])
def test_rerunning_a_finished_run_with_other_settings_is_refused(finished_run, data, capsys, change, named):
    before = snapshot(finished_run)
    args = ["train", "--data", str(data), "--out", str(finished_run), "--epochs", "1", *TINY, *change]
    code, err = cli(capsys, *args)
    assert code == 1 and named in one_line_error(err, "train")
    assert snapshot(finished_run) == before


def test_rerunning_with_the_same_settings_returns_the_saved_result(finished_run, data, capsys):
    before = snapshot(finished_run)
    assert main(["--quiet", "train", "--data", str(data), "--out", str(finished_run), "--epochs", "1", *TINY]) == 0
    assert "fcos_resnet18" in capsys.readouterr().out and snapshot(finished_run) == before


def test_resuming_checks_the_dataset_and_the_spec(finished_run, data, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("last.pt", "history.json"):  # a run killed after its last epoch's checkpoint
        shutil.copy(finished_run / name, partial / name)
    before = snapshot(partial)
    other = tmp_path / "other_data"
    shutil.copytree(data, other)
    _edit_json(other / "annotations" / "instances_train.json", lambda d: d["annotations"].pop())
    for args, named in ((["--data", str(other)], "data.train_sha256"), (["--data", str(data), "--fpn-channels", "64"],
                                                                         "spec.fpn_channels: 32 -> 64")):
        code, err = cli(capsys, "train", *args, "--out", str(partial), "--epochs", "1", *TINY)
        assert code == 1 and named in one_line_error(err, "train") and "last.pt" in err
        assert snapshot(partial) == before


# ----------------------------------------------------------------------------------------------------
# 2. Non-finite values never become a "good" checkpoint; strict settings
@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "inf", "lr must be a finite number > 0, got inf"),
    ("--lr", "nan", "lr must be a finite number > 0, got nan"),
    ("--gamma", "-1", "gamma must be a finite number > 0"),
    ("--momentum", "1.5", "momentum must be a finite number >= 0 and < 1"),
    ("--milestones", "1.5", "each milestone (a fraction of all iterations) must be a finite number >= 0 and <= 1"),
])
def test_numeric_settings_are_checked_before_anything_is_written(data, tmp_path, capsys, flag, value, message):
    code, err = cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, flag, value)
    assert code == 1 and message in one_line_error(err, "train")
    assert not (tmp_path / "run").exists()


def test_fields_are_checked_against_their_real_types_whatever_their_spelling():
    """`config` checks the annotations themselves (typing.get_type_hints), not their text: a class spelled
    with a capital letter, a fixed-length tuple and a Literal are checked too, nested dataclasses by their class."""
    from pkdkit.config import check_fields

    @dataclass
    class Settings:
        folder: Path
        size: tuple[int, int] = (1, 2)
        mode: Literal["pca", "mean"] = "pca"
        scale: Optional[float] = None
        spec: DetectorSpec | None = None

    out = check_fields(Settings, {"folder": "runs/x", "size": [3, 4], "scale": "1e-3", "spec": {"arch": "fcos"}}, "s")
    assert out == {"folder": Path("runs/x"), "size": (3, 4), "scale": 0.001, "spec": {"arch": "fcos"}}
    for values, message in [({"folder": 3}, r"s: folder: expected Path, found 3 \(int\)"),
                            ({"folder": "x", "size": [3]}, r"s: size: expected tuple\[int, int\] \(2 items\)"),
                            ({"folder": "x", "size": [3, True]}, r"s: size: expected tuple\[int, int\], found \[3, True\]"),
                            ({"folder": "x", "mode": "max"}, r"s: mode: expected Literal\['pca', 'mean'\], found 'max'"),
                            ({"folder": "x", "scale": "big"}, r"s: scale: expected float \| None, found 'big'"),
                            ({"folder": "x", "spec": 5}, r"s: spec: expected DetectorSpec \| None, found 5"),
                            ({"folder": "x", "colour": 1}, r"s: unknown keys \['colour'\]")]:
        with pytest.raises(ConfigError, match=message):
            check_fields(Settings, values, "s")


def test_configuration_errors_are_pkdkit_errors_named_where_they_are_defined(tiny_coco):
    from pkdkit.data import DataConfig
    from pkdkit.launch import LaunchError
    from pkdkit.losses import build_loss
    from pkdkit.plan import Stage

    paths = [str(tiny_coco[k]) for k in ("train_images", "train_json", "val_images", "val_json")]
    for make, message in [(lambda: DetectorSpec(arch="yolo"), "unknown arch 'yolo'"),
                          (lambda: DetectorSpec(min_size="96"), "detector min_size: expected int, found '96'"),
                          (lambda: DetectorSpec.from_dict({"archh": "fcos"}), r"detector: unknown keys \['archh'\]"),
                          (lambda: DataConfig(*paths, labels="coco"), "data.labels must be 'contiguous' or 'identity'"),
                          (lambda: DataConfig(*paths, masks="yes"), "data masks: expected bool, found 'yes'"),
                          (lambda: Stage(name="a", teacher="t.pt", loss="kld"), r"unknown loss 'kld'; available"),
                          (lambda: Stage(name="a", teacher="t.pt", loss_params={"tau": 1.0}),
                           r"loss_params: loss 'mgd' got unknown hyper-parameter\(s\) \['tau'\]"),
                          (lambda: Stage(name="a", teacher="t.pt", loss_weight="much"), "loss_weight must be a number"),
                          (lambda: build_loss("kld", 8, 8), "unknown loss 'kld'"),
                          (lambda: TrainConfig.from_dict({"lr": 0.1, "rate": 1}), r"unknown keys \['rate'\]")]:
        with pytest.raises(ConfigError, match=message):
            make()
    assert issubclass(LaunchError, PkdkitError) and issubclass(PlanError, ConfigError)


def test_boolean_flags_take_only_booleans(data, tmp_path, capsys):
    code, err = cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--amp", "ture")
    assert code == 2 and "argument --amp: expected true or false, got 'ture'" in err
    with pytest.raises(ConfigError, match="amp: expected bool, found 'yes'"):
        TrainConfig(amp="yes")
    assert build_parser(["train"]).parse_args(["train", "--out", "x", "--amp", "False"]).amp is False


def test_weights_that_become_non_finite_after_a_step_never_reach_a_checkpoint(data, tmp_path):
    ds = CocoDetection(data / "train", data / "annotations" / "instances_train.json", train=True)
    model = build_detector(DetectorSpec(num_classes=ds.label_map.num_classes, **SPEC))
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="sgd", lr=1e-3, warmup_iters=0, grad_clip=0, device="cpu",
                      progress=False)

    def corrupt_gradients(epoch, m):  # the loss stays finite; the step makes the weights NaN
        m.head.classification_head.cls_logits.weight.register_hook(lambda g: g * float("inf"))
        return {}

    with pytest.raises(NonFiniteLossError, match=r"non-finite weights after the optimizer step at epoch 2, step 1 "
                                                 r".*cls_logits.weight.*last good checkpoint .*last.pt is intact"):
        train(model, ds, cfg, tmp_path, on_epoch_end=corrupt_gradients)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------------
# 3. Input is validated where it enters
@pytest.mark.parametrize("file_name", ["../../etc/passwd", "../000001.png", "/etc/hosts", "a/../../x.png", ""])
def test_file_names_must_stay_inside_the_image_folder(own_data, file_name):
    ann = own_data / "annotations" / "instances_val.json"
    _edit_json(ann, lambda d: d["images"][0].update(file_name=file_name))
    with pytest.raises(DataError, match=r"image id 1 file_name .*(outside the image folder|non-empty string)") as err:
        CocoDetection(own_data / "val", ann)
    assert str(ann) in str(err.value)


def test_16_bit_images_are_scaled_and_32_bit_ones_refused(own_data):
    ann = own_data / "annotations" / "instances_val.json"
    grey = np.full((64, 64), 32768, dtype=np.uint16)
    Image.fromarray(grey).save(own_data / "val" / "000001.png")
    image, _ = CocoDetection(own_data / "val", ann)[0]
    assert image.shape == (3, 64, 64) and torch.allclose(image, torch.full_like(image, 32768 / 65535))
    Image.fromarray(grey.astype(np.int32)).save(own_data / "val" / "wide.tiff")
    _edit_json(ann, lambda d: d["images"][0].update(file_name="wide.tiff"))
    with pytest.raises(DataError, match=r"wide.tiff \(image id 1 .*32-bit integer pixels"):
        CocoDetection(own_data / "val", ann)[0]


@pytest.mark.parametrize("polygon, message", [
    ([10.0, 10.0, 20.0, 10.0, 20.0], "has 5 coordinates"),
    ([10.0, 10.0, 20.0, 10.0], "has 4 coordinates"),
    ([10.0, "x", 20.0, 10.0, 20.0, 20.0], "should be a flat list of numbers"),
])
def test_bad_polygons_name_the_annotation(own_data, polygon, message):
    ann = own_data / "annotations" / "instances_train.json"
    d = json.loads(ann.read_text())
    d["annotations"][0]["segmentation"] = [polygon]
    ann.write_text(json.dumps(d))
    ann_id, image_id = d["annotations"][0]["id"], d["annotations"][0]["image_id"]
    with pytest.raises(DataError, match=rf"annotation id {ann_id} \(image id {image_id}\) polygon 0 {message}"):
        CocoDetection(own_data / "train", ann)


def test_string_image_ids_are_a_clear_error(own_data, capsys):
    ann = own_data / "annotations" / "instances_val.json"

    def stringify(d):
        for a in d["annotations"]:
            a["image_id"] = str(a["image_id"])
        for img in d["images"]:
            img["id"] = str(img["id"])
    _edit_json(ann, stringify)
    code, err = cli(capsys, "evaluate", "--data", str(own_data), "missing.pt")
    assert code == 1 and "image has id '1' (str); COCO ids are integers" in one_line_error(err, "evaluate")


def test_a_training_set_left_empty_by_invalid_boxes_is_an_error(own_data, tmp_path, capsys):
    ann = own_data / "annotations" / "instances_train.json"
    _edit_json(ann, lambda d: [a.update(bbox=[0, 0, 0, 5]) for a in d["annotations"]])
    code, err = cli(capsys, "train", "--data", str(own_data), "--out", str(tmp_path / "run"), *TINY)
    assert code == 1 and "no usable training annotations" in one_line_error(err, "train") and str(ann) in err
    assert not (tmp_path / "run").exists()


def test_skipped_degenerate_boxes_are_counted_and_named(own_data):
    ann = own_data / "annotations" / "instances_train.json"
    d = json.loads(ann.read_text())
    for a in d["annotations"][:2]:
        a["bbox"] = [5.0, 5.0, 0.0, 3.0]
    ann.write_text(json.dumps(d))
    ids = [a["id"] for a in d["annotations"][:2]]
    with pytest.warns(UserWarning, match=rf"skipped 2 annotations with degenerate boxes .* annotation ids {re.escape(str(ids))}"):
        CocoDetection(own_data / "train", ann)


def test_a_model_with_no_category_in_common_with_the_data_is_an_error(data, tmp_path, capsys):
    spec = DetectorSpec(num_classes=3, **SPEC)
    ckpt = save_detector(tmp_path / "other" / "model.pt", build_detector(spec), spec,
                         LabelMap((1, 2), (101, 102), ("cat", "dog")))
    code, err = cli(capsys, "evaluate", "--data", str(data), str(ckpt), "--device", "cpu")
    assert code == 1 and "have none in common" in one_line_error(err, "evaluate")


def _plan(data: Path, tmp_path: Path, *, train: dict | None = None, stage: dict | None = None,
          out_dir: str = "run", teacher: str | None = None) -> Path:
    """A one-stage plan file (teacher: a pkdkit checkpoint written here)."""
    lm = CocoDetection(data / "val", data / "annotations" / "instances_val.json").label_map
    spec = DetectorSpec(num_classes=lm.num_classes, **SPEC)
    if teacher is None:
        teacher = str(save_detector(tmp_path / "teacher.pt", build_detector(spec), spec, lm))
    d = {"name": "p", "out_dir": out_dir, "student": spec.to_dict(),
         "data": {"train_images": str(data / "train"), "train_json": str(data / "annotations/instances_train.json"),
                  "val_images": str(data / "val"), "val_json": str(data / "annotations/instances_val.json")},
         "train": {"epochs": 1, "device": "cpu", **(train or {})},
         "stages": [{"name": "t", "teacher": teacher, "loss": "mgd", **(stage or {})}]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_plan_numbers_written_as_yaml_strings_are_read_as_numbers(data, tmp_path):
    path = _plan(data, tmp_path, stage={"loss_params": {"alpha_mgd": "2e-5"}, "train": {"weight_decay": "1e-4"}})
    text = path.read_text().replace("epochs: 1", "epochs: 1\n  lr: 1e-3")  # YAML 1.1 reads 1e-3 as a string
    path.write_text(text)
    assert yaml.safe_load(text)["train"]["lr"] == "1e-3"
    plan = load_plan(path)
    assert plan.train.lr == 0.001 and plan.stages[0].loss_params == {"alpha_mgd": 2e-5}
    assert plan.stage_train(0).weight_decay == 1e-4


@pytest.mark.parametrize("train, stage, message", [
    ({"epochs": "two"}, None, r"train: training setting epochs: expected int, found 'two'"),
    ({"lr": float("inf")}, None, r"train: lr must be a finite number > 0, got inf"),
    (None, {"inherit_teacher_head": "yes"}, r"stage 1 \(t\): inherit_teacher_head: expected bool \| None, found 'yes'"),
    (None, {"train": {"gamma": 0}}, r"stage 1 \(t\): gamma must be a finite number > 0"),
    (None, {"loss_params": {"alpha_mgd": -1}}, r"stage 1 \(t\): loss_params: .*alpha_mgd must be >= 0"),
    (None, {"loss_params": {"alpha": 1}}, r"stage 1 \(t\): loss_params: loss 'mgd' got unknown hyper-parameter\(s\) "
                                         r"\['alpha'\]; accepted: alpha_mgd=2e-05"),
    (None, {"levels": "p3"}, r"stage 1 \(t\): levels: expected list\[str\] \| None, found 'p3'"),
])
def test_plan_fields_are_type_checked_before_anything_is_written(data, tmp_path, capsys, train, stage, message):
    path = _plan(data, tmp_path, train=train, stage=stage)
    code, err = cli(capsys, "distill", str(path))
    line = one_line_error(err, "distill")
    assert code == 1 and str(path) in line
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()


def test_detection_results_are_validated(data):
    gt = data / "annotations" / "instances_val.json"
    good = {"image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 10.0, 10.0], "score": 0.9}
    for bad, message in (({**good, "bbox": [1.0, float("nan"), 10.0, 10.0]}, r"result #1 bbox should be 4 finite"),
                         ({**good, "bbox": [1.0, 2.0, float("inf"), 10.0]}, r"result #1 bbox should be 4 finite"),
                         ({**good, "score": float("nan")}, r"result #1 score should be a finite number"),
                         ({k: v for k, v in good.items() if k != "score"}, r"result #1 needs .*'score'"),
                         ({k: v for k, v in good.items() if k != "bbox"}, r"result #1 has no 'bbox' but result #0 has one")):
        with pytest.raises(ValueError, match=message):
            run_cocoeval(gt, [good, bad])
    with pytest.raises(ValueError, match="no result has a category of the ground truth"):
        run_cocoeval(gt, [{**good, "category_id": 999}])


def test_unknown_or_mistyped_notebook_parameters_fail_before_any_notebook_runs(tmp_path, capsys):
    report = tmp_path / "report"
    base = ["notebooks", "run", "--out", str(report), "--run-dir", str(tmp_path / "run")]
    code, err = cli(capsys, *base, "-p", "epoch=3")
    line = one_line_error(err, "notebooks")
    assert code == 1 and "unknown notebook parameter 'epoch'" in line and "distill_epochs=None" in line
    code, err = cli(capsys, *base, "-p", "run_reversed=3")
    assert code == 1 and "'run_reversed' should be a bool" in one_line_error(err, "notebooks")
    code, err = cli(capsys, *base, "-p", "run_dir=/elsewhere")
    assert code == 1 and "set with --run-dir" in one_line_error(err, "notebooks")
    code, err = cli(capsys, "notebooks", "experiment", "--out", str(report), "--run-root", str(tmp_path / "run"),
                    "-p", "seed=1")
    assert code == 1 and "'seed' is set with --seeds" in one_line_error(err, "notebooks")
    assert not list(report.glob("*.ipynb")) and not (tmp_path / "run").exists()


def test_a_notebook_run_dir_refuses_other_parameters(tmp_path, capsys):
    """A first run (failing fast in notebook 01 on a missing data root) records its parameters; a re-run with
    other epochs is refused before any notebook runs."""
    run, report = tmp_path / "run", tmp_path / "report"
    base = ["notebooks", "run", "--out", str(report), "--run-dir", str(run), "--device", "cpu",
            "--only", "01_data_and_teachers.ipynb", "-p", f"data_root={tmp_path / 'nowhere'}"]
    code, err = cli(capsys, *base, "-p", "epochs=1")
    assert code == 1 and "01_data_and_teachers.ipynb failed in cell" in err
    before, executed = snapshot(run), (report / "01_data_and_teachers.ipynb").stat().st_mtime
    code, err = cli(capsys, *base, "-p", "epochs=3")
    assert code == 1 and "epochs: 1 -> 3" in one_line_error(err, "notebooks")
    assert snapshot(run) == before and (report / "01_data_and_teachers.ipynb").stat().st_mtime == executed


def test_cheap_checks_fail_before_training(data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = cli(capsys, "train", "--data", str(data), "--out", str(blocker / "run"), *TINY)
    assert code == 1 and f"cannot write to the run folder {blocker / 'run'}" in one_line_error(err, "train")
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    (broken / "val" / "000002.png").unlink()
    code, err = cli(capsys, "train", "--data", str(broken), "--out", str(tmp_path / "run"), *TINY)
    assert code == 1 and "1 of 4 image files" in one_line_error(err, "train") and "000002.png" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# 4. One clear message per error
def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, data):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code, err = cli(capsys, "evaluate", "--data", str(data), str(empty), "--device", "cpu")
    line = one_line_error(err, "evaluate")
    assert code == 1 and f"cannot read checkpoint {empty}: " in line and not line.endswith(": ")
    code, err = cli(capsys, "--debug", "evaluate", "--data", str(data), str(empty), "--device", "cpu")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("pkdkit evaluate: error:")
    code, err = cli(capsys, "evaluate", "--data", str(tmp_path / "nowhere"), str(empty))
    assert code == 1 and "the folder does not exist" in one_line_error(err, "evaluate")
    code, err = cli(capsys, "distill", str(tmp_path / "no_plan.yaml"))
    assert code == 1 and "cannot read plan" in one_line_error(err, "distill")


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time\nt = time.time()\nfrom pkdkit.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint(time.time() - t, 'torch' in sys.modules, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    seconds, imported = proc.stderr.split()
    assert "train" in proc.stdout and imported == "False" and float(seconds) < 1.0


def test_subcommand_help_lists_the_choices_and_describes_every_option(capsys):
    for command, choices in (("train", ["fcos", "maskrcnn", "resnet50", "swin_t", "adamw", "cosine"]),
                             ("select", ["shortest_path", "greedy", "closed_form", "sgd", "mgd", "cwd"]),
                             ("synth", ["--force"]), ("evaluate", ["--device"]), ("distill", ["--device"]),
                             ("doctor", ["--gpus", "--steps", "--batch-size"])):
        parser = build_parser([command])
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert all(c in text for c in choices), (command, text)
        # argparse writes an option's help after it on the same line, or indented further on the next line
        lines = text.splitlines()
        undescribed = [line.strip() for line, after in zip(lines, lines[1:] + [""])
                       if re.match(r"  -", line) and not re.search(r"\S  +\S", line.strip())
                       and len(after) - len(after.lstrip()) <= 2]
        assert not undescribed, f"{command}: options without help {undescribed}"


# ----------------------------------------------------------------------------------------------------
# 5. Tidy files
def test_interrupted_atomic_writes_are_cleaned_up_and_files_get_normal_permissions(tmp_path):
    """A writer killed with SIGKILL mid-write leaves its temp file; the next write of that file removes it."""
    code = ("import sys, time\nfrom pkdkit.files import atomic_write\n"
            "def write(f):\n    f.write(b'half a checkpoint')\n    f.flush()\n    print('writing', flush=True)\n"
            "    time.sleep(600)\natomic_write(sys.argv[1], write)\n")
    target = tmp_path / "metrics.json"
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    (stale,) = tmp_path.glob(".metrics.json.*.tmp")
    assert not target.exists()
    alive = tmp_path / stale.name.replace(f"-{proc.pid}.", f"-{os.getpid()}.")  # this process: still writing
    assert alive != stale  # the temporary file's name holds its writer's process id
    alive.write_text("in progress")
    old = os.umask(0o022)
    try:
        write_json({"a": 1}, target)
    finally:
        os.umask(old)
    assert not stale.exists() and alive.exists() and json.loads(target.read_text()) == {"a": 1}
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x.bin", lambda f: 1 / 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "metrics.json"]


def test_pkdkit_errors_share_one_base():
    from pkdkit.models import CheckpointError
    from pkdkit.notebooks import NotebookRunError

    for cls in (DataError, PlanError, ConfigError, CheckpointError, NonFiniteLossError, NotebookRunError,
                RunLockedError):
        assert issubclass(cls, PkdkitError)


# ----------------------------------------------------------------------------------------------------
# 6. Second pass (issue 23): exports, damaged checkpoints, non-finite boxes, names, notebook parameters,
# one-image batches, failed writes
def test_export_never_overwrites_and_never_writes_into_a_run_folder(finished_run, tmp_path, capsys):
    model = finished_run / "model.pt"
    existing = tmp_path / "student.pth"
    existing.write_bytes(b"the user's file")
    (tmp_path / "folder").mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    before, mine = snapshot(finished_run), snapshot(tmp_path)
    for out, force, message in (
            (model, False, f"{model} is a file of the run folder {finished_run}; an export never replaces"),
            (model, True, f"{model} is a file of the run folder {finished_run}; an export never replaces"),
            (finished_run / "eval", True, f"{finished_run / 'eval.json'} is a file of the run folder"),
            (existing, False, f"{existing} already exists; give another --out, or --force to replace it"),
            (tmp_path / "folder", True, f"--out {tmp_path / 'folder'} is a folder"),
            (blocker / "student.pth", False, f"cannot write {blocker / 'student.pth'}: a part of its folder's path "
                                             f"is a file")):
        code, err = cli(capsys, "export", str(model), "--out", str(out), *(["--force"] if force else []))
        assert code == 1 and message in one_line_error(err, "export"), (out, err)
        assert snapshot(finished_run) == before and snapshot(tmp_path) == mine
    code, err = cli(capsys, "export", str(existing), "--out", str(existing))
    assert code == 1 and "(it is the checkpoint being exported)" in one_line_error(err, "export")
    assert main(["export", str(model), "--out", str(existing), "--force"]) == 0  # --force: an ordinary file
    assert len(torch.load(existing, weights_only=True)) == len(torch.load(model, weights_only=True)["model"])


def _damage(path: Path) -> None:
    """4 KiB of random bytes written into the middle of `path`."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(4096))


def test_a_damaged_checkpoint_is_refused_by_every_command(finished_run, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _damage(run / "model.pt")
    before = snapshot(tmp_path)
    message = f"checkpoint {run / 'model.pt'} has changed since it was written"
    for args in (["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY],
                 ["evaluate", "--data", str(data), str(run / "model.pt"), "--device", "cpu"],
                 ["export", str(run / "model.pt"), "--out", str(tmp_path / "student.pth")],
                 ["select", "--data", str(data), "--student", str(run / "model.pt"), "--teachers",
                  f"t={finished_run / 'model.pt'}", "--out", str(tmp_path / "selection"), "--images", "2"]):
        code, err = cli(capsys, *args)
        assert code == 1 and message in one_line_error(err, args[0]), args
    shutil.rmtree(tmp_path / "selection")  # the selection's (empty) output folder
    assert snapshot(tmp_path) == before


def test_checkpoints_without_a_digest_still_load_after_the_finite_check(finished_run, data, tmp_path, capsys):
    from pkdkit.models import DIGEST_KEY, load_checkpoint, model_meta

    payload = torch.load(finished_run / "model.pt", weights_only=True)
    assert DIGEST_KEY in payload
    del payload[DIGEST_KEY]
    torch.save(payload, tmp_path / "old.pt")  # as pkdkit wrote checkpoints before digests
    assert model_meta(tmp_path / "old.pt")[0].arch == "fcos"
    name = next(k for k, v in payload["model"].items() if v.is_floating_point())
    payload["model"][name] = payload["model"][name].clone().fill_(float("nan"))
    torch.save(payload, tmp_path / "nan.pt")
    code, err = cli(capsys, "evaluate", "--data", str(data), str(tmp_path / "nan.pt"), "--device", "cpu")
    assert code == 1 and f"checkpoint {tmp_path / 'nan.pt'} has non-finite weights (NaN or inf) in 1 tensors, e.g. " \
                         f"['{name}']" in one_line_error(err, "evaluate")
    (tmp_path / "notes.txt").write_text("model: not a checkpoint\n")
    code, err = cli(capsys, "evaluate", "--data", str(data), str(tmp_path / "notes.txt"), "--device", "cpu")
    line = one_line_error(err, "evaluate")
    assert code == 1 and "it is not a checkpoint written by torch.save (the file is not a zip archive)" in line
    assert "weights_only" not in line
    shutil.copy(finished_run / "model.pt", tmp_path / "copy.pt")
    _damage(tmp_path / "copy.pt")
    with pytest.raises(PkdkitError, match=f"checkpoint {re.escape(str(tmp_path / 'copy.pt'))} has changed"):
        load_checkpoint(tmp_path / "copy.pt")


def test_non_finite_boxes_are_left_out_of_training_and_evaluation(own_data):
    from pkdkit.evaluate import coco_evaluate

    val = own_data / "annotations" / "instances_val.json"
    d = json.loads(val.read_text())
    d["annotations"][0]["bbox"] = [1.0, float("nan"), 10.0, 10.0]
    d["annotations"][1]["bbox"] = [1.0, 2.0, float("inf"), 4.0]
    bad = [d["annotations"][0]["id"], d["annotations"][1]["id"]]
    val.write_text(json.dumps(d))  # Python writes NaN and Infinity, which json.loads reads back
    with pytest.warns(UserWarning) as warned:
        ds = CocoDetection(own_data / "val", val)
    assert [str(w.message) for w in warned] == [
        f"skipped 2 annotations with non-finite bbox values (NaN or infinity) in {val}, annotation ids {bad}: left "
        f"out of training and evaluation"]
    kept = ds.coco.dataset["annotations"]
    assert not {a["id"] for a in kept} & set(bad) and len(kept) == len(d["annotations"]) - 2
    assert all(len(ds[i][1]["boxes"]) == len(ds.coco.getAnnIds(imgIds=[ds.ids[i]])) for i in range(len(ds)))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in kept]
    assert coco_evaluate(ds.coco, perfect)["bbox"]["stats"]["AP"] == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--min-size", "0"], "min_size and max_size must be whole pixels with 1 <= min_size <= max_size"),
    (["--min-size", "128", "--max-size", "32"], "found min_size=128, max_size=32"),
    (["--anchor-sizes", "8", "16"], "anchor_sizes must be 5 sizes >= 1 px, one per FPN level"),
])
def test_contradictory_sizes_are_refused(data, tmp_path, capsys, flags, message):
    code, err = cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, *flags)
    assert code == 1 and message in one_line_error(err, "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, name", [("stage", "../../escaped_outside"), ("stage", "a/b"), ("stage", ".."),
                                         ("stage", ""), ("plan", "../p")])
def test_names_that_become_paths_are_one_path_component(data, tmp_path, capsys, field, name):
    path = _plan(data, tmp_path, stage={"name": name} if field == "stage" else None)
    if field == "plan":
        path.write_text(path.read_text().replace("name: p\n", f"name: {name}\n"))
    before = snapshot(tmp_path)
    code, err = cli(capsys, "distill", str(path))
    line = one_line_error(err, "distill")
    assert code == 1 and f"{field} name {name!r} is not a valid name" in line and str(path) in line
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("teachers, message", [
    (["a=X.pt", "a=Y.pt"], "--teachers: teacher names must be unique; ['a'] given more than once"),
    (["student=X.pt"], "--teachers: a teacher may not be named 'student'"),
    (["../t=X.pt"], "--teachers: teacher name '../t' is not a valid name"),
])
def test_select_refuses_repeated_or_reserved_teacher_names(finished_run, data, tmp_path, capsys, teachers, message):
    code, err = cli(capsys, "select", "--data", str(data), "--student", str(finished_run / "model.pt"),
                    "--teachers", *teachers, "--out", str(tmp_path / "selection"))
    assert code == 1 and message in one_line_error(err, "select")
    assert not (tmp_path / "selection").exists()


@pytest.mark.parametrize("param, message", [
    ("epochs=abc", "notebook parameter 'epochs' should be an int or None (its default is None), got 'abc' (str)"),
    ("epochs=-1", "run settings: epochs must be a finite number >= 1, got -1"),
    ("image_size=1.5", "notebook parameter 'image_size' should be an int or None (its default is None), got 1.5"),
    ("loss=3", "notebook parameter 'loss' should be a str or None"),
])
def test_notebook_parameters_with_a_none_default_are_typed_before_anything_runs(tmp_path, capsys, param, message):
    """Nothing is written, so the corrected value is not refused afterwards as another run's."""
    report, run = tmp_path / "report", tmp_path / "run"
    code, err = cli(capsys, "notebooks", "run", "--out", str(report), "--run-dir", str(run), "-p", param)
    assert code == 1 and message in one_line_error(err, "notebooks")
    assert not report.exists() and not run.exists()


def test_one_image_batches_train_evaluate_and_export(tmp_path, capsys):
    """The tiny preset's FCOS head (GroupNorm(32, 32)) on P7 of 1 x 1: 17 training images at batch 8 leave a
    last batch of one, the validation set is one image, and ONNX export traces one image."""
    from pkdkit.models import GroupNorm
    from pkdkit.presets import get_preset

    make_synthetic_coco(tmp_path / "data", n_train=17, n_val=1, size=96, seed=0)
    run = tmp_path / "run"
    assert main(["--quiet", "train", "--data", str(tmp_path / "data"), "--out", str(run), "--preset", "tiny",
                 "--epochs", "1", "--device", "cpu"]) == 0
    assert json.loads((run / "eval.json").read_text())["num_images"] == 1
    assert main(["export", str(run / "model.pt"), "--out", str(tmp_path / "student.onnx"), "--format", "onnx"]) == 0
    assert (tmp_path / "student.onnx").stat().st_size > 0
    # same weights and outputs as torch's own GroupNorm wherever that one runs
    model = build_detector(get_preset("tiny").student).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is GroupNorm for m in norms)
    x = torch.randn(2, 32, 3, 3)
    assert torch.equal(norms[0](x), torch.nn.functional.group_norm(x, 32, norms[0].weight, norms[0].bias))


def test_a_write_that_fails_for_lack_of_space_names_the_file_and_the_cause(data, tmp_path):
    """/dev/full fails every write with ENOSPC: torch.save then says only "unexpected pos"; the file it wrote
    through remembers the cause. A checkpoint write over the file size limit (EFBIG) runs through the CLI."""
    import errno
    import resource
    import signal

    from pkdkit.files import _RecordingFile, write_failure

    with open("/dev/full", "wb", buffering=0) as full:
        recorder = _RecordingFile(full)
        with pytest.raises((RuntimeError, OSError)):
            torch.save({"w": torch.zeros(10_000)}, recorder)
    assert recorder.error.errno == errno.ENOSPC
    assert str(write_failure(tmp_path / "last.pt", recorder.error)) == (
        f"cannot write {tmp_path / 'last.pt'}: no space left on device in {tmp_path}; free some space and run again "
        f"(the file keeps its previous content, if it had one)")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pkdkit.cli", "--quiet", "train", "--data", str(data), "--out",
                           str(run), "--epochs", "1", *TINY], capture_output=True, text=True, preexec_fn=limit_file_size,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 1 and f"cannot write {run / 'last.pt'}: file too large" in one_line_error(proc.stderr,
                                                                                                        "train")
    assert not list(run.glob("*.pt")) and not list(run.glob(".*.tmp"))
