"""`pkdkit synth | train | evaluate | select | distill | doctor | notebooks | inspect | export | convert | predict |
profile`: thin argparse wrappers over the library.

pkdkit's own errors (bad data, a checkpoint, a plan, a setting, a run folder in use or made with other
settings) are printed as one message and exit with status 1; `pkdkit --debug ...` shows the traceback.
Other exceptions are bugs and keep theirs. Torch is imported only by the subcommand that needs it, so
`pkdkit --help` answers at once.

Ctrl-C (SIGINT) and SIGTERM stop any command the same way, whatever signal disposition the shell passed on
(a POSIX shell starts background jobs with SIGINT ignored): one line says it was stopped and, for `train`,
`distill` and `notebooks run`, where the same command resumes; exit status 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM), as shells report a process ended by that signal. `inspect` serves the App
until stopped, so there a stop is its normal end: the App's server is stopped too and the status is 0.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from pkdkit.config import field_types, value_type
from pkdkit.errors import ConfigError, PkdkitError

if TYPE_CHECKING:
    from pkdkit.data import DataConfig


def strict_bool(s: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case); anything else is an error, not False."""
    v = s.strip().lower()
    if v in ("true", "yes", "on", "1"):
        return True
    if v in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def int_or_auto(s: str) -> int | str:
    """A number, or the word auto (`TrainConfig.num_workers`)."""
    if s.strip().lower() == "auto":
        return "auto"
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {s!r}") from None


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (give --data, or the four files)")
    g.add_argument("--data", metavar="ROOT",
                   help="dataset root in the synthetic/COCO layout: train/ (or train2017/), val/ (or val2017/), "
                        "annotations/instances_{train,val}.json")
    g.add_argument("--train-json", metavar="FILE", help="COCO instances JSON of the training set")
    g.add_argument("--train-images", metavar="DIR", help="folder the training JSON's file_name entries are in")
    g.add_argument("--val-json", metavar="FILE", help="COCO instances JSON of the validation set")
    g.add_argument("--val-images", metavar="DIR", help="folder the validation JSON's file_name entries are in")
    g.add_argument("--masks", action="store_true", help="load instance masks (Mask R-CNN)")
    g.add_argument("--labels", default="contiguous", choices=["contiguous", "identity"],
                   help="category id -> model label: 1..K (contiguous), or label == category id (identity: "
                        "torchvision's COCO models) (default: %(default)s)")


