"""`pkdkit synth | train | evaluate | select | distill | notebooks | export` — thin argparse wrappers over the library."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pkdkit.engine import TrainConfig

if TYPE_CHECKING:
    from pkdkit.plan import DataConfig


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset root in the synthetic/COCO layout (train/, val/, annotations/)")
    p.add_argument("--train-json"), p.add_argument("--train-images")
    p.add_argument("--val-json"), p.add_argument("--val-images")
    p.add_argument("--masks", action="store_true", help="load instance masks (Mask R-CNN)")
    p.add_argument("--labels", default="contiguous", choices=["contiguous", "identity"],
                   help="category id -> label: 1..K, or label == category id (torchvision COCO models)")


def _data_config(args: argparse.Namespace) -> DataConfig:
    from pkdkit.plan import DataConfig

    if args.data:
        cfg = DataConfig.from_root(args.data, masks=args.masks)
        cfg.labels = args.labels
        return cfg
    given = [args.train_json, args.train_images, args.val_json, args.val_images]
    if not all(given):
        raise SystemExit("give --data ROOT, or all of --train-json --train-images --val-json --val-images")
    return DataConfig(args.train_images, args.train_json, args.val_images, args.val_json, args.masks, args.labels)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "progress":
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                           help=f"true/false (default {default})")
        elif isinstance(default, tuple):
            p.add_argument(flag, type=float, nargs="+", default=None, help=f"default {list(default)}")
        else:
            kind = type(default) if default is not None else float
            p.add_argument(flag, type=kind, default=None, help=f"default {default}")


def _train_config(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    base = base or TrainConfig()
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name != "progress" and getattr(args, f.name, None) is not None}
    return base.replace(**given, progress=not args.quiet)


def cmd_synth(args: argparse.Namespace) -> int:
    from pkdkit.synthetic import make_synthetic_coco

    paths = make_synthetic_coco(args.out, n_train=args.train, n_val=args.val, size=args.size, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pkdkit.engine import train_detector
    from pkdkit.evaluate import comparison_table
    from pkdkit.models import DetectorSpec
    from pkdkit.presets import get_preset

    data = _data_config(args)
    train_ds, val_ds = data.train_dataset(), data.val_dataset()
    preset = get_preset(args.preset) if args.preset else None
    spec_fields = {f.name for f in fields(DetectorSpec)}
    spec_args = {k: v for k, v in vars(args).items() if k in spec_fields and v is not None}
    base = preset.student.to_dict() if preset else {}
    spec = DetectorSpec.from_dict({**base, **spec_args, "num_classes": args.num_classes or train_ds.label_map.num_classes})
    cfg = _train_config(args, preset.train if preset else None)
    record = train_detector(spec, train_ds, val_ds, cfg, args.out)
    if record:
        print(f"\n{spec.name} on {data.val_json}\n{comparison_table({spec.name: record})}")
        print(f"checkpoint: {Path(args.out) / 'model.pt'}\nmetrics: {Path(args.out) / 'eval.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pkdkit.engine import resolve_device
    from pkdkit.evaluate import comparison_table, evaluate_detector
    from pkdkit.models import load_detector

    data = _data_config(args)
    rows = {}
    for ckpt in args.checkpoints:
        model, spec, label_map, payload = load_detector(ckpt)
        ds = data.val_dataset(label_map if args.labels == "identity" else None)
        name = Path(ckpt).parent.name or spec.name
        rows[name] = evaluate_detector(model, ds, label_map, out_dir=args.out, name=name,
                                       device=resolve_device(args.device), config=payload.get("config"),
                                       progress=not args.quiet)
    print(comparison_table(rows))
    if args.out:
        print(f"metrics and COCO results written to {args.out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from pkdkit.plan import load_plan, run_plan

    plan = load_plan(args.plan)
    if args.device:
        plan.train = plan.train.replace(device=args.device)
    run_plan(plan, progress=not args.quiet)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from pkdkit.selection import run_selection

    teachers = dict(_name_eq_path(t) for t in args.teachers)
    aps = dict((k, float(v)) for k, v in (_name_eq_path(a) for a in args.ap)) if args.ap else None
    data = _data_config(args)
    selection = run_selection(args.student, teachers, data.val_dataset(), args.out, n_images=args.images,
                              strategy=args.strategy, method=args.method, device=args.device, aps=aps)
    print(selection.explanation)
    print(f"selection written to {Path(args.out) / 'selection.json'}")
    if args.plan:
        from pkdkit.plan import plan_from_selection, save_plan

        plan = plan_from_selection(selection, teachers, args.student, data, Path(args.out) / "distill",
                                   loss=args.loss, fine_tune=args.fine_tune)
        print(f"distillation plan written to {save_plan(plan, args.plan)}; run it with: pkdkit distill {args.plan}")
    return 0


def _name_eq_path(s: str) -> tuple[str, str]:
    if "=" not in s:
        return Path(s).parent.name or Path(s).stem, s
    name, value = s.split("=", 1)
    return name, value


def cmd_notebooks(args: argparse.Namespace) -> int:
    import yaml

    from pkdkit.notebooks import NotebookRunError, run_experiment, run_notebooks

    params = {k: yaml.safe_load(v) for k, v in (_name_eq_path(p) for p in args.param)}
    try:
        if args.action == "run":
            summary = run_notebooks(args.preset, args.out, run_dir=args.run_dir, device=args.device,
                                    parameters=params, only=args.only, threads=args.threads)
            print(f"executed notebooks, figures and metrics.json are in {summary['out']}")
        else:
            summary = run_experiment(args.preset, args.seeds, args.out, run_root=args.run_root, device=args.device,
                                     parameters=params, threads=args.threads)
            print(f"per-seed reports and the seed study (experiment.json, figures/) are in {summary['out']}")
    except NotebookRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pkdkit.models import ExportError, export_model

    try:
        path = export_model(args.checkpoint, args.format, args.out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.format} export of {args.checkpoint}: {path} (spec, label map"
          f"{' and the torchvision code that builds it' if args.format == 'torchvision' else ''}: {path}.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pkdkit", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic COCO-format shapes dataset")
    p.add_argument("--out", required=True), p.add_argument("--train", type=int, default=64)
    p.add_argument("--val", type=int, default=16), p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="supervised training of one detector (teachers, baseline student)")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run folder (re-running resumes)")
    p.add_argument("--preset", choices=["tiny", "small", "coco"], help="start from the preset's student/training")
    p.add_argument("--arch"), p.add_argument("--backbone"), p.add_argument("--num-classes", type=int)
    p.add_argument("--fpn-channels", type=int), p.add_argument("--min-size", type=int), p.add_argument("--max-size", type=int)
    p.add_argument("--anchor-sizes", type=int, nargs="+"), p.add_argument("--weights"), p.add_argument("--backbone-weights")
    p.add_argument("--trainable-layers", type=int)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="COCO evaluation of checkpoints on the validation set")
    _add_data_args(p)
    p.add_argument("checkpoints", nargs="+"), p.add_argument("--out"), p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("select", help="adaptation costs between student and teachers, and the teacher order")
    _add_data_args(p)
    p.add_argument("--student", required=True, help="student checkpoint")
    p.add_argument("--teachers", nargs="+", required=True,
                   help="NAME=CHECKPOINT or NAME=TORCHVISION_WEIGHTS (e.g. fcos=FCOS_ResNet50_FPN_Weights.COCO_V1)")
    p.add_argument("--ap", nargs="*", help="NAME=AP of teachers (for the by-AP order and the final teacher)")
    p.add_argument("--out", required=True), p.add_argument("--images", type=int, default=64)
    p.add_argument("--strategy", default="minimax"), p.add_argument("--method", default="closed_form")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plan", help="also write a distillation plan (YAML) through the selected order")
    p.add_argument("--loss", default="mgd", help="distillation loss of that plan's stages")
    p.add_argument("--fine-tune", action="store_true",
                   help="that plan starts from the student checkpoint's trained weights (default: the paper's "
                        "protocol, the student's initial weights plus the first teacher's neck and head)")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("distill", help="run a distillation plan (YAML/JSON): stages, hand-over, evaluation")
    p.add_argument("plan"), p.add_argument("--device")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="a deployable student: a torchvision state dict or an ONNX file")
    p.add_argument("checkpoint", help="a pkdkit checkpoint (e.g. distill/<plan>/stage_<k>_<name>/student.pt)")
    p.add_argument("--format", choices=["torchvision", "onnx"], default="torchvision",
                   help="torchvision: plain state dict + <out>.json with the code that builds it; onnx: needs "
                        "pip install 'pkdkit[onnx]'")
    p.add_argument("--out", required=True, help="output file (e.g. student.pth or student.onnx)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("notebooks", help="run the notebooks headless with papermill")
    nsub = p.add_subparsers(dest="action", required=True)
    r = nsub.add_parser("run")
    r.add_argument("--preset", default="tiny", choices=["tiny", "small", "coco"])
    r.add_argument("--out", required=True, help="report folder: executed notebooks, figures, metrics.json")
    r.add_argument("--run-dir", help="shared run directory (default: <out>/run)")
    r.add_argument("--device", default="auto")
    r.add_argument("--only", nargs="*", help="run only these notebooks (file names)")
    r.add_argument("-p", "--param", action="append", default=[],
                   help="NAME=VALUE for every notebook's parameters cell (YAML value: 3, 0.5, true, null, [a, b])")
    r.add_argument("--threads", type=int, default=2,
                   help="CPU threads per notebook kernel, recorded in metrics.json (0: torch's default; default 2)")
    r.set_defaults(func=cmd_notebooks)
    e = nsub.add_parser("experiment", help="the walk-through once per seed, then the seed study (06)")
    e.add_argument("--preset", default="tiny", choices=["tiny", "small", "coco"])
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    e.add_argument("--out", required=True, help="report folder: seed_<k>/ per seed, experiment.json, figures/")
    e.add_argument("--run-root", help="run directories, one per seed (default: runs/<preset>_experiment)")
    e.add_argument("--device", default="auto")
    e.add_argument("-p", "--param", action="append", default=[], help="NAME=VALUE for every notebook")
    e.add_argument("--threads", type=int, default=2, help="CPU threads per notebook kernel (0: torch's default)")
    e.set_defaults(func=cmd_notebooks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
