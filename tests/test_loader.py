"""Loader settings (worker processes, persistent workers, pinned memory, prefetch): they change speed, never
the batches or the trained weights."""
from __future__ import annotations

import os

import pytest
import torch

from pkdkit.data import CocoDetection, make_loader
from pkdkit.distill import build_distiller
from pkdkit.engine import TrainConfig, train
from pkdkit.models import DetectorSpec, build_detector


def _epoch_batches(loader, epochs: int) -> list[list[tuple[list, list[dict]]]]:
    """Each epoch's batches, the sampler's epoch set before each."""
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.append(list(loader))
    return out


def _epochs(loader, epochs: int) -> list[tuple[list[torch.Tensor], list[dict]]]:
    return [batch for batches in _epoch_batches(loader, epochs) for batch in batches]


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


class _WorkerPids(torch.utils.data.Dataset):
    """Item i is (the process id of the worker that loaded it, {}): which processes loaded an epoch."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return os.getpid(), {}


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_load_every_epoch_in_the_same_processes(persistent):
    loader = make_loader(_WorkerPids(), 2, shuffle=True, num_workers=2, persistent_workers=persistent)
    pids = [{pid for images, _ in batches for pid in images} for batches in _epoch_batches(loader, epochs=2)]
    assert all(len(p) == 2 and os.getpid() not in p for p in pids), pids  # two worker processes each epoch
    assert pids[1] == pids[0] if persistent else pids[1].isdisjoint(pids[0]), pids  # kept, or started anew


def test_worker_settings_without_workers_say_what_is_wrong(tiny_coco):
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"])
    with pytest.raises(ValueError, match="persistent_workers and prefetch_factor need loader worker processes"):
        make_loader(ds, 4, shuffle=False, persistent_workers=True)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        make_loader(ds, 4, shuffle=False, num_workers=-1)
    assert make_loader(ds, 4, shuffle=False, num_workers=1, pin_memory=True).pin_memory


SPEC = dict(arch="fcos", backbone="resnet18", fpn_channels=32, min_size=64, max_size=64,
            anchor_sizes=(8, 16, 32, 64, 128))
CFG = TrainConfig(epochs=2, batch_size=8, optimizer="adamw", lr=1e-3, warmup_iters=1, device="cpu", progress=False)


def _trained(model, ds, cfg: TrainConfig, out) -> dict[str, torch.Tensor]:
    train(model, ds, cfg, out)
    return model.state_dict()


def _assert_same_weights(weights: list[dict[str, torch.Tensor]]) -> None:
    assert all(torch.equal(w[k], weights[0][k]) for w in weights[1:] for k in weights[0])


def test_training_with_0_1_or_2_workers_fresh_or_persistent_gives_bit_identical_weights(tiny_coco, tmp_path):
    """Flips come from (seed, epoch, image index) (`pkdkit.data.ItemKey`), whichever process loads the image."""
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    spec = DetectorSpec(num_classes=ds.label_map.num_classes, **SPEC)
    weights = []
    for name, settings in (("0", dict(num_workers=0)), ("1", dict(num_workers=1, persistent_workers=False)),
                           ("2", dict(num_workers=2, persistent_workers=True, prefetch_factor=1, pin_memory=False))):
        torch.manual_seed(0)
        weights.append(_trained(build_detector(spec), ds, CFG.replace(**settings), tmp_path / name))
    _assert_same_weights(weights)


def test_distilling_with_mgd_gives_the_same_weights_with_0_or_2_workers(tiny_coco, tmp_path):
    """MGD's masks come from the distiller's generator, seeded per step (`engine.step_seed`), not from the global
    RNG the loader's flips used to share."""
    ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    spec = DetectorSpec(num_classes=ds.label_map.num_classes, **SPEC)
    weights = []
    for workers in (0, 2):
        torch.manual_seed(0)
        distiller = build_distiller(build_detector(spec), build_detector(spec), "mgd", levels=["p3", "p4"])
        assert all(loss.generator is distiller.generator for loss in distiller.losses.values())
        weights.append(_trained(distiller, ds, CFG.replace(epochs=1, num_workers=workers), tmp_path / str(workers)))
    _assert_same_weights(weights)