def _data_config(args: argparse.Namespace) -> DataConfig:
    from pkdkit.data import DataConfig

    if args.data:
        cfg = DataConfig.from_root(args.data, masks=args.masks)
        cfg.labels = args.labels
        return cfg
    given = [args.train_json, args.train_images, args.val_json, args.val_images]
    if not all(given):
        raise ConfigError("give --data ROOT, or all of --train-json --train-images --val-json --val-images")
    return DataConfig(args.train_images, args.train_json, args.val_images, args.val_json, args.masks, args.labels)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One option per `TrainConfig` field, described by the field's metadata; unset options keep the preset's
    value (or TrainConfig's default)."""
    from pkdkit.engine import TrainConfig

    g = p.add_argument_group("training settings (default: the preset's, else the value shown)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "progress":
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        kind = value_type(field_types(TrainConfig)[f.name])
        if kind is bool:
            g.add_argument(flag, type=strict_bool, default=None, metavar="BOOL",
                           help=f"{text}: true or false (default {str(default).lower()})")
        elif kind is tuple:
            g.add_argument(flag, type=float, nargs="+", default=None, help=f"{text} (default {list(default)})")
        else:
            g.add_argument(flag, type=int_or_auto if f.name == "num_workers" else kind, default=None,
                           choices=f.metadata.get("choices"), help=f"{text} (default {default})")


def _train_config(args: argparse.Namespace, base: Any = None) -> Any:
    from pkdkit.engine import TrainConfig

    base = base or TrainConfig()
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name != "progress" and getattr(args, f.name, None) is not None}
    return base.replace(**given, progress=not args.quiet)


# ----------------------------------------------------------------------------------------------------
# Commands
def cmd_synth(args: argparse.Namespace) -> int:
    from pkdkit.synthetic import make_synthetic_coco

    paths = make_synthetic_coco(args.out, n_train=args.train, n_val=args.val, size=args.size, seed=args.seed,
                                overwrite=args.force, image_format=args.format)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pkdkit.engine import train_detector
    from pkdkit.evaluate import comparison_table
    from pkdkit.models import DetectorSpec
    from pkdkit.presets import get_preset

    preset = get_preset(args.preset) if args.preset else None
    cfg = _train_config(args, preset.train if preset else None)  # settings first: they cost nothing to check
    data = _data_config(args)
    train_ds, val_ds = data.train_dataset(), data.val_dataset()
    spec_fields = {f.name for f in fields(DetectorSpec)}
    spec_args = {k: v for k, v in vars(args).items() if k in spec_fields and v is not None}
    base = preset.student.to_dict() if preset else {}
    spec = DetectorSpec.from_dict({**base, **spec_args, "num_classes": args.num_classes or train_ds.label_map.num_classes})
    args.resumes_from = f"{args.out} (its last checkpoint, last.pt)"
    record = train_detector(spec, train_ds, val_ds, cfg, args.out)
    if record:
        print(f"\n{spec.name} on {data.val_json}\n{comparison_table({spec.name: record})}")
        print(f"checkpoint: {Path(args.out) / 'model.pt'}\nmetrics: {Path(args.out) / 'eval.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pkdkit.engine import resolve_device
    from pkdkit.evaluate import comparison_table, evaluate_detector
    from pkdkit.files import run_lock
    from pkdkit.models import is_torchvision_weight, load_checkpoint, load_model

    device = resolve_device(args.device)
    data = _data_config(args)
    val_ds = data.val_dataset()  # the data is checked before any model is built
    rows = {}
    with run_lock(args.out) if args.out else nullcontext():
        for ref in args.checkpoints:
            model, spec, label_map = load_model(ref)
            if is_torchvision_weight(ref):  # COCO classes, matched to the data's categories by name
                label_map, config, name = label_map.onto(val_ds.label_map), {"weights": ref}, ref.split(".")[0]
            else:
                config, name = load_checkpoint(ref).get("config"), Path(ref).parent.name or spec.name
            ds = data.val_dataset(label_map) if args.labels == "identity" else val_ds
            rows[name] = evaluate_detector(model, ds, label_map, out_dir=args.out, name=name, device=device,
                                           config=config, progress=not args.quiet)
    print(comparison_table(rows))
    if args.out:
        print(f"metrics and COCO results written to {args.out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from pkdkit.engine import init_distributed
    from pkdkit.files import run_lock
    from pkdkit.plan import load_plan, run_plan

    plan = load_plan(args.plan)
    if args.device:
        plan.train = plan.train.replace(device=args.device)
    info = init_distributed(plan.train.device)
    args.resumes_from = f"{plan.out_dir} (finished stages are kept, the current one resumes from its last checkpoint)"
    with run_lock(plan.out_dir) if info.is_main else nullcontext():
        run_plan(plan, progress=not args.quiet)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pkdkit.doctor import REPORT, DoctorSettings, run_doctor
    from pkdkit.plan import load_plan

    plan = load_plan(args.plan)
    settings = DoctorSettings(images=args.images, batches=args.batches, steps=args.steps, gpus=args.gpus,
                              batch_size=args.batch_size)
    if args.device:
        plan.train = plan.train.replace(device=args.device)
    findings = run_doctor(plan, settings, progress=not args.quiet)
    print(f"{findings}\nreport: {Path(plan.out_dir) / REPORT}")
    return 1 if findings.failed else 0


def cmd_select(args: argparse.Namespace) -> int:
    from pkdkit.files import run_lock
    from pkdkit.selection import check_teacher_names, run_selection

    pairs = [_name_eq_path(t) for t in args.teachers]
    try:
        check_teacher_names([name for name, _ in pairs])
    except ConfigError as e:
        raise ConfigError(f"--teachers: {e}") from None
    teachers = dict(pairs)
    aps = None
    if args.ap:
        try:
            aps = {k: float(v) for k, v in (_name_eq_path(a) for a in args.ap)}
        except ValueError as e:
            raise ConfigError(f"--ap takes NAME=AP with a number for AP: {e}") from e
    data = _data_config(args)
    with run_lock(args.out):
        selection, _ = run_selection(args.student, teachers, data.val_dataset(), args.out, n_images=args.images,
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

    from pkdkit.notebooks import default_run_dir, run_experiment, run_notebooks

    params = {}
    for p in args.param:
        if "=" not in p:
            raise ConfigError(f"-p takes NAME=VALUE, got {p!r}")
        name, value = p.split("=", 1)
        params[name] = yaml.safe_load(value)
    if args.action == "run":
        args.resumes_from = f"{args.run_dir or default_run_dir(args.preset)} (what its notebooks trained is reused)"
        summary = run_notebooks(args.preset, args.out, run_dir=args.run_dir, device=args.device,
                                parameters=params, only=args.only, threads=args.threads,
                                progress=not getattr(args, "quiet", False))
        print(f"executed notebooks, figures and metrics.json are in {summary['out']}")
    else:
        from pkdkit.jobs import Slurm

        if args.jobs < 1:
            raise ConfigError(f"--jobs should be at least 1, got {args.jobs}")
        args.resumes_from = f"{args.out} (what its seeds trained is reused)"
        slurm = Slurm(partition=args.slurm_partition, gpus=args.slurm_gpus, time_min=args.slurm_time,
                      account=args.slurm_account)
        summary = run_experiment(args.preset, args.seeds, args.out, run_root=args.run_root, device=args.device,
                                 parameters=params, threads=args.threads, jobs=args.jobs, launcher=args.launcher,
                                 slurm=slurm)
        print(f"per-seed reports and the seed study (experiment.json, figures/) are in {summary['out']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pkdkit.models import export_model

    path = export_model(args.checkpoint, args.format, args.out, force=args.force)
    print(f"{args.format} export of {args.checkpoint}: {path} (spec, label map"
          f"{' and the torchvision code that builds it' if args.format == 'torchvision' else ''}: {path}.json)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pkdkit.convert import convert

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    result = convert(args.source_format, args.src, args.out, val_fraction=args.val_fraction, seed=args.seed,
                     classes=classes, copy=args.copy, force=args.force, progress=not args.quiet)
    categories = ", ".join(f"{c['id']}={c['name']}" for c in result.categories)
    print(f"COCO 2017-layout data in {result.out}: train2017 {result.images['train']} images, "
          f"{result.annotations['train']} boxes; val2017 {result.images['val']} images, {result.annotations['val']} "
          f"boxes; categories {categories}"
          + (f"; {len(result.problems)} files reported above" if result.problems else ""))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pkdkit.predict import predict

    result = predict(args.model, args.images, out=args.out, score_threshold=args.score_threshold,
                     batch_size=args.batch_size, device=args.device, force=args.force, show=False,
                     progress=not args.quiet)
    print(f"{len(result.results)} detections on {len(result.images)} images: {result.results_file} (COCO results); "
          f"drawn images in {result.drawn_dir}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from pkdkit.files import write_json
    from pkdkit.profile import profile_refs, profile_table, run_models, sample_image

    refs, sizes, aps = run_models(args.run, args.plan) if args.run else ({}, {}, {})
    refs.update(_name_eq_path(m) for m in args.models)
    if not refs:
        raise ConfigError("pkdkit profile: give MODEL checkpoints / torchvision weight names, or --run RUN_DIR")
    profiles = profile_refs(refs, sizes=sizes, aps=aps, image=sample_image(args.size) if args.size else None,
                            threads=args.threads, repeats=args.repeats, warmup=args.warmup, onnx=not args.no_onnx,
                            progress=not args.quiet)
    print(profile_table(profiles))
    if args.json:
        print(f"written to {write_json([p.to_dict() for p in profiles], args.json)}")
    return 0


# ----------------------------------------------------------------------------------------------------
# Parsers: each subcommand's options are added only when that subcommand runs (they import torch).
def _synth_size(text: str) -> int | str:
    """`synth --size`: an integer, or "coco"."""
    if text == "coco":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'coco', got {text!r}") from None


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="dataset root to write (train/, val/, annotations/)")
    p.add_argument("--train", type=int, default=64, help="training images (default: %(default)s)")
    p.add_argument("--val", type=int, default=16, help="validation images (default: %(default)s)")
    p.add_argument("--size", type=_synth_size, default=96,
                   help="image side in pixels, >= 32, or 'coco': COCO's sizes (640 px long side, varying) with "
                        "many-vertex polygons (default: %(default)s)")
    p.add_argument("--format", choices=["png", "jpeg"], default="png",
                   help="image files: png (lossless) or jpeg (quality 90, decodes as COCO's do) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace a dataset already in --out (its images and JSON)")
    p.set_defaults(func=cmd_synth)


def _train_args(p: argparse.ArgumentParser) -> None:
    from pkdkit.models import ARCHS, BACKBONES
    from pkdkit.presets import PRESETS

    _add_data_args(p)
    p.add_argument("--out", required=True,
                   help="run folder: last.pt, model.pt, history.json, eval.json. Re-running resumes with the same "
                        "settings; other settings are refused")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from the preset's student and training settings")
    g = p.add_argument_group("detector (default: the preset's student, else the value shown)")
    g.add_argument("--arch", choices=ARCHS, help="detector architecture (default retinanet)")
    g.add_argument("--backbone", choices=list(BACKBONES), help="backbone network (default resnet18)")
    g.add_argument("--num-classes", type=int, help="classes including background (default: from the data)")
    g.add_argument("--fpn-channels", type=int, help="FPN width (FCOS: a multiple of 32) (default 256)")
    g.add_argument("--min-size", type=int, help="images are resized so the short side is this (default 800)")
    g.add_argument("--max-size", type=int, help="... and the long side at most this (default 1333)")
    g.add_argument("--anchor-sizes", type=int, nargs="+", help="one anchor size per FPN level, smallest first "
                                                               "(default: torchvision's, for 800 px images)")
    g.add_argument("--weights", help="torchvision detection weights (e.g. FCOS_ResNet50_FPN_Weights.COCO_V1) or "
                                     "a pkdkit checkpoint to start from")
    g.add_argument("--backbone-weights", help="torchvision classification weights of the backbone "
                                              "(e.g. ResNet50_Weights.IMAGENET1K_V1)")
    g.add_argument("--trainable-layers", type=int, help="backbone stages left trainable with backbone weights "
                                                        "(default 3)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    p.add_argument("checkpoints", nargs="+", help="pkdkit checkpoints (model.pt) or torchvision COCO weight names "
                                                  "(FCOS_ResNet50_FPN_Weights.COCO_V1) to evaluate on the validation set")
    p.add_argument("--out", help="folder for <name>.json (metrics) and <name>_results.json (COCO results)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:<index> (default: %(default)s)")
    p.set_defaults(func=cmd_evaluate)


def _select_args(p: argparse.ArgumentParser) -> None:
    from pkdkit.losses import LOSSES
    from pkdkit.ordering import DEFAULT_STRATEGY, STRATEGIES
    from pkdkit.selection import METHODS

    _add_data_args(p)
    p.add_argument("--student", required=True, help="student checkpoint")
    p.add_argument("--teachers", nargs="+", required=True,
                   help="NAME=CHECKPOINT or NAME=TORCHVISION_WEIGHTS (e.g. fcos=FCOS_ResNet50_FPN_Weights.COCO_V1), "
                        "or CHECKPOINT: named by its folder")
    p.add_argument("--ap", nargs="*", help="NAME=AP of teachers (for the by-AP order and the final teacher)")
    p.add_argument("--out", required=True, help="folder for selection.json and selection.png")
    p.add_argument("--images", type=int, default=64, help="calibration images from the validation set "
                                                          "(default: %(default)s)")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=list(STRATEGIES),
                   help="how the teacher order is chosen (default: %(default)s)")
    p.add_argument("--method", default="closed_form", choices=list(METHODS),
                   help="how adaptation costs are computed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<index> (default: %(default)s)")
    p.add_argument("--plan", help="also write a distillation plan (YAML) through the selected order")
    p.add_argument("--loss", default="mgd", choices=sorted(LOSSES),
                   help="distillation loss of that plan's stages (default: %(default)s)")
    p.add_argument("--fine-tune", action="store_true",
                   help="that plan starts from the student checkpoint's trained weights (default: the paper's "
                        "protocol, the student's initial weights plus the first teacher's neck and head)")
    p.set_defaults(func=cmd_select)


def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan file (YAML or JSON; format in pkdkit/plan.py). Re-running skips finished "
                                "stages and resumes; a changed plan is refused")
    p.add_argument("--device", help="overrides the plan's device: auto, cpu, cuda, cuda:<index>")
    p.set_defaults(func=cmd_distill)


def _doctor_args(p: argparse.ArgumentParser) -> None:
    from pkdkit.doctor import DoctorSettings

    d = DoctorSettings()
    p.add_argument("plan", help="plan file (YAML or JSON), as for `pkdkit distill`")
    p.add_argument("--device", help="overrides the plan's device: auto, cpu, cuda, cuda:<index>")
    p.add_argument("--gpus", type=int, default=d.gpus, help="processes the plan will run on: the learning rate is "
                                                            "checked at batch_size x gpus (default: %(default)s)")
    p.add_argument("--images", type=int, default=d.images, help="validation images each teacher is evaluated on "
                                                                "(default: %(default)s)")
    p.add_argument("--batches", type=int, default=d.batches, help="training batches the loss ratio and level shares "
                                                                  "are measured on (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="steps of the smoke run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="images per batch of those measurements and the smoke run "
                                                  "(default: the stage's batch_size)")
    p.set_defaults(func=cmd_doctor)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a pkdkit checkpoint (e.g. distill/<plan>/stage_<k>_<name>/student.pt)")
    p.add_argument("--format", choices=["torchvision", "onnx"], default="torchvision",
                   help="torchvision: plain state dict + <out>.json with the code that builds it; onnx: needs "
                        "pip install 'pkdkit[onnx]' (default: %(default)s)")
    p.add_argument("--out", required=True, help="output file (e.g. student.pth or student.onnx); <out>.json is "
                                                "written beside it. Existing files are refused unless --force")
    p.add_argument("--force", action="store_true", help="replace existing output files (never a run folder's own "
                                                       "files, such as its model.pt)")
    p.set_defaults(func=cmd_export)


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source_format", required=True, choices=["voc", "yolo"],
                   help="voc: a VOCdevkit folder (JPEGImages/, Annotations/, ImageSets/Main/{train,val}.txt); yolo: "
                        "a folder with data.yaml (names, train, val), images/ and labels/")
    p.add_argument("src", help="the source folder (yolo: or its data.yaml)")
    p.add_argument("--out", required=True, help="dataset root to write: train2017/, val2017/, "
                                                "annotations/instances_{train,val}2017.json (use it as --data)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the images in val2017 where the source has no split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of that split (default: %(default)s)")
    p.add_argument("--classes", help="voc: comma-separated class names, category ids 1..K in this order (default: "
                                     "the names found, sorted); other objects are left out")
    p.add_argument("--copy", action="store_true", help="copy the images (default: hard links, copies only where "
                                                       "the file system cannot link)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_convert)


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a pkdkit checkpoint (model.pt, student.pt), a `pkdkit export --format torchvision` "
                                 "state dict (its .json beside it), or a torchvision weight name "
                                 "(FCOS_ResNet50_FPN_Weights.COCO_V1: from the torch hub cache, downloaded if missing)")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively for image files)")
    p.add_argument("--out", required=True, help="folder for results.json (COCO results) and drawn/ (each image "
                                                "with its boxes)")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="boxes drawn: score >= this; results.json keeps every detection (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:<index> (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (its results.json and drawn/ "
                                                       "are replaced)")
    p.set_defaults(func=cmd_predict)


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="pkdkit checkpoints or torchvision COCO weight names, "
                                                             "optionally NAME=MODEL")
    p.add_argument("--run", help="a run directory: its baseline student, candidate teachers and distilled student, "
                                 "with their AP")
    p.add_argument("--plan", default="progressive", help="with --run: the plan whose last student is profiled "
                                                         "(default: %(default)s)")
    p.add_argument("--size", type=int, help="side of the square image timed (default: each model's min_size)")
    p.add_argument("--threads", type=int, help="CPU threads of PyTorch and ONNX Runtime (default: torch's)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs; the median is shown (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before (default: %(default)s)")
    p.add_argument("--no-onnx", action="store_true", help="time PyTorch only (no ONNX export)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_profile)


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        from pkdkit.fiftyone_app import inspect_run
    except ImportError as e:
        raise ConfigError(str(e)) from None
    inspect_run(args.run_dir, port=args.port, iou=args.iou, confidence=args.confidence)
    return 0


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory of the notebooks (e.g. runs/tiny), after notebook 3 ran")
    p.add_argument("--port", type=int, default=5151, help="the App's port (default: %(default)s)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU of the TP/FP/FN evaluation (default: %(default)s)")
    p.add_argument("--confidence", type=float, default=0.3,
                   help="detections loaded, evaluated and shown: confidence >= this (default: %(default)s)")
    p.set_defaults(func=cmd_inspect)


def _notebooks_args(p: argparse.ArgumentParser) -> None:
    from pkdkit.jobs import LAUNCHERS
    from pkdkit.notebooks import DEFAULT_THREADS, NOTEBOOKS
    from pkdkit.presets import PRESETS

    nsub = p.add_subparsers(dest="action", required=True, metavar="ACTION", prog="pkdkit notebooks")
    text = "run the walk-through notebooks in order into a report folder"
    r = nsub.add_parser("run", help=text, description=text, usage="%(prog)s --out DIR [options]")
    _add_common(r, top=False)
    r.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="default: %(default)s")
    r.add_argument("--out", required=True, help="report folder: executed notebooks, figures, metrics.json")
    r.add_argument("--run-dir", help="shared run directory: data, models, selection, distillation "
                                     "(default: runs/<preset>); a run dir made with other parameters is refused")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:<index> (default: %(default)s)")
    r.add_argument("--only", nargs="*", choices=NOTEBOOKS, metavar="NOTEBOOK",
                   help=f"run only these notebooks (file names: {', '.join(NOTEBOOKS)})")
    r.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a value for the notebooks' parameters cells (YAML: 3, 0.5, true, null, [a, b]); unknown "
                        "names and wrong types are refused before any notebook runs")
    r.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="CPU threads of each notebook kernel, recorded in metrics.json, so that the same settings "
                        "give the same numbers (0: torch's default) (default: %(default)s)")
    r.set_defaults(func=cmd_notebooks)
    text = "the walk-through once per seed, then the seed study (06)"
    e = nsub.add_parser("experiment", help=text, description=text, usage="%(prog)s --out DIR [options]")
    _add_common(e, top=False)
    e.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="default: %(default)s")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    e.add_argument("--out", required=True, help="report folder: seed_<k>/ per seed, experiment.json, figures/")
    e.add_argument("--run-root", help="run directories, one per seed (default: runs/<preset>_experiment)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:<index> (default: %(default)s)")
    e.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a value for every notebook's parameters cell (as for `run`)")
    e.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="CPU threads of each notebook kernel (0: torch's default); on CPU with --jobs N each job "
                        "gets max(1, threads // N) (default: %(default)s)")
    g = e.add_argument_group("seeds at once (each seed's output in seed_<k>/run.log; the study when all finished)")
    g.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once on this machine, each in its own process: on CUDA one visible GPU per "
                        "job (CUDA_VISIBLE_DEVICES), on CPU the threads divided (default: %(default)s, one after "
                        "another in this process)")
    g.add_argument("--launcher", default="pool", choices=LAUNCHERS,
                   help="pool: --jobs at once on this machine; slurm: one SLURM job per seed through submitit "
                        "(requeued on preemption or time-out, resuming from its checkpoints); local: the same "
                        "submission with submitit's local executor, every seed at once on this machine "
                        "(default: %(default)s)")
    g.add_argument("--slurm-partition", help="SLURM partition (default: the cluster's)")
    g.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per SLURM job (default: %(default)s)")
    g.add_argument("--slurm-time", type=int, default=240, metavar="MINUTES",
                   help="time limit of each job (slurm and local); a job that reaches it is requeued and resumes, "
                        "up to 3 times (default: %(default)s)")
    g.add_argument("--slurm-account", help="SLURM account to charge (default: yours)")
    e.set_defaults(func=cmd_notebooks)


