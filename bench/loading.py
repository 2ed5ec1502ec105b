"""Does data loading keep up with training? The loader's images per second (PNG decode, targets, masks,
random flips: `pkdkit.data.CocoDetection` through `pkdkit.data.make_loader`) against the training step's,
on a preset's own synthetic data, student and batch size.

Three figures per preset, measured in one process one after the other:
- ``loader``: images/s of full passes over the data with 0, 1 and 2 worker processes (persistent workers,
  so that start-up is paid once; pinned memory on CUDA), the batches taken and dropped. With workers, the
  first pass (start-up included) is reported apart.
- ``step``: images/s of the student's training step (`timing.TrainStep`, the engine's step) on one batch
  of that data, already in memory.
- ``fed``: images/s of the same steps taking their batches from the loader (0 and 1 workers), as
  `engine.train` does; ``fed / step`` near 1 means the loader is not the bottleneck.
The target is ``loader / step >= 3`` with the workers the machine can spare.

`bench_jpeg_loading` measures the loader on COCO-like data instead (`pkdkit synth --size coco --format jpeg`:
JPEGs of ~640 x 480, many-vertex masks): images/s per worker count (0, 1, 2, 4, ... up to the CPUs), the
student's training step on that data, the per-image cost split into JPEG decode and the rest, and the workers a
GPU's step rate needs: ceil(GPU images/s x seconds per image in one process).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from timing import TrainStep, sync

from pkdkit.data import CocoDetection, make_loader, to_tensor_image
from pkdkit.models import build_detector
from pkdkit.presets import get_preset
from pkdkit.synthetic import make_synthetic_coco

TARGET = 3.0


def preset_dataset(preset_name: str, root: str | Path, n_images: int) -> CocoDetection:
    """`n_images` training images of the preset's synthetic data (its size and seed), with masks and flips."""
    synth = get_preset(preset_name).synth
    if synth is None:
        raise ValueError(f"preset {preset_name!r} has no synthetic data to benchmark the loader on")
    paths = make_synthetic_coco(root, n_train=n_images, n_val=0, size=synth["size"], seed=synth["seed"])
    return CocoDetection(paths["train_images"], paths["train_json"], train=True, masks=True)


