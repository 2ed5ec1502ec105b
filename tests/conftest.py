"""Shared fixtures: one tiny synthetic COCO-format dataset per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests start processes side by side (DDP ranks, CLI runs, notebook kernels): one OpenMP thread each, since
# oversubscribed OpenMP threads spin and make CPU training many times slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A tiny synthetic dataset: dict with train/val image dirs and annotation files."""
    from pkdkit.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("tiny_coco")
    return make_synthetic_coco(root, n_train=16, n_val=8, size=96, seed=0)


# The tiny supervised run of tests/test_engine.py: a RetinaNet-ResNet18 at 96 px, thin FPN, on `tiny_coco`.
TINY_SPEC = dict(arch="retinanet", backbone="resnet18", fpn_channels=32, min_size=96, max_size=96,
                 anchor_sizes=(8, 16, 32, 64, 128))
TINY_TRAIN = dict(epochs=3, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_iters=2,
                  grad_clip=10.0, device="cpu", progress=False)


@pytest.fixture(scope="session")
def tiny_run(tiny_coco, tmp_path_factory):
    """A finished `train_detector` run of `TINY_SPEC` for one epoch (model, evaluation, history, TensorBoard
    events): {"dir", "record", "spec", "train_ds", "val_ds", "cfg"}. Tests only read it."""
    from pkdkit.data import CocoDetection
    from pkdkit.engine import TrainConfig, train_detector
    from pkdkit.models import DetectorSpec

    train_ds = CocoDetection(tiny_coco["train_images"], tiny_coco["train_json"], train=True)
    val_ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    spec = DetectorSpec(num_classes=train_ds.label_map.num_classes, **TINY_SPEC)
    cfg = TrainConfig(**{**TINY_TRAIN, "epochs": 1})
    out = tmp_path_factory.mktemp("tiny_run")
    record = train_detector(spec, train_ds, val_ds, cfg, out)
    return {"dir": out, "record": record, "spec": spec, "train_ds": train_ds, "val_ds": val_ds, "cfg": cfg}


# ----------------------------------------------------------------------------------------------------
# The real-data path without downloads: a COCO-2017-layout folder and torchvision weight files in a
# temporary TORCH_HOME. The torch hub cache does not re-check files that are present, so files with
# torchvision's exact names and random weights of the right architectures stand in for the published ones.
COCO_WEIGHTS = ("RetinaNet_ResNet50_FPN_Weights.COCO_V1", "FCOS_ResNet50_FPN_Weights.COCO_V1",
                "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1", "ResNet18_Weights.IMAGENET1K_V1")


def write_standin_weights(torch_home, names=COCO_WEIGHTS):
    """Random weights of each named torchvision weight's architecture, saved as a state dict under
    torchvision's file name in `<torch_home>/hub/checkpoints/`. Returns {name: path}."""
    import torch
    import torchvision

    from pkdkit.models import TORCHVISION_DETECTORS

    out = {}
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        weights = torchvision.models.get_weight(name)
        torch.manual_seed(len(out))
        enum = name.split(".")[0]
        if enum in TORCHVISION_DETECTORS:
            model = TORCHVISION_DETECTORS[enum][2](weights=None, weights_backbone=None,
                                                   num_classes=len(weights.meta["categories"]))
        else:
            model = torchvision.models.get_model(enum.replace("_Weights", "").lower(), weights=None)
        out[name] = folder / weights.url.rsplit("/", 1)[1]
        torch.save(model.state_dict(), out[name])
    return out


def coco_categories():
    """COCO 2017's 80 categories with their real ids, from torchvision's weight metadata."""
    import torchvision

    names = torchvision.models.get_weight("FCOS_ResNet50_FPN_Weights.COCO_V1").meta["categories"]
    return [{"id": i, "name": n, "supercategory": "coco"} for i, n in enumerate(names) if i and n != "N/A"]


