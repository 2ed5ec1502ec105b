"""`pkdkit profile`: FLOPs by torch's counter, parameters, latency in PyTorch and ONNX Runtime, on a tiny detector."""
from __future__ import annotations

import json

import torch
from torch import nn

from pkdkit.cli import main
from pkdkit.data import LabelMap
from pkdkit.models import DetectorSpec, build_detector, save_detector
from pkdkit.profile import count_flops, profile_model, sample_image

SPEC = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=32, min_size=64, max_size=64,
                    anchor_sizes=(8, 16, 32, 64, 128))
LABELS = LabelMap((1, 2), (1, 2), ("circle", "square"))


def test_flops_of_a_convolution_are_torchs_two_per_multiply_add():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert count_flops(conv, torch.rand(1, 3, 16, 20)) == 2 * 3 * 8 * 3 * 3 * 16 * 20


def test_profile_of_a_tiny_detector_and_onnx_runtime_gives_pytorchs_scores():
    torch.manual_seed(0)
    model = build_detector(SPEC).eval()
    model.score_thresh = 0.0  # detections to compare, even untrained
    p = profile_model(model, SPEC, LABELS, sample_image(64), name="tiny", threads=1, repeats=3, warmup=1)
    assert p.params == sum(t.numel() for t in model.parameters())
    assert p.flops > 0 and p.torch_cpu_ms > 0 and p.ort_cpu_ms > 0 and p.input_size == (64, 64)
    assert p.threads == 1 and not model.training
    assert p.ort_score_diff < 1e-4  # the exported model's detections score as PyTorch's do


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    path = save_detector(tmp_path / "student" / "model.pt", build_detector(SPEC), SPEC, LABELS)
    out = tmp_path / "profile.json"
    assert main(["--quiet", "profile", f"tiny={path}", "--no-onnx", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | input | params (M) | GFLOPs | PyTorch CPU ms |" in printed and "| tiny | 64x64 |" in printed
    assert "1 CPU thread(s)" in printed
    rows = json.loads(out.read_text())
    assert rows[0]["name"] == "tiny" and rows[0]["ort_cpu_ms"] is None and rows[0]["ap"] is None
    assert main(["--quiet", "profile"]) == 1 and "give MODEL checkpoints" in capsys.readouterr().err
