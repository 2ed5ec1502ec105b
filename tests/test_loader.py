"""Loader settings (worker processes, persistent workers, pinned memory, prefetch): they change speed, never
the batches or the trained weights."""
from __future__ import annotations

import pytest
import torch

from pkdkit.data import CocoDetection, make_loader
from pkdkit.engine import TrainConfig, train
from pkdkit.models import DetectorSpec, build_detector


def _epochs(loader, epochs: int) -> list[tuple[list[torch.Tensor], list[dict]]]:
    batches = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        batches += list(loader)
    return batches


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(images_a, images_b))
        for ta, tb in zip(targets_a, targets_b):
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_persistent_workers_flip_the_same_images_as_fresh_workers_in_every_epoch(tiny_coco):
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True, masks=True)
    fresh = _epochs(make_loader(ds, 4, shuffle=True, seed=3, num_workers=2), epochs=3)
    kept = make_loader(ds, 4, shuffle=True, seed=3, num_workers=2, persistent_workers=True, prefetch_factor=1)
    persistent = _epochs(kept, epochs=3)

    _assert_same_batches(persistent, fresh)  # fresh workers are seeded anew every epoch: so were the kept ones
    assert kept._iterator is not None and kept._iterator._persistent_workers  # the same workers all along


def test_worker_settings_without_workers_say_what_is_wrong(tiny_coco):
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"])
    with pytest.raises(ValueError, match="persistent_workers and prefetch_factor need loader worker processes"):
        make_loader(ds, 4, shuffle=False, persistent_workers=True)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        make_loader(ds, 4, shuffle=False, num_workers=-1)
    assert make_loader(ds, 4, shuffle=False, num_workers=1, pin_memory=True).pin_memory


def test_training_with_persistent_prefetching_workers_gives_the_same_weights(tiny_coco, tmp_path):
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    spec = DetectorSpec(arch="fcos", backbone="resnet18", num_classes=ds.label_map.num_classes, fpn_channels=32,
                        min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128))
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="adamw", lr=1e-3, warmup_iters=1, device="cpu",
                      progress=False, num_workers=1)
    weights = []
    for name, settings in (("fresh", {}), ("persistent", dict(persistent_workers=True, prefetch_factor=1,
                                                                pin_memory=False))):
        torch.manual_seed(0)
        model = build_detector(spec)
        train(model, ds, cfg.replace(**settings), tmp_path / name)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
