"""Specification of the feature-distillation losses in pkdkit/losses.py.

Each loss is checked against a written-out computation of its paper's formula (loops or plain tensor
formulas, using the module's learnable weights but none of its helpers), plus the properties the
formulas promise and the errors the API promises. Tiny CPU tensors; double precision where we compare.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pkdkit.losses import LOSSES, CWDLoss, FGDLoss, MGDLoss, MSELoss, PKDLoss, build_loss, fgd_masks, loss_hparams
from pkdkit.losses import HeadKDLoss

N, H, W = 2, 5, 6
IMAGE_SIZE = (40, 48)  # padded input batch; stride 8 onto (H, W)
BOXES = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [20.0, 10.0, 44.0, 38.0]]), torch.tensor([[5.0, 7.0, 30.0, 21.0]])]


def feats(c_s: int, c_t: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, c_s, H, W, generator=g, dtype=dtype), torch.randn(N, c_t, H, W, generator=g, dtype=dtype)


def adapt(loss, s):
    """Apply the loss's 1x1 adapter through its weights (identity when channels match)."""
    if loss.adapter is None:
        return s
    return F.conv2d(s, loss.adapter.weight, loss.adapter.bias)


# ---------------------------------------------------------------------------------------------- MGD

def mgd_reference(loss: MGDLoss, s, t, keep):
    """alpha * sum((G(S * M) - T)^2) / N with G = conv3x3 -> ReLU -> conv3x3 written out."""
    conv1, conv2 = loss.generation[0], loss.generation[2]
    x = adapt(loss, s) * keep
    x = F.conv2d(F.relu(F.conv2d(x, conv1.weight, conv1.bias, padding=1)), conv2.weight, conv2.bias, padding=1)
    return loss.alpha_mgd * ((x - t) ** 2).sum() / s.shape[0]


@pytest.mark.parametrize("c_s", [4, 6])
def test_mgd_matches_formula_with_mask_drawn_from_global_rng(c_s):
    loss = MGDLoss(c_s, 4).double()
    s, t = feats(c_s, 4)
    torch.manual_seed(123)
    value = loss(s, t)
    torch.manual_seed(123)
    u = torch.rand((N, 1, H, W))  # one draw per position, shared by channels, as in the authors' code
    keep = (u <= 1 - loss.lambda_mgd).double()
    assert 0 < keep.mean() < 1
    torch.testing.assert_close(value, mgd_reference(loss, s, t, keep))


def test_mgd_without_masking_is_the_generation_path():
    loss = MGDLoss(6, 4, alpha_mgd=1.0, lambda_mgd=0.0).double()
    s, t = feats(6, 4)
    torch.testing.assert_close(loss(s, t), mgd_reference(loss, s, t, torch.ones(N, 1, H, W, dtype=torch.float64)))


def test_mgd_generator_makes_masks_repeatable_and_leaves_global_rng_alone():
    loss = MGDLoss(4, 4).double()
    s, t = feats(4, 4)
    loss.generator = torch.Generator().manual_seed(7)
    first = loss(s, t)
    state = torch.get_rng_state()
    loss.generator = torch.Generator().manual_seed(7)
    assert torch.equal(loss(s, t), first)
    assert torch.equal(torch.get_rng_state(), state)
    u = torch.rand((N, 1, H, W), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, mgd_reference(loss, s, t, (u <= 1 - loss.lambda_mgd).double()))


def test_mgd_mask_is_drawn_on_the_cpu_whatever_the_feature_device():
    """Same seed, same mask on CPU and CUDA: the draw uses the CPU RNG even for features on another device
    ("meta" stands in for CUDA here: it has no RNG of its own)."""
    loss = MGDLoss(4, 4)
    torch.manual_seed(3)
    mask = loss.keep_mask(torch.empty(N, 4, H, W, device="meta"))
    after_meta = torch.rand(1)
    torch.manual_seed(3)
    expected = (torch.rand((N, 1, H, W)) <= 1 - loss.lambda_mgd).float()
    assert mask.device.type == "meta" and torch.equal(torch.rand(1), after_meta)
    torch.manual_seed(3)
    assert torch.equal(loss.keep_mask(torch.empty(N, 4, H, W)), expected)


def test_mgd_rejects_mask_ratio_outside_unit_interval():
    with pytest.raises(ValueError, match="lambda_mgd"):
        MGDLoss(4, 4, lambda_mgd=1.0)


# ---------------------------------------------------------------------------------------------- FGD

