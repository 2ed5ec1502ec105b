"""Figures and the feature explorer, on tiny real detectors and features (Agg backend, see conftest)."""
from __future__ import annotations

from collections import OrderedDict

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer
from conftest import keeps_forward_outputs
from matplotlib.figure import Figure

from pkdkit import viz
from pkdkit.explorer import FeatureExplorer
from pkdkit.features import extract_features
from pkdkit.losses import LOSSES, FGDLoss, MGDLoss
from pkdkit.models import DetectorSpec, build_detector

SPEC = DetectorSpec(arch="retinanet", backbone="resnet18", num_classes=4, fpn_channels=32, min_size=64, max_size=64,
                    anchor_sizes=(8, 16, 32, 64, 128))


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    return {"teacher": build_detector(SPEC).eval(), "student": build_detector(SPEC).eval()}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 64, 64, generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def features(detectors, images):
    with torch.no_grad():
        return {name: extract_features(m, images)[0] for name, m in detectors.items()}


def image_axes(fig: Figure) -> list:
    """Axes that show a map or picture (colorbars excluded)."""
    return [ax for ax in fig.axes if ax.images and not hasattr(ax, "_colorbar")]


def colorbars(fig: Figure) -> list:
    return [ax for ax in fig.axes if hasattr(ax, "_colorbar")]


