"""The pipeline steps the notebooks walk through, as plain functions over one run directory.

Run directory layout (shared by all notebooks, so papermill can run them in sequence)::

    <run_dir>/data/                      synthetic COCO-format data (tiny/small presets)
    <run_dir>/models/<name>/             baseline student and candidate teachers: model.pt, eval.json, metrics.json
    <run_dir>/selection/                 selection.json, selection.png
    <run_dir>/distill/<plan name>/       one staged run per plan (plan.yaml, stage_k_<teacher>/, summary.json)

Every step skips work whose outputs already exist, so re-running a notebook (or the whole pipeline)
resumes instead of starting over.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from pkdkit.data import CocoDetection
from pkdkit.distill import Distiller, build_distiller
from pkdkit.engine import TrainConfig, resolve_device, train_detector
from pkdkit.evaluate import evaluate_detector
from pkdkit.files import write_json
from pkdkit.models import DetectorSpec, load_checkpoint, load_detector
from pkdkit.plan import DataConfig, Plan, Stage, load_model_ref, load_plan, run_plan
from pkdkit.selection import Selection, run_selection
from pkdkit.presets import Preset
from pkdkit.synthetic import make_synthetic_coco

STUDENT = "student"


def prepare_data(preset: Preset, run_dir: str | os.PathLike, data_root: str | None = None) -> DataConfig:
    """The preset's synthetic data under `run_dir/data` (generated once), or COCO-format data at
    `data_root` (train/val or train2017/val2017 folders and annotations/instances_*.json)."""
    if data_root:
        cfg = DataConfig.from_root(Path(data_root).resolve())
    elif preset.synth is None:
        raise ValueError(f"preset {preset.name!r} has no synthetic data: give data_root (e.g. the COCO 2017 folder)")
    else:
        root = Path(run_dir).resolve() / "data"
        if not (root / "annotations" / "instances_val.json").exists():
            make_synthetic_coco(root, **preset.synth, overwrite=True)  # no val JSON (written last): a partial set
        cfg = DataConfig.from_root(root)
    if preset.student.num_classes == 91 and cfg.labels == "contiguous":
        cfg.labels = "identity"  # torchvision's COCO label space: label == category id
    return cfg


def student_spec(preset: Preset, data: DataConfig) -> DetectorSpec:
    """The preset's student with the class count of the data."""
    return replace(preset.student, num_classes=data.val_dataset().label_map.num_classes)