def test_fgd_masks_weight_cells_by_inverse_box_area_and_smallest_box_wins():
    # 32x32 input, 4x4 map (stride 8). Box A (0,0,8,8) -> cells rows 0..1, cols 0..1 (floor/ceil, inclusive):
    # 4 cells -> 1/4. Box B (0,0,16,16) -> rows/cols 0..2: 9 cells -> 1/9. A overlaps B: A (smaller) wins.
    fg, bg = fgd_masks([torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 8.0, 8.0]]), torch.zeros(0, 4)],
                       (32, 32), (4, 4))
    a, b = 1 / 4, 1 / 9
    expected_fg0 = torch.tensor([[a, a, b, 0], [a, a, b, 0], [b, b, b, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(fg[0], expected_fg0)
    torch.testing.assert_close(bg[0], (expected_fg0 == 0).float() / 7)  # 7 background cells share 1
    # an image without boxes: no foreground, background uniform over all 16 cells
    torch.testing.assert_close(fg[1], torch.zeros(4, 4))
    torch.testing.assert_close(bg[1], torch.full((4, 4), 1 / 16))


def test_fgd_masks_map_boxes_by_the_input_to_feature_ratio_and_clip_at_the_border():
    # 16x32 input (H, W) onto a 2x4 map: x scales by 4/32, y by 2/16 (both stride 8 here).
    # Box (12, 4, 40, 20) -> x 1.5..5 -> cols 1..5 (5 cells, clipped to 1..3); y 0.5..2.5 -> rows 0..3 (4 cells,
    # clipped to 0..1). Weight 1 / (4 * 5) computed on the unclipped range, as in the authors' code.
    fg, bg = fgd_masks([torch.tensor([[12.0, 4.0, 40.0, 20.0]])], (16, 32), (2, 4))
    expected = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]]) / 20
    torch.testing.assert_close(fg[0], expected)
    torch.testing.assert_close(bg[0], torch.tensor([[0.5, 0, 0, 0], [0.5, 0, 0, 0]]))


def fgd_masks_by_loops(boxes, image_size, h, w):
    """The authors' mask rule with explicit slicing, one box at a time."""
    fg = torch.zeros(len(boxes), h, w, dtype=torch.float64)
    bg = torch.zeros_like(fg)
    for i, bxs in enumerate(boxes):
        for x1, y1, x2, y2 in bxs.tolist():
            c0, c1 = math.floor(x1 * w / image_size[1]), math.ceil(x2 * w / image_size[1])
            r0, r1 = math.floor(y1 * h / image_size[0]), math.ceil(y2 * h / image_size[0])
            area = (r1 - r0 + 1) * (c1 - c0 + 1)
            region = fg[i, r0:r1 + 1, c0:c1 + 1]
            fg[i, r0:r1 + 1, c0:c1 + 1] = torch.clamp(region, min=1 / area)
        bg[i] = (fg[i] == 0).double()
        bg[i] /= max(bg[i].sum().item(), 1.0)
    return fg, bg


