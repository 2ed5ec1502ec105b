"""What a model costs: parameters, FLOPs and latency at batch 1, next to its AP (`pkdkit profile`, notebook 5).

- **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` over one forward of the eval-mode detector on one image,
  torch's convention (a multiply-add is 2 FLOPs: a convolution costs 2 * Cin * Cout * k * k * H_out * W_out).
  The forward includes the transform and the postprocessing (box decoding, NMS), but torch counts only
  convolutions and matrix products, so in practice the number is backbone + FPN + head.
- **Latency**: the whole detector, postprocessing included (image in, boxes out), at batch 1: in PyTorch
  (eval mode, no gradients) and in ONNX Runtime on the model exported by `pkdkit.models.export_onnx`;
  on the CPU, and on CUDA when there is one. The median of `repeats` runs after `warmup` runs, with
  `threads` CPU threads in both (torch's intra-op threads and ONNX Runtime's `intra_op_num_threads`).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pkdkit.data import LabelMap
from pkdkit.evaluate import EvalRecord
from pkdkit.models import DetectorSpec, eval_mode, export_onnx, load_model
from pkdkit.progress import step


@dataclass
class Profile:
    """One model's costs (see the module docstring); `ap`: its COCO AP when its record is known, else None.
    `input_size`: the (H, W) the network sees after the detector's own resize; latencies in milliseconds,
    None where not measured (no ONNX Runtime, no CUDA). `ort_score_diff` checks the exported model: the largest
    difference between its detection scores and PyTorch's on the timed image (both sorted, the shorter list's
    length; 0 detections: 0)."""

    name: str
    ref: str
    input_size: tuple[int, int]
    params: int
    flops: int
    torch_cpu_ms: float
    ort_cpu_ms: float | None
    torch_cuda_ms: float | None
    ort_cuda_ms: float | None
    threads: int
    repeats: int
    warmup: int
    ap: float | None = None
    ort_score_diff: float | None = None  # max |ONNX Runtime - PyTorch| over the sorted detection scores of the image

    def to_dict(self, relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
        """The row as JSON; with `relative_to` (a run directory), a checkpoint `ref` inside it is written relative
        to it, so a report does not hold the machine's absolute paths."""
        ref = self.ref
        if relative_to is not None and Path(ref).is_absolute() and Path(ref).is_relative_to(Path(relative_to).resolve()):
            ref = str(Path(ref).relative_to(Path(relative_to).resolve()))
        return {**asdict(self), "ref": ref, "input_size": list(self.input_size)}