# ---------------------------------------------------------------------------------------------------- summaries
def test_feature_summary_pca_gives_rgb_in_unit_range_and_is_deterministic():
    feat = torch.randn(16, 5, 7, generator=torch.Generator().manual_seed(0))
    rgb = viz.feature_summary(feat, "pca")
    assert rgb.shape == (5, 7, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    assert np.allclose(rgb.reshape(-1, 3).min(0), 0) and np.allclose(rgb.reshape(-1, 3).max(0), 1)
    np.testing.assert_array_equal(rgb, viz.feature_summary(feat.clone(), "pca"))


def test_feature_summary_pca_first_component_follows_the_dominant_direction():
    pattern = torch.linspace(-1, 1, 6 * 6).view(6, 6)  # one spatial pattern carried by all channels
    feat = pattern * torch.arange(1.0, 9.0).view(8, 1, 1) + 0.01 * torch.randn(8, 6, 6)
    red = viz.feature_summary(feat, "pca")[..., 0]
    assert abs(np.corrcoef(red.ravel(), pattern.numpy().ravel())[0, 1]) > 0.99


def test_feature_summary_mean_max_and_channel_modes():
    feat = torch.randn(4, 3, 5)
    np.testing.assert_allclose(viz.feature_summary(feat, "mean"), feat.abs().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(viz.feature_summary(feat, "max"), feat.abs().amax(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(viz.feature_summary(feat, 2), feat[2].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="channel 4 is out of range for a map with 4 channels"):
        viz.feature_summary(feat, 4)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        viz.feature_summary(feat, "median")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        viz.feature_summary(feat[None], "mean")


# ---------------------------------------------------------------------------------------------------- feature figures
def test_feature_maps_grid_has_models_as_rows_levels_as_columns_and_the_input_first(features, images):
    rows = {"teacher r18": features["teacher"], "student before": features["student"],
            "student after stage 1": features["student"]}
    fig = viz.plot_feature_maps(rows, images[1], index=1, levels=["p3", "p4", "p5"])
    shown = image_axes(fig)
    assert len(shown) == 3 * 4
    assert len(colorbars(fig)) == 3  # one per level column
    assert [ax.get_title() for ax in shown[:4]] == ["input", "p3 (8×8)", "p4 (4×4)", "p5 (2×2)"]
    assert [ax.get_ylabel() for ax in shown[::4]] == list(rows)
    # one colour scale per level column, so rows compare
    p3_limits = {ax.images[0].get_clim() for ax in shown[1::4]}
    assert len(p3_limits) == 1
    assert "mean |activation|" in fig.get_suptitle()


def test_feature_maps_default_to_the_levels_every_model_has(features):
    partial = OrderedDict((k, v) for k, v in features["student"].items() if k != "p7")
    fig = viz.plot_feature_maps({"a": features["teacher"], "b": partial}, mode="pca")
    assert len(image_axes(fig)) == 2 * 4 and not colorbars(fig)
    assert image_axes(fig)[0].images[0].get_array().shape == (8, 8, 3)
    with pytest.raises(ValueError, match=r"b has no level\(s\) \['p7'\]"):
        viz.plot_feature_maps({"a": features["teacher"], "b": partial}, levels=["p6", "p7"])


def test_feature_difference_is_zero_for_the_same_features_up_to_scale(features):
    scaled = OrderedDict((k, 3 * v + 1) for k, v in features["teacher"].items())
    fig = viz.plot_feature_difference(scaled, features["teacher"], levels=["p3", "p4"])
    shown = image_axes(fig)
    assert [ax.get_title() for ax in shown] == ["p3: mean 0.00", "p4: mean 0.00"]
    other = viz.plot_feature_difference(features["student"], features["teacher"], title="after stage 2")
    assert len(image_axes(other)) == 3 and float(image_axes(other)[0].images[0].get_array().mean()) > 0.1
    # p6 and p7 of a 64 px input are 1x1: no spatial pattern to standardise, so no panel; the title says so
    assert [ax.get_title().split(":")[0] for ax in image_axes(other)] == ["p3", "p4", "p5"]
    assert other.get_suptitle().startswith("after stage 2:") and "p6, p7 left out (1×1)" in other.get_suptitle()
    with pytest.raises(ValueError, match="every level .* is 1x1"):
        viz.plot_feature_difference(features["student"], features["teacher"], levels=["p6", "p7"])


def test_feature_difference_applies_the_adapter_when_channels_differ(features):
    wide = OrderedDict((k, torch.cat([v, v], dim=1)) for k, v in features["student"].items())  # 64 channels
    with pytest.raises(ValueError, match="pass the 1x1 `adapter`"):
        viz.plot_feature_difference(wide, features["teacher"], levels=["p3"])
    adapter = torch.nn.Conv2d(64, 32, 1)
    fig = viz.plot_feature_difference(wide, features["teacher"], levels=["p3", "p4"],
                                      adapter={"p3": adapter, "p4": adapter})
    assert [ax.get_title().split(":")[0] for ax in image_axes(fig)] == ["p3", "p4"]


# ---------------------------------------------------------------------------------------------------- loss views
def _loss_inputs():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 16, 6, 6, generator=g)
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 28.0]]), torch.tensor([[10.0, 2.0, 40.0, 30.0], [30, 30, 46, 46]])]
    return student, teacher, boxes, (48, 48)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_view_maps_sum_to_the_loss_and_leave_the_global_rng_alone(name):
    student, teacher, boxes, size = _loss_inputs()
    hparams = {"gamma_fgd": 0.0, "lambda_fgd": 0.0} if name == "fgd" else {}  # FGD's map is its focal part
    loss = LOSSES[name](8, 16, **hparams)
    rng = torch.get_rng_state()
    figs = [viz.plot_loss_masks(loss, student, teacher, boxes=boxes, image_size=size, index=i) for i in (0, 1)]
    assert torch.equal(torch.get_rng_state(), rng)
    if isinstance(loss, MGDLoss):
        assert loss.generator is None  # restored
        loss.generator = torch.Generator().manual_seed(0)  # the view's default seed
    with torch.no_grad():
        expected = float(loss(student, teacher, boxes=boxes, image_size=size))
    per_position = [ax for f in figs for ax in image_axes(f) if ax.get_title().startswith(("loss per", "focal"))]
    assert len(per_position) == 2
    total = sum(float(ax.images[0].get_array().sum()) for ax in per_position)
    assert total == pytest.approx(expected, rel=1e-4)
    assert figs[0].get_suptitle().startswith(name.upper())


def test_mgd_view_shows_the_seeded_mask_and_generation():
    student, teacher, _, _ = _loss_inputs()
    loss = MGDLoss(8, 16, lambda_mgd=0.5)
    fig = viz.plot_loss_masks(loss, student, teacher, seed=7)
    titles = [ax.get_title() for ax in image_axes(fig)]
    assert titles[0].startswith("random mask") and titles[1].startswith("generated") and titles[2].startswith("teacher")
    mask = image_axes(fig)[0].images[0].get_array()
    assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.mean() < 1
    again = viz.plot_loss_masks(loss, student, teacher, seed=7)
    np.testing.assert_array_equal(image_axes(again)[0].images[0].get_array(), mask)