def gc_block_reference(block, x):
    """GcBlock written out: x + W2 ReLU(LN(W1 sum_j softmax_j(Wk x_j) x_j))."""
    n, c, h, w = x.shape
    logits = (x * block.context_conv.weight.view(1, c, 1, 1)).sum(1) + block.context_conv.bias  # (N, H, W)
    p = torch.softmax(logits.view(n, -1), dim=1)
    context = torch.einsum("nck,nk->nc", x.view(n, c, -1), p)  # (N, C)
    conv1, ln, _, conv2 = block.transform
    y = context @ conv1.weight.view(c // 2, c).T + conv1.bias
    y = (y - y.mean(1, keepdim=True)) / torch.sqrt(y.var(1, unbiased=False, keepdim=True) + ln.eps)
    y = F.relu(y * ln.weight.view(1, -1) + ln.bias.view(1, -1))
    y = y @ conv2.weight.view(c, c // 2).T + conv2.bias
    return x + y.view(n, c, 1, 1)


def fgd_reference(loss: FGDLoss, s, t, boxes, image_size):
    s = adapt(loss, s)
    n, c, h, w = t.shape
    fg, bg = fgd_masks_by_loops(boxes, image_size, h, w)

    def attention(f):
        a = f.abs()
        spatial = h * w * torch.softmax(a.mean(1).view(n, -1) / loss.temp, dim=1).view(n, h, w)
        channel = c * torch.softmax(a.mean((2, 3)) / loss.temp, dim=1)
        return spatial, channel

    sp_t, ch_t = attention(t)
    sp_s, ch_s = attention(s)
    weight = sp_t[:, None] * ch_t[:, :, None, None]
    fg_loss = (fg[:, None] * weight * (s - t) ** 2).sum() / n
    bg_loss = (bg[:, None] * weight * (s - t) ** 2).sum() / n
    att_loss = ((ch_s - ch_t).abs().sum() + (sp_s - sp_t).abs().sum()) / n
    glob_loss = ((gc_block_reference(loss.gc_student, s) - gc_block_reference(loss.gc_teacher, t)) ** 2).sum() / n
    return (loss.alpha_fgd * fg_loss + loss.beta_fgd * bg_loss + loss.gamma_fgd * att_loss
            + loss.lambda_fgd * glob_loss)


@pytest.mark.parametrize("c_s", [4, 6])
def test_fgd_matches_written_out_formula(c_s):
    # unit weights so every term matters at test scale
    loss = FGDLoss(c_s, 4, alpha_fgd=1.0, beta_fgd=0.5, gamma_fgd=0.25, lambda_fgd=0.125).double()
    torch.manual_seed(0)
    for block in (loss.gc_student, loss.gc_teacher):  # leave the identity init so the GcBlocks are exercised
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.5)
    s, t = feats(c_s, 4)
    boxes = [b.double() for b in BOXES]
    torch.testing.assert_close(loss(s, t, boxes, IMAGE_SIZE), fgd_reference(loss, s, t, boxes, IMAGE_SIZE))


def test_fgd_default_weights_are_the_authors_retinanet_config():
    loss = FGDLoss(4, 4)
    assert (loss.temp, loss.alpha_fgd, loss.beta_fgd, loss.gamma_fgd, loss.lambda_fgd) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)


def test_fgd_gcblocks_start_as_identity_so_global_term_starts_as_plain_squared_error():
    loss = FGDLoss(4, 4, alpha_fgd=0, beta_fgd=0, gamma_fgd=0, lambda_fgd=1.0).double()
    s, t = feats(4, 4)
    torch.testing.assert_close(loss(s, t, BOXES, IMAGE_SIZE), ((s - t) ** 2).sum() / N)


def test_fgd_without_boxes_or_image_size_says_what_it_needs():
    loss = FGDLoss(4, 4)
    s, t = feats(4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="boxes"):
        loss(s, t)
    with pytest.raises(ValueError, match="image_size"):
        loss(s, t, BOXES)
    with pytest.raises(ValueError, match="boxes for 1 images.*N=2"):
        loss(s, t, BOXES[:1], IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"boxes\[1\].*\(K, 4\)"):
        loss(s, t, [BOXES[0], torch.zeros(3)], IMAGE_SIZE)


# ---------------------------------------------------------------------------------------------- PKD

def test_pkd_matches_per_channel_standardisation_over_batch_and_space():
    loss = PKDLoss(4, 4, loss_weight=3.0).double()
    s, t = feats(4, 4)
    total = 0.0
    for c in range(4):
        xs, xt = s[:, c].flatten(), t[:, c].flatten()  # all N*H*W values of channel c together
        zs = (xs - xs.mean()) / (xs.std() + 1e-6)
        zt = (xt - xt.mean()) / (xt.std() + 1e-6)
        total = total + ((zs - zt) ** 2).sum()
    torch.testing.assert_close(loss(s, t), 3.0 * total / s.numel() / 2)


def test_pkd_equals_one_minus_pearson_r_averaged_over_channels():
    loss = PKDLoss(3, 3, loss_weight=1.0).double()
    s, t = feats(3, 3)
    m = N * H * W
    r = [torch.corrcoef(torch.stack([s[:, c].flatten(), t[:, c].flatten()]))[0, 1] for c in range(3)]
    expected = (m - 1) / m * torch.stack([1 - rc for rc in r]).mean()  # (M-1)/M from the unbiased std
    torch.testing.assert_close(loss(s, t), expected, atol=1e-5, rtol=1e-5)


def test_pkd_is_zero_for_features_equal_after_standardisation():
    loss = PKDLoss(4, 4).double()
    _, t = feats(4, 4)
    scale = torch.tensor([0.5, 2.0, 3.0, 10.0], dtype=torch.float64).view(1, 4, 1, 1)
    shift = torch.tensor([1.0, -2.0, 0.0, 5.0], dtype=torch.float64).view(1, 4, 1, 1)
    assert loss(scale * t + shift, t).item() < 1e-9


