"""Every preset describes models that build and fit together (the GPU presets cannot train in CI)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pkdkit.features import common_levels, feature_levels
from pkdkit.models import DetectorSpec, build_detector, torchvision_label_map
from pkdkit.presets import PRESETS, get_preset
from pkdkit.synthetic import CATEGORIES

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_student_and_teachers_share_levels_and_label_space(name):
    preset = get_preset(name)
    student = build_detector(replace(preset.student, backbone_weights=None))  # no downloads here
    levels = feature_levels(student, size=64)
    for teacher in preset.teachers.values():
        if isinstance(teacher, str):  # torchvision COCO weights: same label space as the student
            assert torchvision_label_map(teacher).num_classes == preset.student.num_classes
            continue
        assert teacher.num_classes == preset.student.num_classes
        assert (teacher.min_size, teacher.max_size) == (preset.student.min_size, preset.student.max_size)
        t_levels = feature_levels(build_detector(teacher), size=64)
        assert common_levels({"student": levels, "teacher": t_levels}) == list(levels)
    if preset.synth is not None:
        assert preset.student.num_classes == len(CATEGORIES) + 1
    assert preset.train.epochs >= 1 and preset.distill.epochs >= 1

def test_a_preset_student_takes_a_training_step_at_its_image_size():
    spec = get_preset("small").student
    model = build_detector(spec)
    size = spec.min_size
    images = [torch.rand(3, size, size)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]), "labels": torch.tensor([1])}]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())

def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; available: \['coco', 'small', 'tiny'\]"):
        get_preset("huge")
    assert isinstance(get_preset("tiny", calibration_images=8).student, DetectorSpec)
