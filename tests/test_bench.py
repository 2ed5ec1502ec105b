"""The benchmark's code paths, run on CPU at toy sizes (no timing is checked here: numbers live in
bench/run.py's output). The CUDA speed settings (AMP, channels-last, cuDNN autotuning) in particular are
only measured on a GPU; this proves their code runs and does what it says."""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import loading  # noqa: E402
import run  # noqa: E402
import scaling  # noqa: E402

from pkdkit.evaluate import STAT_NAMES  # noqa: E402
from pkdkit.models import DetectorSpec  # noqa: E402
from pkdkit.presets import get_preset  # noqa: E402

TOY = dict(num_classes=4, fpn_channels=32, min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128))


@pytest.fixture(scope="module")
def toy_cfg() -> run.BenchConfig:
    cfg = run.BenchConfig.make("cpu", "tiny", quick=True)
    student = DetectorSpec(arch="fcos", backbone="resnet18", **TOY)
    return replace(cfg, student=student, teacher=student, candidates=[student, student], image_hw=(64, 64),
                   train=cfg.train.replace(batch_size=2), eval_images=30, eval_repeats=1)


def test_speed_settings_run_amp_channels_last_and_cudnn_autotuning_side_by_side(toy_cfg):
    # oneDNN's bfloat16 convolution backward returns NaN gradients now and then on this CPU (found once the bench
    # step ran the engine's finite checks); torch's own kernels do not. The settings bench is for CUDA.
    with torch.backends.mkldnn.flags(enabled=False):
        _speed_settings_side_by_side(toy_cfg)


def _speed_settings_side_by_side(toy_cfg):
    torch.manual_seed(0)  # the toy models' weights: independent of what other test modules drew at import
    cpu = torch.device("cpu")
    steps = run.settings_fns(toy_cfg, cpu)
    assert list(steps) == ["plain", "amp", "amp+channels_last", "amp+channels_last+cudnn_benchmark"]
    conv = lambda m: next(x for x in m.modules() if isinstance(x, torch.nn.Conv2d))  # noqa: E731
    for name, step in steps.items():
        layout = torch.channels_last if "channels_last" in name else torch.contiguous_format
        assert conv(step.model.student.backbone).weight.is_contiguous(memory_format=layout), name
        assert conv(step.teacher.backbone).weight.is_contiguous(memory_format=layout), name
        assert step.amp == (name != "plain") and step.cudnn_benchmark == name.endswith("cudnn_benchmark")

    seen = {}  # the teacher's FPN output dtype in each setting: the teacher runs under the same autocast
    for name, step in steps.items():
        def record(module, inputs, out, name=name) -> None:
            seen.setdefault(name, next(iter(out.values())).dtype)

        handle = step.teacher.backbone.register_forward_hook(record)
        step()
        handle.remove()
        assert math.isfinite(step.last_loss), name
    assert seen == {"plain": torch.float32, "amp": torch.bfloat16, "amp+channels_last": torch.bfloat16,
                    "amp+channels_last+cudnn_benchmark": torch.bfloat16}

    before = torch.backends.cudnn.benchmark
    out = run.bench_settings(toy_cfg, cpu, warmup=0, repeats=1, steps=steps)
    assert out["plain"]["speedup_vs_plain"] == 1.0 and out["amp"]["amp_dtype"] == "bfloat16"
    assert all(out[name]["n"] == 1 and isinstance(out[name]["final_loss"], float) for name in run.SETTINGS), out
    # fp32 stays finite; a bf16 step of these random toy models can overflow on its second step (seen in
    # some test orders), which is a property of the toy, not of the code path under test
    assert math.isfinite(out["plain"]["final_loss"]), out
    assert torch.backends.cudnn.benchmark is before  # put back as it was


@pytest.fixture(scope="module")
def evaluation_config(toy_cfg) -> run.BenchConfig:
    return replace(toy_cfg, eval_repeats=2)


@pytest.fixture(scope="module")
def evaluation(evaluation_config) -> dict:
    return run.bench_evaluation(evaluation_config)


def test_evaluation_benchmark_uses_coco_categories_crowd_and_masks_and_finds_identical_stats(evaluation,
                                                                                              evaluation_config):
    out, repeats = evaluation, evaluation_config.eval_repeats
    assert out["images"] == evaluation_config.eval_images
    assert out["categories"] == 80 and out["categories_with_ground_truth"] < 80
    assert 0 < out["crowd"] < out["ground_truth"] and out["detections_with_masks"] == out["detections"] > 300
    for iou_type in ("bbox", "segm"):
        row = out[iou_type]
        assert row["stats_identical"] and row["per_class_identical"] and row["stats_max_abs_diff"] == 0.0
        assert row["AP"] == row["stats"]["AP"] and list(row["stats"]) == list(STAT_NAMES)
        assert row["plain"]["n"] == row["pkdkit"]["n"] == repeats  # one time per repeat, the warm-up round apart
        assert all(row[name]["min_s"] <= row[name]["median_s"] for name in ("plain", "pkdkit"))
        assert math.isclose(row["ratio"], row["pkdkit"]["median_s"] / row["plain"]["median_s"])
        assert math.isfinite(row["cpu_ratio"]), row
    real = out["segm_real"]  # COCO-sized images with many-vertex masks, same comparison
    assert real["stats_identical"] and real["per_class_identical"] and real["polygon_vertices_mean"] > 20
    assert real["images"] == evaluation_config.eval_images and real["pkdkit"]["n"] == repeats
    assert out["target"] == {"bbox": 0.35, "segm": 0.5, "segm_real": 0.35}