def test_pkd_is_invariant_to_positive_affine_rescaling_per_channel():
    loss = PKDLoss(4, 4).double()
    s, t = feats(4, 4)
    g = torch.Generator().manual_seed(1)
    a, c = (torch.rand(1, 4, 1, 1, generator=g, dtype=torch.float64) * 5 + 0.1 for _ in range(2))
    b, d = (torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    torch.testing.assert_close(loss(a * s + b, c * t + d), loss(s, t), atol=1e-6, rtol=1e-6)


def test_pkd_resizes_student_only_when_asked_as_mmrazor_does():
    s, t = feats(4, 4)
    small = s[:, :, :3, :3]
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\).*\(2, 4, 5, 6\)"):
        PKDLoss(4, 4).double()(small, t)
    loss = PKDLoss(4, 4, resize_student=True).double()
    expected = PKDLoss(4, 4).double()(F.interpolate(small, size=(H, W), mode="bilinear"), t)
    torch.testing.assert_close(loss(small, t), expected)


# ---------------------------------------------------------------------------------------------- CWD

def test_cwd_matches_per_channel_kl_of_spatial_softmax():
    loss = CWDLoss(6, 4, tau=2.0, loss_weight=3.0).double()
    s, t = feats(6, 4)
    s_adapted = adapt(loss, s)
    total = 0.0
    for n in range(N):
        for c in range(4):
            p_t = torch.softmax(t[n, c].flatten() / 2.0, dim=0)
            p_s = torch.softmax(s_adapted[n, c].flatten() / 2.0, dim=0)
            total = total + (p_t * (p_t.log() - p_s.log())).sum()
    torch.testing.assert_close(loss(s, t), 3.0 * 2.0 ** 2 * total / (N * 4))


def test_cwd_is_zero_for_identical_maps_and_positive_otherwise():
    loss = CWDLoss(4, 4).double()
    s, t = feats(4, 4)
    assert abs(loss(t.clone(), t).item()) < 1e-12
    assert loss(s, t).item() > 0


def test_cwd_defaults_are_the_authors_retinanet_config():
    loss = CWDLoss(4, 4)
    assert (loss.tau, loss.loss_weight) == (1.0, 5.0)


# ---------------------------------------------------------------------------------------------- MSE

def test_mse_is_weighted_mean_squared_error_of_adapted_student():
    loss = MSELoss(6, 4, loss_weight=2.0).double()
    s, t = feats(6, 4)
    torch.testing.assert_close(loss(s, t), 2.0 * ((adapt(loss, s) - t) ** 2).mean())
    same = MSELoss(4, 4).double()
    assert same.adapter is None
    assert same(t.clone(), t).item() == 0.0


# ------------------------------------------------------------------------------------- common API

def call(loss, s, t):
    return loss(s, t, BOXES, IMAGE_SIZE) if isinstance(loss, FGDLoss) else loss(s, t)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_student_and_adapter_but_not_teacher(name):
    loss = build_loss(name, 6, 4)
    s, t = feats(6, 4, dtype=torch.float32)
    s.requires_grad_(True)
    t.requires_grad_(True)
    call(loss, s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert loss.adapter.weight.grad is not None and loss.adapter.weight.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_adapter_exists_only_when_channel_counts_differ(name):
    assert build_loss(name, 4, 4).adapter is None
    assert tuple(build_loss(name, 6, 4).adapter.weight.shape) == (4, 6, 1, 1)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mismatched_batch_or_spatial_size_names_both_shapes(name):
    loss = build_loss(name, 4, 4)
    s, t = feats(4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(1, 4, 5, 6\).*\(2, 4, 5, 6\)"):
        call(loss, s[:1], t)
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 5\).*\(2, 4, 5, 6\)"):
        call(loss, s[..., :5], t)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_channels_other_than_built_for_are_rejected(name):
    loss = build_loss(name, 6, 4)
    s, t = feats(4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="built for 6 student / 4 teacher channels"):
        call(loss, s, t)


def test_losses_table_names_every_loss():
    assert LOSSES == {"mgd": MGDLoss, "fgd": FGDLoss, "pkd": PKDLoss, "cwd": CWDLoss, "mse": MSELoss}


def test_build_loss_passes_hyperparameters_and_uses_config_defaults():
    assert build_loss("pkd", 8, 8, loss_weight=6).loss_weight == 6.0
    mgd = build_loss("mgd", 8, 8)
    assert (mgd.alpha_mgd, mgd.lambda_mgd) == (2e-5, 0.65)
    assert build_loss("pkd", 8, 8).loss_weight == 10.0
    assert build_loss("mgd", 8, 8, alpha_mgd="2e-5").alpha_mgd == 2e-5  # YAML may hand over '2e-5' as a string


def test_build_loss_unknown_name_lists_available_losses():
    with pytest.raises(ValueError, match=r"'kd'.*\['cwd', 'fgd', 'mgd', 'mse', 'pkd'\]"):
        build_loss("kd", 4, 4)


def test_build_loss_unknown_hyperparameter_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"\['temperature'\].*tau=1\.0, loss_weight=5\.0"):
        build_loss("cwd", 4, 4, temperature=2.0)