def train_candidates(preset: Preset, data: DataConfig, run_dir: str | os.PathLike, *, device: str = "auto",
                     epochs: int | None = None, seed: int = 0, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train (or load) the baseline student and every candidate teacher; returns {name: eval record}.

    Teachers train for `preset.teacher_epochs` (a bigger schedule) when set; `epochs` overrides both.
    Teachers given as torchvision COCO weight names are not trained, only evaluated on the data.
    """
    train_ds, val_ds = data.train_dataset(), data.val_dataset()
    n_classes = val_ds.label_map.num_classes
    cfg = preset.train.replace(device=device, seed=seed, progress=progress, **({"epochs": epochs} if epochs else {}))
    teacher_cfg = cfg.replace(epochs=epochs or preset.teacher_epochs or cfg.epochs)
    records: dict[str, dict[str, Any]] = {}
    for name, spec in {STUDENT: preset.student, **preset.teachers}.items():
        out = Path(run_dir) / "models" / name
        if isinstance(spec, str):  # a torchvision COCO detector
            records[name] = _evaluate_reference(spec, preset.student, val_ds, out, device, progress)
            continue
        records[name] = train_detector(replace(spec, num_classes=n_classes), train_ds, val_ds,
                                       cfg if name == STUDENT else teacher_cfg, out,
                                       config={"preset": preset.name, "role": "student" if name == STUDENT else "teacher"})
    return records


def _evaluate_reference(weights: str, like: DetectorSpec, val_ds: CocoDetection, out: Path, device: str,
                        progress: bool) -> dict[str, Any]:
    if (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    model, spec, label_map = load_model_ref(weights, like=like)
    return evaluate_detector(model, val_ds, label_map, out_dir=out, name="eval", device=resolve_device(device),
                             config={"weights": weights, "spec": spec.to_dict()}, progress=progress)


def model_refs(preset: Preset, run_dir: str | os.PathLike) -> dict[str, str]:
    """{name: checkpoint path or torchvision weight name} of the student and every candidate teacher."""
    return {name: spec if isinstance(spec, str) else str(Path(run_dir).resolve() / "models" / name / "model.pt")
            for name, spec in {STUDENT: preset.student, **preset.teachers}.items()}


def candidate_aps(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {name: r["metrics"]["bbox"]["stats"]["AP"] for name, r in records.items() if name != STUDENT}


def select(preset: Preset, data: DataConfig, run_dir: str | os.PathLike, aps: dict[str, float], *,
           strategy: str = "shortest_path", method: str = "closed_form", device: str = "auto") -> Selection:
    """Adaptation costs between student and teachers, the chosen order, `selection/selection.{json,png}`."""
    refs = model_refs(preset, run_dir)
    teachers = {k: v for k, v in refs.items() if k != STUDENT}
    return run_selection(refs[STUDENT], teachers, data.val_dataset(), Path(run_dir) / "selection",
                         n_images=preset.calibration_images, strategy=strategy, method=method,
                         device=str(resolve_device(device)), aps=aps)


def make_plan(preset: Preset, data: DataConfig, run_dir: str | os.PathLike, name: str, teachers: list[str], *,
              device: str = "auto", epochs: int | None = None, seed: int = 0, loss: str | None = None,
              loss_params: dict[str, Any] | None = None, inherit_teacher_head: bool = False) -> Plan:
    """A staged plan over `teachers` (in order) starting from the trained baseline student.
    One teacher makes a one-shot distillation."""
    refs = model_refs(preset, run_dir)
    train: TrainConfig = preset.distill.replace(device=device, seed=seed, **({"epochs": epochs} if epochs else {}))
    stages = [Stage(name=t, teacher=refs[t], loss=loss or preset.loss,
                    loss_params=dict(preset.loss_params if loss_params is None else loss_params),
                    inherit_teacher_head=inherit_teacher_head and k == 0) for k, t in enumerate(teachers)]
    return Plan(name=name, student=student_spec(preset, data), data=data, stages=stages,
                out_dir=str(Path(run_dir).resolve() / "distill" / name), student_init=refs[STUDENT], train=train)


def run_plans(plans: list[Plan], *, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run each plan (finished stages are skipped); returns {plan name: summary}."""
    return {p.name: run_plan(p, progress=progress) for p in plans}


def stage_histories(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """Per-stage epoch metrics of a plan, in stage order: {"1: r34": [...], "2: r50": [...]}."""
    out = {}
    for k, stage in enumerate(plan.stages):
        path = plan.stage_dir(k) / "metrics.json"
        if path.exists():
            out[f"{k + 1}: {stage.name}"] = json.loads(path.read_text())["epochs"]
    return out


def final_records(plans: list[Plan]) -> dict[str, dict[str, Any]]:
    """{"baseline": record, <plan name>: record of its last stage} for plans that have finished."""
    rows: dict[str, dict[str, Any]] = {}
    for plan in plans:
        summary = Path(plan.out_dir) / "summary.json"
        if not summary.exists():
            continue
        s = json.loads(summary.read_text())["rows"]
        rows.setdefault("baseline", s["baseline"])
        rows[plan.name] = s[plan.stages[-1].name]
    return rows


def write_report_metrics(path: str | os.PathLike, preset: Preset, run_dir: str | os.PathLike, **sections: Any) -> None:
    """Merge `sections` into the report's metrics.json (each notebook adds its own section)."""
    path = Path(path)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update({"preset": preset.name, "run_dir": str(run_dir), **sections})
    write_json(current, path)


def load_stage(plan: Plan, k: int) -> Distiller:
    """Stage k's Distiller as it ended: the stage's student, its teacher, and the trained loss modules
    (adapters, MGD generation blocks) from the stage's `last.pt`."""
    stage = plan.stages[k]
    student, _, _, _ = load_detector(plan.stage_dir(k) / "student.pt")
    teacher, _, _ = load_model_ref(stage.teacher, like=plan.student)
    distiller = build_distiller(student, teacher, stage.loss, stage.loss_params, stage.levels)
    distiller.load_state_dict(load_checkpoint(plan.stage_dir(k) / "last.pt")["model"])
    return distiller.eval()


def training_history(run_dir: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    """Per-epoch metrics of a trained candidate (empty for torchvision reference models)."""
    path = Path(run_dir) / "models" / name / "metrics.json"
    return json.loads(path.read_text())["epochs"] if path.exists() else []


def progressive_order(selection: Any, aps: dict[str, float]) -> list[str]:
    """The selected teacher sequence; when the selection chose a single teacher (a direct step was cheapest),
    fall back to every teacher up to it by ascending AP, so that the progressive run has several stages."""
    if len(selection.order) > 1:
        return list(selection.order)
    final = selection.order[-1]
    weaker = sorted((t for t in aps if t != final and aps[t] <= aps[final]), key=aps.get)
    print(f"selection chose the single teacher {final}; progressive order by AP instead: {weaker + [final]}")
    return weaker + [final]


def load_run_plan(run_dir: str | os.PathLike, name: str) -> Plan:
    """A plan that notebook 03 wrote and ran (`distill/<name>/plan.yaml`)."""
    path = Path(run_dir) / "distill" / name / "plan.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no plan {name!r} in {run_dir}: run notebook 03 (staged distillation) first")
    return load_plan(path)


def stage_models(plan: Plan) -> dict[str, Any]:
    """Models to compare in feature space: each stage's teacher, the baseline student, and the student
    after each stage, in eval mode."""
    models: dict[str, Any] = {}
    for stage in plan.stages:
        models[f"teacher {stage.name}"] = load_model_ref(stage.teacher, like=plan.student)[0].eval()
    models["student (baseline)"] = load_detector(plan.student_init)[0].eval()
    for k, stage in enumerate(plan.stages):
        models[f"student after {stage.name}"] = load_detector(plan.stage_dir(k) / "student.pt")[0].eval()
    return models


def final_results(run_dir: str | os.PathLike) -> dict[str, Path]:
    """COCO results files of the baseline and the final student of every finished plan, by name."""
    out: dict[str, Path] = {}
    for summary in sorted(Path(run_dir, "distill").glob("*/summary.json")):
        plan_dir = summary.parent
        out.setdefault("baseline", plan_dir / "baseline" / "eval_results.json")
        last = sorted(plan_dir.glob("stage_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
        out[plan_dir.name] = last / "eval_results.json"
    if not out:
        raise FileNotFoundError(f"no finished distillation runs in {run_dir}/distill: run notebook 03 first")
    order = ["baseline", "no_distill", "one_shot", "progressive", "reversed"]
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def load_record(results_path: str | os.PathLike) -> dict[str, Any]:
    """The evaluation record written next to a COCO results file (`eval_results.json` -> `eval.json`)."""
    path = Path(results_path)
    return json.loads(path.with_name(path.name.replace("_results.json", ".json")).read_text())


def seed_study(reports: list[str | os.PathLike], stats: tuple[str, ...] = ("AP", "AP50", "AP75")) -> dict[str, Any]:
    """Aggregate the `evaluation` sections of several report folders (one per seed).

    Returns {"seeds", "runs": {run: {stat: {"values", "mean", "std"}}}, "records": {run: [record, ...]},
    "table": markdown (mean ± sample std in %, n seeds), "parameters": each report's parameters}.
    """
    import numpy as np

    if not reports:
        raise ValueError("seed_study: no report folders given")
    metrics = [json.loads((Path(r) / "metrics.json").read_text()) for r in reports]
    missing = [str(r) for r, m in zip(reports, metrics) if "evaluation" not in m]
    if missing:
        raise ValueError(f"reports without an evaluation section (did notebook 05 run?): {missing}")
    names = [n for n in metrics[0]["evaluation"] if all(n in m["evaluation"] for m in metrics)]
    runs, records = {}, {}
    for name in names:
        values = {s: [m["evaluation"][name][s] for m in metrics] for s in stats}
        runs[name] = {s: {"values": v, "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                      for s, v in values.items()}
        records[name] = [{"metrics": {"bbox": {"stats": m["evaluation"][name]}}} for m in metrics]
    header = "| run | " + " | ".join(stats) + " |\n|---|" + "---:|" * len(stats)
    lines = [f"| {n} | " + " | ".join(f"{100 * r[s]['mean']:.1f} ± {100 * r[s]['std']:.1f}" for s in stats) + " |"
             for n, r in runs.items()]
    return {"seeds": [m.get("parameters", {}).get("seed") for m in metrics], "runs": runs, "records": records,
            "table": "\n".join([header, *lines]) + f"\n\n(mean ± sample std over {len(metrics)} seeds, AP in %)",
            "parameters": [m.get("parameters", {}) for m in metrics]}