def make_coco_layout(root, n_train=6, n_val=6, size=128, categories=None, layout="coco2017"):
    """Synthetic images in the COCO 2017 layout (train2017/, val2017/, annotations/instances_*2017.json)
    whose five shape classes are relabelled as real COCO categories (person, car, dog, cup, clock, with
    COCO's ids); `categories` (a list of 5 {"id", "name"}) picks other ones. The category list holds all
    80 COCO categories, as COCO's own files do, unless `categories` is given. Returns the root."""
    import json
    import shutil

    from pkdkit.synthetic import make_synthetic_coco

    coco = {c["name"]: c for c in coco_categories()}
    used = categories or [coco[n] for n in ("person", "car", "dog", "cup", "clock")]
    listed = [dict(c) for c in (categories or coco.values())]
    paths = make_synthetic_coco(root / "_synth", n_train=n_train, n_val=n_val, size=size, seed=0)
    for split in ("train", "val"):
        d = json.loads(paths[f"{split}_json"].read_text())
        relabel = {c["id"]: used[k]["id"] for k, c in enumerate(sorted(d["categories"], key=lambda c: c["id"]))}
        for a in d["annotations"]:
            a["category_id"] = relabel[a["category_id"]]
        d["categories"] = listed
        name = f"{split}2017" if layout == "coco2017" else split
        shutil.move(str(paths[f"{split}_images"]), str(root / name))
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(d))
    shutil.rmtree(root / "_synth")
    return root


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory):
    return make_coco_layout(tmp_path_factory.mktemp("coco2017"))


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory):
    """A TORCH_HOME holding stand-in files for the coco preset's torchvision weights."""
    home = tmp_path_factory.mktemp("torch_home")
    write_standin_weights(home)
    return home


@pytest.fixture
def use_torch_home(torch_home, monkeypatch):
    """Point torch.hub at the stand-in TORCH_HOME for this test (torch.hub reads the variable on each use)."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


# ----------------------------------------------------------------------------------------------------
# A real headless browser: Debian's chromium driven by Playwright (whose own browser download is not used).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser_page():
    """A Playwright page in headless chromium (skipped, with the reason, where playwright or chromium is
    missing: `make install` installs chromium where apt-get and root are available)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # a new empty profile
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            yield page
        finally:
            browser.close()


def free_port() -> int:
    """A TCP port nothing listens on now, on localhost."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keeps_forward_outputs(model) -> bool:
    """Whether something keeps a detector's transformed batch or FPN features alive after its transform and
    backbone ran on an image, as a forward hook left behind by a `pkdkit.features.FeatureTap` does (torch lists
    no hooks publicly: this checks what a left-over tap would do). Runs in eval mode; each module's mode is put
    back."""
    import gc
    import weakref

    import torch

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            images = model.transform([torch.rand(3, 64, 64)])[0]
            outputs = [weakref.ref(images), weakref.ref(model.backbone(images.tensors))]
            del images
    finally:
        for m, training in modes:
            m.training = training
    gc.collect()
    return any(ref() is not None for ref in outputs)


# ----------------------------------------------------------------------------------------------------
# TensorBoard event files, read back with tensorboard's own reader
def tb_scalars(folder, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar in the event files of `folder`, read by tensorboard's own reader."""
    return [(e.step, e.value) for e in _events(folder).Scalars(tag)]


def tb_tags(folder) -> dict[str, list[str]]:
    """The tags of each kind ("scalars", "tensors" (text), ...) in the TensorBoard event files of `folder`."""
    return _events(folder).Tags()


def tb_texts(folder, tag: str) -> list[tuple[int, str]]:
    """(step, text) of a TensorBoard text summary (kept as a string tensor, tagged `<tag>/text_summary`)."""
    events = _events(folder)
    name = f"{tag}/text_summary"
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(name)] \
        if name in events.Tags()["tensors"] else []


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def screenshot_dir():
    """Where browser tests leave their screenshots for a person to look at: $PKDKIT_SCREENSHOTS, else not kept."""
    from pathlib import Path

    folder = os.environ.get("PKDKIT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) if folder else None