def test_per_architecture_defaults_are_the_authors_configs():
    from pkdkit.losses import LOSS_DEFAULTS, loss_defaults

    assert loss_defaults("mgd", "retinanet").params == {"alpha_mgd": 2e-5, "lambda_mgd": 0.65}
    assert loss_defaults("mgd", "retinanet").levels == ("p3", "p4", "p5", "p6", "p7")
    assert loss_defaults("mgd", "maskrcnn").params == {"alpha_mgd": 5e-7, "lambda_mgd": 0.45}
    assert loss_defaults("mgd", "maskrcnn").levels == ("p2", "p3", "p4", "p5")
    assert loss_defaults("fgd", "fasterrcnn").params["alpha_fgd"] == 5e-5
    assert loss_defaults("fgd", "fcos").params["temp"] == 0.8
    assert loss_defaults("cwd", "retinanet").levels == ("p3", "p4", "p5", "p6")
    assert loss_defaults("cwd", "maskrcnn").params == {"tau": 1.0, "loss_weight": 10.0}
    assert loss_defaults("pkd", "retinanet").params == {"loss_weight": 10.0}
    assert loss_defaults("pkd", "fasterrcnn").params == {"loss_weight": 6.0}
    # every loss has defaults for every detector family, with a source, and they build
    for loss, by_arch in LOSS_DEFAULTS.items():
        assert set(by_arch) == {"retinanet", "fcos", "fasterrcnn", "maskrcnn"}
        for arch, d in by_arch.items():
            assert d.source and build_loss(loss, 8, 8, **d.params)
    # the class defaults stay the RetinaNet values
    assert loss_hparams("mgd") == {"alpha_mgd": 2e-5, "lambda_mgd": 0.65}
    with pytest.raises(ValueError, match="no mgd defaults for detector arch 'ssd'"):
        loss_defaults("mgd", "ssd")


# ---------------------------------------------------------------------------------------------- loss maps

@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_map_is_per_position_and_sums_to_the_loss(name):
    """`loss_map` is the forward's formula summed over channels only: (N, H, W), summing to the loss (FGD: to
    its foreground and background terms, so here the attention and relation terms are switched off)."""
    extra = {"gamma_fgd": 0.0, "lambda_fgd": 0.0} if name == "fgd" else {}
    loss = build_loss(name, 8, 16, **extra).double()
    s, t = feats(8, 16)
    kwargs = {"boxes": BOXES, "image_size": IMAGE_SIZE} if name == "fgd" else {}
    if name == "mgd":
        loss.generator = torch.Generator().manual_seed(3)
    value = loss(s, t, **kwargs)
    if name == "mgd":
        loss.generator = torch.Generator().manual_seed(3)  # the same mask
    where = loss.loss_map(s, t, **kwargs)
    assert where.shape == (N, H, W)
    assert where.sum().item() == pytest.approx(value.item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Response distillation of a dense head (HeadKDLoss)
def test_head_kd_matches_written_out_binary_kl_weighted_by_teacher_confidence():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 7, 3, generator=g, dtype=torch.float64), 3 * torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    T = 2.0
    total, weights = 0.0, 0.0
    for n in range(2):
        for a in range(7):
            w = max(1 / (1 + math.exp(-t[n, a, k].item())) for k in range(3))
            kl = 0.0
            for k in range(3):
                q, p = 1 / (1 + math.exp(-t[n, a, k].item() / T)), 1 / (1 + math.exp(-s[n, a, k].item() / T))
                kl += q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
            total, weights = total + w * kl, weights + w
    assert HeadKDLoss(temperature=T)(s, t).item() == pytest.approx(T * T * total / weights, rel=1e-9)


def test_head_kd_is_zero_at_equal_logits_and_trains_only_the_student():
    t = torch.randn(2, 7, 3, requires_grad=True)
    assert HeadKDLoss(temperature=4.0)(t.detach().clone(), t).item() == 0.0
    s = torch.randn(2, 7, 3, requires_grad=True)
    HeadKDLoss()(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        HeadKDLoss(temperature=0.0)
