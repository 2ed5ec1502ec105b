"""Trials behind the CPU presets (reports/cpu-designs.md): how far the student is from converged, how strong a
teacher gets, for a given recipe, data size and image size. Each trial trains with pkdkit's own
`train_detector` on the synthetic shapes data and prints COCO box AP; finished trials are reused (their
folders under --out), so a table can be re-printed or extended cheaply.

    python bench/cpu_designs.py student --size 96 --train-images 64 --epochs 16 --set batch_size=4
    python bench/cpu_designs.py teacher --backbone resnet34 --train-images 192 --epochs 10 --set batch_size=4

`student` trains the ResNet-18 baseline for E and 2E epochs (the gain from E to 2E is what an equal-budget
control would add); `teacher` trains one candidate teacher. One thread, as the demo's kernels run.
"""
from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

import torch

from pkdkit.engine import TrainConfig, train_detector
from pkdkit.models import DetectorSpec
from pkdkit.data import DataConfig
from pkdkit.presets import get_preset
from pkdkit.synthetic import make_synthetic_coco


def synthetic(out: Path, size: int, n_train: int, n_val: int) -> DataConfig:
    root = out / f"data_{size}px_{n_train}_{n_val}"
    if not (root / "annotations" / "instances_val.json").exists():
        make_synthetic_coco(root, n_train=n_train, n_val=n_val, size=size, seed=0, overwrite=True)
    return DataConfig.from_root(root)


def trial(spec: DetectorSpec, data: DataConfig, cfg: TrainConfig, out: Path) -> float:
    """Train (or reuse) one detector; prints and returns its COCO box AP in %."""
    tic = time.time()
    train_ds = data.train_dataset()
    record = train_detector(spec, train_ds, data.val_dataset(), cfg, out)
    ap = 100 * record.ap
    print(f"{out.name}: {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}: AP {ap:.2f} "
          f"({time.time() - tic:.0f} s)", flush=True)
    return ap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=("student", "teacher"))
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=96, help="image size (px)")
    ap.add_argument("--train-images", type=int, default=64)
    ap.add_argument("--val-images", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig fields over tiny's")
    ap.add_argument("--out", type=Path, default=Path("runs/cpu_designs"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    tiny = get_preset("tiny", image_size=args.size)
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = tiny.train.replace(seed=args.seed, progress=False, **overrides)
    data = synthetic(args.out, args.size, args.train_images, args.val_images)
    spec = DetectorSpec(**{**tiny.student.to_dict(), "backbone": args.backbone,
                           "num_classes": data.val_dataset().label_map.num_classes})
    tag = "_".join([args.role, args.backbone, f"{args.size}px", f"n{args.train_images}", f"s{args.seed}",
                    *(s.replace("=", "") for s in args.set)])
    if args.role == "teacher":
        trial(spec, data, cfg.replace(epochs=args.epochs), args.out / f"{tag}_e{args.epochs}")
        return
    short = trial(spec, data, cfg.replace(epochs=args.epochs), args.out / f"{tag}_e{args.epochs}")
    long = trial(spec, data, cfg.replace(epochs=2 * args.epochs), args.out / f"{tag}_e{2 * args.epochs}")
    print(f"student {tag}: E={args.epochs} AP {short:.2f}, 2E AP {long:.2f}, gain {long - short:+.2f}")


if __name__ == "__main__":
    main()