def test_loader_benchmark_compares_the_loader_with_the_training_step(tmp_path):
    out = loading.bench_loading("tiny", torch.device("cpu"), n_images=8, passes=1, steps=1, workers=(0, 1),
                                root=tmp_path)
    assert [row["num_workers"] for row in out["loader"]] == [0, 1] == [row["num_workers"] for row in out["fed"]]
    assert all(row["passes"] == 1 and row["images_per_pass"] == out["images"] == 8 for row in out["loader"])
    assert out["step"]["steps"] == 1 and all(row["steps"] == 1 for row in out["fed"])
    step_rate = out["step"]["images_per_s"]
    assert all(math.isclose(row["ratio_to_step"], row["images_per_s"] / step_rate) for row in out["loader"] + out["fed"])
    tiny = get_preset("tiny")
    assert out["masks"] and out["batch_size"] == tiny.train.batch_size and out["image_size"] == tiny.student.min_size


def test_selection_point_times_a_cost_matrix_and_its_peak_memory(toy_cfg):
    specs = run.selection_specs(toy_cfg, 2)
    assert list(specs) == ["student", "fcos_resnet18"]
    point = scaling.selection_point(specs, 8, (64, 64), 4, torch.device("cpu"))
    assert point["images"] == 8 and point["models"] == 2 and point["peak_mib"] >= 0
    assert math.isclose(point["images_per_s"], 8 / point["seconds"])
    assert math.isclose(point["cpu_seconds_over_forwards"], point["cpu_seconds"] / point["forward_cpu_seconds"])
    # the levels measured: the FPN's from p3 on, less those too small on 8 images of 64 px, each named in a warning
    levels = ["p3", "p4", "p5", "p6", "p7"]
    assert point["levels"] and point["levels"] == levels[:len(point["levels"])]
    assert all(any(level in w for w in point["warnings"]) for level in levels[len(point["levels"]):]), point
    images = scaling.RandomImages(3, (8, 8), seed=1)
    assert torch.equal(images[2], scaling.RandomImages(3, (8, 8), seed=1)[2]) and len(images) == 3


def test_selection_at_its_default_times_the_bootstrap_beside_the_matrix_without_it(toy_cfg):
    assert run.BenchConfig.make("cpu", "tiny").selection_default_images == get_preset("tiny").synth["n_val"] == 64
    d = scaling.selection_at_default(run.selection_specs(toy_cfg, 2), 8, (64, 64), 4, torch.device("cpu"),
                                     repeats=1)
    assert d["images"] == 8 and d["models"] == 2 and d["chunks"] == 8 and d["resamples"] == 200
    assert d["seconds"] > 0 and d["seconds_without_intervals"] > 0 and d["order_and_support_seconds"] >= 0
    assert 0 <= d["support"] <= 1 and d["order"]
    text = run.table({"selection": {"growth": {}, "images": [8], "points": [], "default": d}})
    assert "selection at its default (8 images, 1+1 models)" in text and "extra time" in text


def test_report_table_lists_every_part_and_marks_gpu_settings_not_measured(evaluation):
    res = {"evaluation": evaluation,
           "settings": {"status": "not measured", "reason": "no GPU", "variants": list(run.SETTINGS)}}
    text = run.table(res)
    assert "segm: time ratio" in text and "bbox: 12 stats | per-class AP identical" in text
    assert "not measured (no GPU)" in text


def test_reference_loop_comparison_trains_the_same_weights_as_the_engine_step(toy_cfg):
    cfg = replace(toy_cfg, reference_batches=1, warmup=0, repeats=2)
    out = run.bench_reference(cfg, torch.device("cpu"))
    assert out["batches"] == 1 and out["images_per_pass"] == cfg.train.batch_size
    assert out["pkdkit"]["n"] == out["reference"]["n"] == cfg.repeats and out["target"] == 0.97
    assert math.isclose(out["ratio"], out["pkdkit"]["images_per_s"] / out["reference"]["images_per_s"])
    # the same steps on the same batches from the same weights: the same last loss, so the same settings
    assert math.isfinite(out["final_loss"]["pkdkit"]) and out["final_loss"]["pkdkit"] == out["final_loss"]["reference"]
    assert "vs torchvision's reference loop" in run.table({"reference": out})


def test_jpeg_loader_benchmark_reports_workers_per_count_decode_share_and_workers_a_gpu_needs(toy_cfg, tmp_path):
    assert loading.worker_counts(2) == (0, 1, 2) and loading.worker_counts(16) == (0, 1, 2, 4, 8, 16)
    report = Path(run.ROOT) / "reports" / "bench-cuda.json"
    student = replace(toy_cfg.student, num_classes=6)  # the synthetic data's 5 classes + background
    out = loading.bench_jpeg_loading(student, toy_cfg.train, torch.device("cpu"), n_images=4, passes=1,
                                     steps=1, workers=(0, 1), gpu_report=report, root=tmp_path)
    assert [row["num_workers"] for row in out["loader"]] == [0, 1] and len(list(tmp_path.rglob("*.jpg"))) == 4
    assert all(max(size) == 640 for size in out["image_sizes"]) and out["format"] == "jpeg"
    per_image = out["per_image"]
    assert 0 < per_image["pil_decode_s"] < per_image["item_s"] and 0 < per_image["decode_share"] < 1
    assert 0 < per_image["to_float_s"] < per_image["item_s"]
    rates = out["gpu_step"]
    assert rates["gpu"] and rates["distill"] > 0
    assert out["workers_needed"]["distill"] == math.ceil(rates["distill"] * out["item_s_for_workers"])
    assert "workers for" in run.table({"jpeg_loader": out})