def test_fgd_view_needs_boxes_and_shows_masks_and_attention():
    student, teacher, boxes, size = _loss_inputs()
    with pytest.raises(ValueError, match="FGDLoss needs the ground-truth boxes"):
        viz.plot_loss_masks(FGDLoss(8, 16), student, teacher)
    fig = viz.plot_loss_masks(FGDLoss(8, 16), student, teacher, boxes=boxes, image_size=size, index=1)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:4] == ["foreground mask (1/box area)", "background mask (1/#cells)", "teacher spatial attention",
                          "teacher channel attention"]
    assert len(image_axes(fig)[0].patches) == 2  # both boxes of image 1 outlined


def test_loss_view_rejects_other_modules():
    with pytest.raises(ValueError, match="expected one of"):
        viz.plot_loss_masks(torch.nn.MSELoss(), torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))


# ---------------------------------------------------------------------------------------------------- curves and bars
def _epochs(n, loss, distill):
    out = []
    for e in range(1, n + 1):
        r = {"epoch": e, "lr": 0.01, "seconds": 1.0, "classification": loss / e, "bbox_regression": 0.5}
        if distill:
            r.update(distill_p3=distill / e, distill_p4=distill / e)
        r["loss"] = sum(v for k, v in r.items() if k not in ("epoch", "lr", "seconds"))
        out.append(r)
    return out


def test_loss_curves_concatenate_stages_with_separators():
    histories = {"1: r34": _epochs(3, 1.0, 0.2), "2: r50": {"config": {}, "epochs": _epochs(2, 0.8, 0.4)}}
    fig = viz.plot_loss_curves(histories)
    det_ax, kd_ax = fig.axes[:2]
    for ax in (det_ax, kd_ax):
        separators = [ln for ln in ax.lines if ln.get_gid() == "stage-separator"]
        assert [float(ln.get_xdata()[0]) for ln in separators] == [3.5]
    det_lines = [ln for ln in det_ax.lines if ln.get_gid() != "stage-separator"]
    assert [list(ln.get_xdata()) for ln in det_lines] == [[1, 2, 3], [4, 5]]
    np.testing.assert_allclose(det_lines[0].get_ydata(), [1.5, 1.0, 1.0 / 3 + 0.5])  # loss minus distill terms
    kd_lines = [ln for ln in kd_ax.lines if ln.get_gid() != "stage-separator"]
    np.testing.assert_allclose(kd_lines[1].get_ydata(), [0.8, 0.4])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(histories)


def test_loss_curves_of_independent_runs_overlay_without_separators():
    fig = viz.plot_loss_curves({"r18": _epochs(2, 1.0, 0), "r50": _epochs(2, 0.5, 0)}, sequential=False)
    assert not [ln for ln in fig.axes[0].lines if ln.get_gid() == "stage-separator"]
    assert [list(ln.get_xdata()) for ln in fig.axes[0].lines] == [[1, 2], [1, 2]]
    assert len(fig.axes) == 1  # supervised runs: the detection loss alone, no empty distillation panel
    with pytest.raises(ValueError, match="'r18' is a dict without 'epochs'"):
        viz.plot_loss_curves({"r18": {"config": {}}})


def _record(ap):
    return {"name": "x", "metrics": {"bbox": {"stats": {"AP": ap, "AP50": min(1.0, 2 * ap)}}}}