# name -> (what it does, the arguments of its short usage line, the function adding its options)
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "synth": ("write the synthetic COCO-format shapes dataset", "--out DIR [options]", _synth_args),
    "train": ("supervised training of one detector (teachers, baseline student)",
              "--out DIR (--data ROOT | --train-json ... --val-images ...) [options]", _train_args),
    "evaluate": ("COCO evaluation of checkpoints on the validation set", "CHECKPOINT [CHECKPOINT ...] [options]",
                 _evaluate_args),
    "select": ("adaptation costs between student and teachers, and the teacher order",
               "--student CKPT --teachers NAME=CKPT ... --out DIR [options]", _select_args),
    "distill": ("run a distillation plan (YAML/JSON): stages, hand-over, evaluation", "PLAN [options]",
                _distill_args),
    "doctor": ("check a plan before it runs: teachers load and detect, loss balance, a smoke run, the learning "
               "rate (OK/WARN/FAIL lines, doctor.json; exit status 1 on a FAIL)", "PLAN [options]", _doctor_args),
    "notebooks": ("run the notebooks headless with papermill", "{run,experiment} --out DIR [options]",
                  _notebooks_args),
    "inspect": ("open the FiftyOne App on a run directory's validation images and predictions (Ctrl-C stops)",
                "RUN_DIR [--port PORT]", _inspect_args),
    "export": ("a deployable student: a torchvision state dict or an ONNX file",
               "CHECKPOINT --out FILE [--format torchvision|onnx]", _export_args),
    "convert": ("Pascal VOC or YOLO data -> COCO 2017-layout data (through FiftyOne's importers)",
                "--from voc|yolo SRC --out DIR [options]", _convert_args),
    "predict": ("run a model on image files or folders: COCO results JSON and the images with their boxes",
                "MODEL IMAGE_OR_FOLDER [...] --out DIR [options]", _predict_args),
    "profile": ("parameters, FLOPs and latency (PyTorch, ONNX Runtime) at batch 1, with AP where known",
                "MODEL [MODEL ...] | --run RUN_DIR [options]", _profile_args),
}


