"""What the CPU test suite cannot run: pkdkit's training, staged distillation and resume on a CUDA device.

    PYTHONUNBUFFERED=1 python bench/cuda_check.py --out reports/cuda_check.json

Checks, each printed with its numbers and written to `--out` with the machine's description:
- MGD's random mask: the same step seed gives the same mask for features on the CPU and on CUDA
  (`MGDLoss.keep_mask` draws on the CPU, from the generator a Distiller seeds per step), and the loss of the same weights on both devices agrees (float32, TF32 off).
- The pipeline on CUDA with mixed precision: synthetic data at the tiny preset's size, a teacher and the baseline
  trained with `train_detector`, then a one-stage plan (paper protocol: initial weights + the teacher's
  neck/head, loss weight calibrated) with `run_plan`; each reports COCO box AP from pycocotools.
- Resume: the plan run a second time finds its stage finished and trains nothing (same record).
A failed check raises; the exit status is non-zero.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pkdkit.data import DataConfig
from pkdkit.engine import step_seed, train_detector
from pkdkit.evaluate import EvalRecord
from pkdkit.losses import MGDLoss
from pkdkit.plan import Plan, Stage, run_plan
from pkdkit.presets import get_preset
from pkdkit.synthetic import make_synthetic_coco


def check_mgd(device: torch.device) -> dict:
    loss = MGDLoss(32, 32, alpha_mgd=1e-3)
    loss.generator = torch.Generator()  # as in training: a Distiller's generator, seeded per step
    feats = torch.randn(2, 32, 10, 10), torch.randn(2, 32, 10, 10)
    loss.generator.manual_seed(step_seed(0, 0))
    mask_cpu = loss.keep_mask(feats[0])
    value_cpu = loss(*feats).item()
    loss.to(device)
    loss.generator.manual_seed(step_seed(0, 0))
    mask_dev = loss.keep_mask(feats[0].to(device))
    value_dev = loss(feats[0].to(device), feats[1].to(device)).item()
    same = torch.equal(mask_cpu, mask_dev.cpu())
    rel = abs(value_cpu - value_dev) / abs(value_cpu)
    print(f"MGD mask CPU == {device.type}: {same}; loss CPU {value_cpu:.6g}, {device.type} {value_dev:.6g} "
          f"(relative difference {rel:.1e})")
    assert same and rel < 1e-4, "MGD differs between CPU and CUDA"
    return {"mask_equal": same, "loss_cpu": value_cpu, "loss_device": value_dev, "relative_difference": rel}


def check_pipeline(work: Path, device: str, epochs: int) -> dict:
    tiny = get_preset("tiny")
    make_synthetic_coco(work / "data", n_train=64, n_val=32, size=tiny.student.min_size, seed=0)
    data = DataConfig.from_root(work / "data")
    n_classes = data.val_dataset().label_map.num_classes
    cfg = tiny.train.replace(device=device, epochs=epochs, progress=False)  # amp is on by default (CUDA only)
    out: dict = {}
    specs = {"teacher": tiny.teachers["fcos_r50"], "student": tiny.student}
    for name, spec in specs.items():
        tic = time.time()
        record = train_detector(replace(spec, num_classes=n_classes), data.train_dataset(), data.val_dataset(),
                                cfg, work / name)
        out[name] = {"AP": record.ap, "seconds": round(time.time() - tic, 1)}
        print(f"{name} ({spec.backbone}), {epochs} epochs on {device}: AP {100 * out[name]['AP']:.2f} "
              f"({out[name]['seconds']} s)")
    plan = Plan(name="one_shot", student=replace(tiny.student, num_classes=n_classes), data=data, train=cfg,
                out_dir=str(work / "plan"),
                stages=[Stage(name="teacher", teacher=str(work / "teacher" / "model.pt"), loss_weight="auto")])
    tic = time.time()
    run_plan(plan, progress=False)
    first = plan.stage_record(0).read_text()
    seconds = round(time.time() - tic, 1)
    tic = time.time()
    run_plan(plan, progress=False)  # finished: nothing is trained again
    again = round(time.time() - tic, 1)
    record = EvalRecord.read(plan.stage_record(0))
    stage = record.config["stage"]
    out["plan"] = {"AP": record.ap, "seconds": seconds, "rerun_seconds": again,
                   "loss_weight": stage["loss_weight_used"], "budget": record.budget,
                   "inherited_tensors": len((stage["inherited"] or {}).get("copied", []))}
    print(f"one-stage plan on {device}: AP {100 * out['plan']['AP']:.2f} ({seconds} s), calibrated weight "
          f"{out['plan']['loss_weight']}, inherited {out['plan']['inherited_tensors']} tensors; re-run {again} s")
    assert plan.stage_record(0).read_text() == first, "a finished plan was trained again"
    assert again < seconds / 2, "re-running a finished plan took as long as training it"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/cuda_check.json"))
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_check: no CUDA device here")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    result = {"machine": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                          "python": platform.python_version()}}
    result["mgd"] = check_mgd(device)
    work = Path(tempfile.mkdtemp(prefix="pkdkit_cuda_"))
    try:
        result["pipeline"] = check_pipeline(work, "cuda", args.epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"all checks passed; written to {args.out}")


if __name__ == "__main__":
    main()