def loader_images_per_s(dataset: CocoDetection, batch_size: int, num_workers: int, passes: int,
                        device: torch.device) -> dict[str, Any]:
    """Images/s over `passes` full passes (after one untimed first pass that starts the workers); each batch
    is moved to `device` as the engine moves it (non-blocking, from pinned memory on CUDA)."""
    loader = make_loader(dataset, batch_size, shuffle=True, seed=0, num_workers=num_workers,
                         persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")

    def one_pass(epoch: int) -> float:
        loader.sampler.set_epoch(epoch)
        tic = time.perf_counter()
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        sync(device)
        return time.perf_counter() - tic

    first = one_pass(0)
    times = [one_pass(epoch) for epoch in range(1, passes + 1)]
    n = len(dataset)
    return {"num_workers": num_workers, "images_per_s": n / statistics.median(times),
            "first_pass_images_per_s": n / first, "passes": passes, "images_per_pass": n}


def bench_loading(preset_name: str, device: torch.device, *, n_images: int, passes: int, steps: int,
                  workers: tuple[int, ...] = (0, 1, 2), fed_workers: tuple[int, ...] = (0, 1),
                  root: str | Path | None = None) -> dict[str, Any]:
    """The loader's and the training step's images/s on preset `preset_name` (see the module docstring)."""
    preset = get_preset(preset_name)
    batch_size = preset.train.batch_size
    with tempfile.TemporaryDirectory() if root is None else contextlib.nullcontext(root) as tmp:
        dataset = preset_dataset(preset_name, tmp, n_images)
        out: dict[str, Any] = {"preset": preset_name, "images": n_images, "image_size": preset.synth["size"],
                               "batch_size": batch_size, "student": preset.student.name, "masks": True,
                               "loader": [loader_images_per_s(dataset, batch_size, w, passes, device)
                                          for w in workers]}
        model, out["step"] = _step_rate(preset.student, dataset, preset.train, batch_size, steps, device)
        out["fed"] = [_fed_steps(model, dataset, preset.train, device, steps, w) for w in fed_workers]
    step_rate = out["step"]["images_per_s"]
    for row in out["loader"] + out["fed"]:
        row["ratio_to_step"] = row["images_per_s"] / step_rate
    out["target"] = TARGET
    return out


def _fed_steps(model: torch.nn.Module, dataset: CocoDetection, train: Any, device: torch.device,
               steps: int, num_workers: int) -> dict[str, Any]:
    """Training steps whose batches come from the loader (persistent workers if any), as in `engine.train`."""
    loader = make_loader(dataset, train.batch_size, shuffle=True, seed=1, num_workers=num_workers,
                         persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")
    step = TrainStep(model, [], [], train, device)

    def batches():
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()

    def next_step() -> None:
        images, targets = next(it)
        step.images = [im.to(device, non_blocking=True) for im in images]
        step.targets = [{k: v.to(device, non_blocking=True) for k, v in t.items() if k != "masks"}
                        for t in targets]
        step()

    next_step()  # warm-up: starts the worker
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        next_step()
    sync(device)
    return {"images_per_s": steps * train.batch_size / (time.perf_counter() - tic), "steps": steps,
            "num_workers": num_workers}



# ----------------------------------------------------------------------------------------------------
# The loader on COCO-like JPEGs (`pkdkit synth --size coco --format jpeg`)
def jpeg_dataset(root: str | Path, n_images: int, seed: int = 0) -> CocoDetection:
    """`n_images` JPEG training images at COCO's sizes (~640 x 480) with many-vertex masks, loaded as training
    loads them (masks, random flips)."""
    paths = make_synthetic_coco(root, n_train=n_images, n_val=0, size="coco", seed=seed, image_format="jpeg")
    return CocoDetection(paths["train_images"], paths["train_json"], train=True, masks=True)


def worker_counts(cpus: int | None = None) -> tuple[int, ...]:
    """0, 1, 2, 4, ... up to the CPUs this process may use, and that number itself."""
    cpus = cpus or len(os.sched_getaffinity(0))
    counts = [0] + [2**k for k in range(cpus.bit_length()) if 2**k < cpus] + [cpus]
    return tuple(counts)


def per_image_costs(dataset: CocoDetection, passes: int = 2) -> dict[str, Any]:
    """Seconds per image, in this process, of the whole `dataset[i]` (decode, float conversion, targets, masks,
    flip), of its JPEG decode alone (PIL, as `CocoDetection` decodes), of the decoded image's conversion to a
    float tensor (`pkdkit.data.to_tensor_image`; both would move to the GPU with a GPU decode, the masks and the
    rest would not), and of `torchvision.io.decode_jpeg` on the CPU (libjpeg-turbo to uint8, the API whose
    ``device="cuda"`` decodes on the GPU). Medians over passes."""
    from PIL import Image

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's: measured anyway
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg, read_file

    files = [dataset.image_dir / dataset.coco.imgs[i]["file_name"] for i in dataset.ids]

    def seconds(fn) -> float:
        times = []
        for _ in range(passes):
            tic = time.perf_counter()
            for k in range(len(dataset)):
                fn(k)
            times.append((time.perf_counter() - tic) / len(dataset))
        return statistics.median(times)

    def pil_decode(k: int) -> Image.Image:
        with Image.open(files[k]) as img:
            img.load()
        return img

    whole = seconds(lambda k: dataset[k])
    decode = seconds(pil_decode)
    decoded = [pil_decode(k) for k in range(len(dataset))]
    to_float = seconds(lambda k: to_tensor_image(decoded[k]))
    tv_decode = seconds(lambda k: decode_jpeg(read_file(str(files[k]))))
    return {"item_s": whole, "pil_decode_s": decode, "decode_share": decode / whole, "to_float_s": to_float,
            "to_float_share": to_float / whole, "torchvision_decode_jpeg_cpu_s": tv_decode,
            "rest_s": whole - decode - to_float, "passes": passes}


def gpu_step_rates(path: Path) -> dict[str, Any] | None:
    """The GPU's training-step images/s from a `bench/run.py --device cuda` report (None if there is none)."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    rates = report.get("distill_step", {}).get("images_per_s")
    if not rates:
        return None
    return {"source": path.name, "gpu": report.get("machine", {}).get("gpu"),
            "batch_size": report.get("config", {}).get("train", {}).get("batch_size"),
            "distill": rates["distill"], "student": rates["student"]}


def workers_needed(step_images_per_s: float, item_s: float) -> int:
    """Loader worker processes that keep up with `step_images_per_s` when each image costs one worker `item_s`
    seconds (each worker a core of its own): ceil(rate x cost)."""
    return max(1, math.ceil(step_images_per_s * item_s))


def bench_jpeg_loading(student: Any, train: Any, device: torch.device, *, n_images: int, passes: int, steps: int,
                       workers: tuple[int, ...] | None = None, gpu_report: Path | None = None,
                       root: str | Path | None = None) -> dict[str, Any]:
    """The loader's images/s per worker count on COCO-like JPEGs, beside the training step's images/s of
    `student` (a DetectorSpec) on a batch of them, the per-image cost split into JPEG decode and the rest, and
    the workers a GPU's step rate needs: the step measured here on CUDA, else the rates of `gpu_report`."""
    workers = workers if workers is not None else worker_counts()
    with tempfile.TemporaryDirectory() if root is None else contextlib.nullcontext(root) as tmp:
        dataset = jpeg_dataset(tmp, n_images)
        sizes = {(dataset.coco.imgs[i]["width"], dataset.coco.imgs[i]["height"]) for i in dataset.ids}
        out: dict[str, Any] = {"images": n_images, "image_sizes": sorted(sizes), "format": "jpeg",
                               "batch_size": train.batch_size, "student": student.name, "masks": True,
                               "cpus": len(os.sched_getaffinity(0)),
                               "loader": [loader_images_per_s(dataset, train.batch_size, w, passes, device)
                                          for w in workers],
                               "per_image": per_image_costs(dataset)}
        _, out["step"] = _step_rate(student, dataset, train, train.batch_size, steps, device)
        out["step"]["device"] = str(device)
    for row in out["loader"]:
        row["ratio_to_step"] = row["images_per_s"] / out["step"]["images_per_s"]
    item_s = 1 / out["loader"][0]["images_per_s"] if out["loader"][0]["num_workers"] == 0 else \
        out["per_image"]["item_s"]
    out["item_s_for_workers"] = item_s
    if device.type == "cuda":
        rates = {"source": "measured here", "gpu": torch.cuda.get_device_name(device),
                 "batch_size": train.batch_size, "student": out["step"]["images_per_s"]}
    else:
        rates = gpu_step_rates(gpu_report) if gpu_report is not None else None
    if rates is not None:
        out["gpu_step"] = rates
        out["workers_needed"] = {name: workers_needed(rates[name], item_s)
                                 for name in ("distill", "student") if name in rates}
    return out


def _step_rate(spec: Any, dataset: Any, train: Any, batch_size: int, steps: int,
               device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, {"images_per_s", "steps"}): the engine's training step of a fresh `spec` detector on one batch of
    `dataset` (masks left out), repeated `steps` times after a warm-up."""
    torch.manual_seed(0)
    model = build_detector(spec).to(device).train()
    images, targets = next(iter(make_loader(dataset, batch_size, shuffle=True, seed=0)))
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items() if k != "masks"} for t in targets]
    step = TrainStep(model, images, targets, train, device)
    step()  # warm-up
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return model, {"images_per_s": steps * batch_size / (time.perf_counter() - tic), "steps": steps}