def test_ap_bars_put_the_baseline_first_and_show_mean_and_std_over_seeds():
    rows = {"baseline": [_record(0.20), _record(0.22)], "one shot": [_record(0.24), _record(0.26)],
            "progressive": [_record(0.27), _record(0.29), _record(0.28)]}
    fig = viz.plot_ap_bars(rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(rows)
    assert ax.yaxis_inverted()  # first row on top
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    assert bars.errorbar is not None
    np.testing.assert_allclose([b.get_width() for b in bars], [21.0, 25.0, 28.0])
    labels = [t.get_text() for t in ax.texts]
    assert labels[0] == "21.0 ± 1.4 (n=2)" and labels[2].endswith("+7.0")
    assert ax.get_xlabel() == "bbox AP (%)"


def test_ap_bars_single_records_without_error_bars_and_undefined_stats():
    fig = viz.plot_ap_bars({"baseline": _record(0.3), "broken": _record(-1.0)}, stat="AP50")
    ax = fig.axes[0]
    assert next(c for c in ax.containers if isinstance(c, BarContainer)).errorbar is None
    assert [t.get_text() for t in ax.texts] == ["60.0", "n/a"]
    with pytest.raises(ValueError, match="run 'x' has no bbox APl"):
        viz.plot_ap_bars({"x": _record(0.3)}, stat="APl")


def test_samples_show_boxes_and_class_names(tiny_coco):
    from pkdkit.data import CocoDetection

    val = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    fig = viz.plot_samples(val, n=4, cols=2)
    shown = image_axes(fig)
    assert len(shown) == 4
    n_boxes = len(val[0][1]["boxes"])
    assert len(shown[0].patches) == n_boxes and len(shown[0].texts) == n_boxes
    assert {t.get_text() for t in shown[0].texts} <= set(val.label_map.names)


# ---------------------------------------------------------------------------------------------------- output
def test_save_figure_writes_a_png_and_creates_folders(tmp_path, features):
    fig = viz.plot_feature_difference(features["student"], features["teacher"])
    path = viz.save_figure(fig, tmp_path / "a" / "b" / "diff.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_outside_a_notebook_only_saves(tmp_path):
    fig = viz.plot_loss_curves({"a": _epochs(2, 1.0, 0.1)})
    assert viz.show(fig, tmp_path / "curves.png") is None
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_figures_are_not_left_in_pyplot(features):
    before = plt.get_fignums()
    viz.plot_feature_maps(features)
    viz.plot_loss_curves({"a": _epochs(1, 1.0, 0.1)})
    assert plt.get_fignums() == before


# ---------------------------------------------------------------------------------------------------- explorer
def test_explorer_redraws_on_update_caches_features_and_restores_models(detectors, images):
    teacher, student = detectors["teacher"], detectors["student"]
    student.train()
    student.backbone.body.features.conv1.eval()  # a mixed train/eval state must come back as it was
    calls = {"teacher": 0, "student": 0}
    handles = [m.backbone.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
               for n, m in detectors.items()]
    try:
        explorer = FeatureExplorer(detectors, images)
        assert calls == {"teacher": 1, "student": 1}  # image 0 of each model, to learn the levels
        assert explorer.controls["level"].options == ("p3", "p4", "p5", "p6", "p7")
        assert len(explorer.output.outputs) == 1

        fig = explorer.update(level="p4", mode="pca", image=1, model="student")
        assert isinstance(fig, Figure) and fig is explorer.figure
        shown = image_axes(fig)
        assert len(shown) == 3
        assert shown[1].images[0].get_array().shape == (4, 4, 3)
        assert shown[1].get_title() == "student: p4 PCA (RGB) (4×4)"
        assert shown[2].get_title().startswith("|z(student) − z(teacher)|: mean")
        assert calls == {"teacher": 2, "student": 2}  # image 1 of the student and of the reference

        explorer.update(level="p5", mode="channel", channel=31)
        explorer.update(model="teacher")
        explorer.controls["image"].value = 0  # a widget change redraws through its observer
        assert calls == {"teacher": 2, "student": 2}  # all from the cache
        assert "teacher is the reference" in explorer.figure.axes[2].texts[0].get_text()
        assert explorer.controls["channel"].max == 31 and not explorer.controls["channel"].disabled

        with pytest.raises(ValueError, match=r"level='p9' is not available; choices: \['p3'"):
            explorer.update(level="p9")
        with pytest.raises(ValueError, match=r"channel=32 is out of range \[0, 31\]"):
            explorer.update(channel=32)
        with pytest.raises(TypeError, match="unknown control"):
            explorer.update(colour="red")
    finally:
        for h in handles:
            h.remove()
    assert student.training and not student.backbone.body.features.conv1.training
    assert student.backbone.body.features.layer1.training and not teacher.training
    for m in detectors.values():
        assert not keeps_forward_outputs(m)  # the explorer's feature taps are gone
    assert type(explorer.widget).__name__ == "VBox"


def test_plot_detections_shows_ground_truth_and_each_model(tiny_coco):
    from pkdkit.data import CocoDetection
    from pkdkit.viz import plot_detections

    ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    image_id = next(i for i in ds.ids if ds.coco.imgToAnns.get(i))
    gt = ds.coco.imgToAnns[image_id]
    results = {"good": [{"image_id": image_id, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in gt],
               "weak": [{"image_id": image_id, "category_id": gt[0]["category_id"], "bbox": gt[0]["bbox"], "score": 0.1}]}
    fig = plot_detections(ds, results, [image_id, ds.ids[0]], score_threshold=0.3)
    axes = fig.axes
    assert len(axes) == 6
    assert len(axes[0].patches) == len(gt) and len(axes[1].patches) == len(gt) and len(axes[2].patches) == 0
    assert axes[1].get_title() == f"good ({len(gt)})"
    with pytest.raises(ValueError, match="no image ids"):
        plot_detections(ds, results, [])


def test_plot_detections_draws_segmentation_results_at_their_mask_box(tiny_coco):
    """A segmentation result without "bbox" (COCO's segm results format) is drawn at its mask's box."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from pkdkit.data import CocoDetection
    from pkdkit.viz import plot_detections

    ds = CocoDetection(tiny_coco["val_images"], tiny_coco["val_json"])
    image = ds.coco.imgs[ds.ids[0]]
    mask = np.zeros((image["height"], image["width"]), dtype=np.uint8, order="F")
    mask[5:20, 8:30] = 1  # x 8..29, y 5..19
    rle = mask_utils.encode(mask)
    result = {"image_id": ds.ids[0], "category_id": ds.coco.getCatIds()[0], "score": 0.9,
              "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}
    fig = plot_detections(ds, {"masks": [result]}, [ds.ids[0]])
    (box,) = fig.axes[1].patches
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (8, 5, 22, 15)


def _budgeted(ap, epochs):
    return {"metrics": {"bbox": {"stats": {"AP": ap}}}, "config": {"budget": {"init": "initial", "epochs": epochs}}}


def test_ap_bars_gain_is_against_the_control_with_the_same_epochs():
    rows = {"baseline": _budgeted(.009, 12), "baseline_long": _budgeted(.041, 24), "one_shot": _budgeted(.044, 12),
            "by_ap": _budgeted(.050, 24), "progressive": _budgeted(.046, 36)}
    fig = viz.plot_ap_bars(rows)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels[0] == "0.9" and labels[1] == "4.1"  # the controls themselves
    assert labels[2].endswith("+3.5 vs baseline")  # 12 epochs: against baseline
    assert labels[3].endswith("+0.9 vs baseline_long")  # 24 epochs: against the equal-budget control, not +4.1
    assert labels[4] == "4.6"  # no control trained 36 epochs: no gain printed
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][3] == "by_ap (24 ep)"
    from pkdkit.evaluate import comparison_table
    table = comparison_table(rows, stats=("AP",)).splitlines()
    assert table[3].endswith("| 0.0 |") and table[4].endswith("| +3.5 |")
    assert table[5].endswith("| +0.9 |") and table[6].endswith("| n/a |")


def test_speed_accuracy_has_one_labelled_point_per_model_with_an_ap(tmp_path):
    def row(name, ms, ap, params=11e6):
        return {"name": name, "params": params, "flops": 2e9, "torch_cpu_ms": 2 * ms, "ort_cpu_ms": ms, "ap": ap,
                "threads": 2}

    rows = [row("fcos_r50", 40.0, 0.31, 32e6), row("fcos_r34", 30.0, 0.27, 27e6), row("student (baseline)", 20.0, 0.18),
            row("student (progressive)", 20.0, 0.22), row("no record", 10.0, None)]
    fig = viz.plot_speed_accuracy(rows)
    ax = fig.axes[0]
    points = [c.get_offsets()[0].tolist() for c in ax.collections]
    assert points == [[40.0, 31.0], [30.0, 27.0], [20.0, 18.0], [20.0, 22.0]]
    labels = [t.get_text().split("\n")[0] for t in ax.texts]
    assert labels == ["fcos_r50", "fcos_r34", "student (baseline)", "student (progressive)"]
    assert "ONNX Runtime, CPU, 2 thread(s)" in ax.get_xlabel() and "no AP: no record" in ax.get_title()
    assert "PyTorch, CPU" in viz.plot_speed_accuracy(rows, latency="torch_cpu_ms").axes[0].get_xlabel()
    fig.savefig(tmp_path / "speed.png")
    with pytest.raises(ValueError, match="latency must be one of"):
        viz.plot_speed_accuracy(rows, latency="gpu")