def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    # In a subcommand the defaults are suppressed, so `pkdkit --quiet train` is not reset by train's parser.
    default = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--quiet", action="store_true", help="no progress bars", **default)
    p.add_argument("--debug", action="store_true", help="show the traceback of pkdkit's errors", **default)


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `pkdkit` parser; only the subcommands in `commands` (default: all) get their options."""
    parser = argparse.ArgumentParser(prog="pkdkit", description=__doc__)
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, usage, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, usage=f"%(prog)s {usage}")
        if commands is None or name in commands:
            _add_common(p, top=False)
            add_args(p)
    return parser


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While inside, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (so both stop a command through
    the same `except`/`finally` clean-up) and are appended to the yielded list; the previous handlers are restored
    on exit. Installed explicitly, so an inherited "ignore SIGINT" (background jobs of POSIX shells) does not
    matter. Outside the main thread, where handlers cannot be set, nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    with stop_signals() as received:
        try:
            return args.func(args)
        except PkdkitError as e:
            if args.debug:
                traceback.print_exc()
            print(f"pkdkit {args.command}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            signum = received[-1] if received else signal.SIGINT
            where = getattr(args, "resumes_from", None)
            # on a line of its own: a progress bar may have been cut mid-line
            print(f"\npkdkit {args.command}: stopped by {signal.Signals(signum).name}"
                  + (f"; run the same command again to resume in {where}" if where else ""), file=sys.stderr)
            return 128 + signum


if __name__ == "__main__":
    raise SystemExit(main())