def count_flops(model: nn.Module, *inputs: Any) -> int:
    """FLOPs of `model(*inputs)` by torch's `FlopCounterMode` (no gradients; `model` as it is, e.g. in eval mode)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return int(counter.get_total_flops())


def median_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3, sync: Callable[[], Any] | None = None) -> float:
    """The median wall time of `fn()` in milliseconds over `repeats` calls after `warmup` calls (`sync` after each,
    e.g. `torch.cuda.synchronize`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to `n` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def onnx_session(model: nn.Module, spec: DetectorSpec, label_map: LabelMap, image: torch.Tensor, threads: int,
                 provider: str = "CPUExecutionProvider") -> Any:
    """An ONNX Runtime session of `model` (exported by `pkdkit.models.export_onnx` with `image` as its example;
    input ``image`` (3, H, W), outputs boxes, scores, labels) with `threads` intra-op threads on `provider`."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about shapes taken as constants
        path = export_onnx(model, spec, label_map, Path(tmp) / "model.onnx", example=image)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=[provider])


def _has_ort() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def profile_model(model: nn.Module, spec: DetectorSpec, label_map: LabelMap, image: torch.Tensor, *, name: str,
                  ref: str = "", ap: float | None = None, threads: int | None = None, repeats: int = 20,
                  warmup: int = 3, onnx: bool = True) -> Profile:
    """Parameters, FLOPs and latencies of `model` on `image` (3, H, W) in [0, 1] at batch 1 (module docstring).
    `threads`: CPU threads of torch and ONNX Runtime (default: torch's current number); `onnx`: also time ONNX
    Runtime (when installed)."""
    threads = threads or torch.get_num_threads()
    model = model.cpu().eval()
    image = image.cpu()
    with eval_mode(model), torch.no_grad():
        input_size = tuple(int(v) for v in model.transform([image])[0].tensors.shape[-2:])
        flops = count_flops(model, [image])
        with torch_threads(threads):
            torch_cpu = median_ms(lambda: model([image]), repeats, warmup)
        torch_cuda = None
        if torch.cuda.is_available():
            gpu, gpu_image = model.cuda(), image.cuda()
            torch_cuda = median_ms(lambda: gpu([gpu_image]), repeats, warmup, torch.cuda.synchronize)
            model.cpu()
    ort_cpu = ort_cuda = score_diff = None
    if onnx and _has_ort():
        import onnxruntime as ort

        feed = {"image": image.numpy()}
        session = onnx_session(model, spec, label_map, image, threads)
        ort_cpu = median_ms(lambda: session.run(None, feed), repeats, warmup)
        with torch.no_grad():
            ours = model([image])[0]["scores"].sort(descending=True).values
        theirs = torch.from_numpy(session.run(None, feed)[1]).sort(descending=True).values
        n = min(len(ours), len(theirs))
        score_diff = float((ours[:n] - theirs[:n]).abs().max()) if n else 0.0
        if "CUDAExecutionProvider" in ort.get_available_providers():
            session = onnx_session(model, spec, label_map, image, threads, "CUDAExecutionProvider")
            ort_cuda = median_ms(lambda: session.run(None, feed), repeats, warmup)
    return Profile(name, ref, input_size, sum(p.numel() for p in model.parameters()), flops, torch_cpu, ort_cpu,
                   torch_cuda, ort_cuda, threads, repeats, warmup, ap, score_diff)


def sample_image(size: int, seed: int = 0) -> torch.Tensor:
    """A seeded random image (3, size, size) in [0, 1]: what the CLI times when given no image."""
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def profile_refs(refs: dict[str, str], *, image: torch.Tensor | None = None, sizes: dict[str, tuple[int, int]] | None = None,
                 aps: dict[str, float] | None = None, progress: bool = True, **kwargs: Any) -> list[Profile]:
    """`profile_model` of each model reference ({name: checkpoint path or torchvision weight name}), loaded by
    `pkdkit.models.load_model` (at `sizes[name]` = (min_size, max_size) where given), on `image` (default: a
    `sample_image` of each model's min_size); `aps`: {name: AP} to show with them. Models of the same
    architecture and input size (a student before and after distillation) cost the same: measured once."""
    profiles: list[Profile] = []
    measured: dict[str, Profile] = {}
    for name, ref in refs.items():
        model, spec, label_map = load_model(ref, size=(sizes or {}).get(name))
        img = image if image is not None else sample_image(spec.min_size)
        same = json.dumps([replace(spec, weights=None, backbone_weights=None).to_dict(), list(img.shape)])
        if same in measured:
            profiles.append(replace(measured[same], name=name, ref=str(ref), ap=(aps or {}).get(name)))
            continue
        profiles.append(profile_model(model, spec, label_map, img, name=name, ref=str(ref),
                                      ap=(aps or {}).get(name), **kwargs))
        measured[same] = profiles[-1]
        if progress:
            p = profiles[-1]
            step(f"profile {name}: {p.params / 1e6:.2f} M parameters, {p.flops / 1e9:.3g} GFLOPs, "
                 f"PyTorch CPU {p.torch_cpu_ms:.1f} ms" + (f", ONNX Runtime CPU {p.ort_cpu_ms:.1f} ms"
                                                          if p.ort_cpu_ms is not None else ""))
    return profiles


def run_models(run_dir: str, plan: str = "progressive") -> tuple[dict[str, str], dict[str, tuple[int, int]], dict[str, float]]:
    """A run directory's models to profile: the baseline student, every candidate teacher and, once notebook 3 ran
    `plan`, the student after its last stage; as (refs, sizes of torchvision teachers, {name: AP} of those with
    an evaluation record)."""
    from pkdkit.presets import get_preset
    from pkdkit.rundir import RunDir
    from pkdkit.workflow import STUDENT, load_run_plan, load_settings, model_refs

    settings = load_settings(run_dir)
    preset = get_preset(settings.preset, image_size=settings.image_size)
    rd = RunDir(run_dir)
    named = {f"{STUDENT} (baseline)" if n == STUDENT else n: (n, ref) for n, ref in model_refs(preset, run_dir).items()}
    refs = {label: ref for label, (_, ref) in named.items()}
    records = {label: rd.record(n) for label, (n, _) in named.items()}
    sizes = {label: preset.reference_size for label, (n, _) in named.items()
             if isinstance(preset.teachers.get(n), str) and preset.reference_size}
    if rd.plan_dir(plan).is_dir():
        p = load_run_plan(run_dir, plan)
        refs[f"{STUDENT} ({plan})"] = str(p.stage_student(len(p.stages) - 1))
        records[f"{STUDENT} ({plan})"] = p.stage_record(len(p.stages) - 1)
    aps = {label: EvalRecord.read(path).ap for label, path in records.items() if path.exists()}
    return refs, sizes, aps


def profile_run(run_dir: str, plan: str = "progressive", **kwargs: Any) -> list[Profile]:
    """`profile_refs` of a run's models (`run_models`) with their AP, each on a `sample_image` of its input size."""
    refs, sizes, aps = run_models(run_dir, plan)
    return profile_refs(refs, sizes=sizes, aps=aps, **kwargs)


def profile_table(profiles: list[Profile]) -> str:
    """Markdown: one row per model (parameters, GFLOPs, latencies, AP) and a line saying how it was measured."""
    if not profiles:
        return "(no models)"
    cuda = any(p.torch_cuda_ms is not None or p.ort_cuda_ms is not None for p in profiles)
    cols = ["model", "input", "params (M)", "GFLOPs", "PyTorch CPU ms", "ONNX Runtime CPU ms"]
    cols += ["PyTorch CUDA ms", "ONNX Runtime CUDA ms"] if cuda else []
    cols += ["AP"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for p in profiles:
        row = [p.name, f"{p.input_size[0]}x{p.input_size[1]}", f"{p.params / 1e6:.2f}", f"{p.flops / 1e9:.3g}",
               ms(p.torch_cpu_ms), ms(p.ort_cpu_ms)]
        row += [ms(p.torch_cuda_ms), ms(p.ort_cuda_ms)] if cuda else []
        row += ["-" if p.ap is None else f"{p.ap:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    p = profiles[0]
    lines.append(f"\nBatch 1; median of {p.repeats} runs after {p.warmup} warm-up runs; {p.threads} CPU thread(s) in "
                 "PyTorch and ONNX Runtime (intra-op). Latency: image in, boxes out (postprocessing included). FLOPs: "
                 "torch.utils.flop_counter over one eval-mode forward (counts convolutions and matrix products: "
                 "backbone, FPN, head).")
    return "\n".join(lines)
