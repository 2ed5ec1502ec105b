"""Feature-distillation losses on one FPN level.

Every loss is a small `nn.Module` with the same interface::

    loss = LOSSES[name](student_channels, teacher_channels, **hparams)
    value = loss(student_feat, teacher_feat, boxes=None, image_size=None)   # scalar tensor
    where = loss.loss_map(student_feat, teacher_feat, boxes=None, image_size=None)  # (N, H, W)

`loss_map` is each position's share of the loss: the same formula as `forward` (one `_terms` method per
loss), summed over channels instead of over everything, so its total is the loss (FGD: its focal part).
`pkdkit.viz.plot_loss_masks` draws it.

- `student_feat`: (N, Cs, H, W), `teacher_feat`: (N, Ct, H, W), taken from the *same* transformed batch, so
  N, H and W must agree (a mismatch raises `ValueError` naming both shapes).
- When Cs != Ct the loss owns a 1x1 conv `adapter` (student -> teacher channels); otherwise `adapter` is
  None. It is trained with the student, as in the authors' code (their `align` conv).
- The teacher map is detached inside: it is a target, never trained through the loss.
- `boxes` (list of N tensors (K, 4), xyxy pixels of the padded input batch) and `image_size` (H_in, W_in) of
  that batch are used by FGD only; the other losses ignore them.

One module per FPN level, as in the authors' configs (each level has its own adapter / generation block /
GcBlock); the caller sums the levels. A class's own defaults are the per-level values of the authors'
RetinaNet configs on COCO; `LOSS_DEFAULTS` / `loss_defaults(loss, arch)` hold the values and FPN levels the
authors used for each detector family (RetinaNet, FCOS, Faster/Mask R-CNN), each with its source.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkdkit.errors import ConfigError

__all__ = ["MGDLoss", "FGDLoss", "PKDLoss", "CWDLoss", "MSELoss", "GcBlock", "fgd_masks", "LOSSES",
           "LOSS_DEFAULTS", "LossDefaults", "loss_defaults", "build_loss"]


class _FeatureLoss(nn.Module):
    """Shared part of every loss: the optional 1x1 adapter and the input checks."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        for what, c in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if not isinstance(c, int) or isinstance(c, bool) or c < 1:
                raise ValueError(f"{type(self).__name__}: {what} must be a positive int, got {c!r}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        differ = student_channels != teacher_channels
        self.adapter = nn.Conv2d(student_channels, teacher_channels, 1) if differ else None

    def prepare(self, student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
        """Check shapes, adapt the student to (N, Ct, H, W), detach the teacher."""
        name = type(self).__name__
        if student_feat.dim() != 4 or teacher_feat.dim() != 4:
            raise ValueError(f"{name}: expected student and teacher features of shape (N, C, H, W), got "
                             f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}")
        (ns, cs, hs, ws), (nt, ct, ht, wt) = student_feat.shape, teacher_feat.shape
        if (ns, hs, ws) != (nt, ht, wt):
            raise ValueError(f"{name}: student features {tuple(student_feat.shape)} and teacher features "
                             f"{tuple(teacher_feat.shape)} differ in (N, H, W); distil from the same "
                             "transformed batch so every FPN level has the same size")
        if cs != self.student_channels or ct != self.teacher_channels:
            raise ValueError(f"{name}: built for {self.student_channels} student / {self.teacher_channels} "
                             f"teacher channels, got student {tuple(student_feat.shape)} and teacher "
                             f"{tuple(teacher_feat.shape)}")
        student = self.adapter(student_feat) if self.adapter is not None else student_feat
        return student, teacher_feat.detach()

    def forward(self, student_feat: Tensor, teacher_feat: Tensor, boxes: list[Tensor] | None = None,
                image_size: tuple[int, int] | None = None) -> Tensor:
        """The loss on one level: a scalar."""
        return self._terms(student_feat, teacher_feat, boxes, image_size, per_position=False)

    def loss_map(self, student_feat: Tensor, teacher_feat: Tensor, boxes: list[Tensor] | None = None,
                 image_size: tuple[int, int] | None = None) -> Tensor:
        """(N, H, W): what the loss weighs at each position of each image, its terms summed over channels;
        the map sums over (N, H, W) to the loss (FGD: to its foreground and background terms)."""
        return self._terms(student_feat, teacher_feat, boxes, image_size, per_position=True)

    def _terms(self, student_feat: Tensor, teacher_feat: Tensor, boxes: list[Tensor] | None,
               image_size: tuple[int, int] | None, per_position: bool) -> Tensor:
        """The loss's formula, summed over everything, or over channels only with `per_position`."""
        raise NotImplementedError


def _total(terms: Tensor, per_position: bool) -> Tensor:
    """Sum (N, C, H, W) terms over everything, or over channels only -> (N, H, W)."""
    return terms.sum(dim=1) if per_position else terms.sum()


def _non_negative(owner: str, **values: float) -> None:
    for key, value in values.items():
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"{owner}: {key} must be >= 0, got {value}")


def _positive(owner: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{owner}: {key} must be > 0, got {value}")


class MGDLoss(_FeatureLoss):
    """Masked Generative Distillation (MGD).

    Paper: Zhendong Yang, Zhe Li, Mingqi Shao, Dachuan Shi, Zehuan Yuan, Chun Yuan, "Masked Generative
    Distillation", ECCV 2022, arXiv:2205.01529. Released with the Progressive Distillation code (PAPER.md).

    Formula, with S the (adapted) student map (N, C, H, W) and T the teacher map::

        M[n, 0, h, w] = 0 if u[n, 0, h, w] > 1 - lambda_mgd else 1,   u ~ U[0, 1)   (one mask per image,
                                                                                    shared by all channels)
        G(x) = conv3x3(ReLU(conv3x3(x)))                                            (C -> C -> C)
        loss = alpha_mgd * sum((G(S * M) - T) ** 2) / N

    The mask is drawn on the CPU with one `torch.rand((N, 1, H, W))` call from the CPU `torch.Generator` set
    as the attribute `generator` (in training, the `pkdkit.distill.Distiller`'s, seeded at every step from the
    run's seed and the step; None: torch's global CPU RNG) and then moved to the features' device, as the
    authors' code does: the same seed gives the same mask on CPU and on CUDA. The authors
    zero positions where u > 1 - lambda (the brief's "u < lambda" has the same law); we keep their
    comparison so the same seed gives the same mask as their code.

    Defaults: alpha_mgd = 2e-5, lambda_mgd = 0.65, from the authors' RetinaNet config
    yzd-v/MGD `det/configs/distillers/mgd/retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py`
    (also the values of the Progressive Distillation release, PAPER.md). Two-stage detectors use
    alpha_mgd = 5e-7, lambda_mgd = 0.45 on P2-P5 (`LOSS_DEFAULTS`).
    """

    def __init__(self, student_channels: int, teacher_channels: int, alpha_mgd: float = 2e-5,
                 lambda_mgd: float = 0.65):
        super().__init__(student_channels, teacher_channels)
        self.alpha_mgd, self.lambda_mgd = float(alpha_mgd), float(lambda_mgd)
        _non_negative("MGDLoss", alpha_mgd=self.alpha_mgd)
        if not 0.0 <= self.lambda_mgd < 1.0:
            raise ValueError(f"MGDLoss: lambda_mgd is the masked fraction, expected in [0, 1), got {lambda_mgd}")
        c = teacher_channels
        self.generation = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True),
                                        nn.Conv2d(c, c, 3, padding=1))
        self.generator: torch.Generator | None = None

    def _terms(self, student_feat: Tensor, teacher_feat: Tensor, boxes: list[Tensor] | None,
               image_size: tuple[int, int] | None, per_position: bool) -> Tensor:
        generated, teacher, _ = self.generate(student_feat, teacher_feat)
        return self.alpha_mgd * _total((generated - teacher) ** 2, per_position) / teacher.shape[0]

    def generate(self, student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(G(S * M), T, M): the map generated from the masked, adapted student (N, C, H, W), the detached
        teacher (N, C, H, W) and the mask drawn (N, 1, H, W), one new draw per call (`keep_mask`)."""
        student, teacher = self.prepare(student_feat, teacher_feat)
        keep = self.keep_mask(student)
        return self.generation(student * keep), teacher, keep

    def keep_mask(self, feat: Tensor) -> Tensor:
        """The random spatial mask M for a map (N, C, H, W): (N, 1, H, W), 1 = kept, 0 = masked.
        One `torch.rand` draw on the CPU from `self.generator` (or torch's global CPU RNG), then moved to the
        features' device, so the mask does not depend on where the model runs."""
        n, _, h, w = feat.shape
        u = torch.rand((n, 1, h, w), generator=self.generator)
        return (u <= 1.0 - self.lambda_mgd).to(device=feat.device, dtype=feat.dtype)


def fgd_masks(boxes: Sequence[Tensor], image_size: tuple[int, int], feat_size: tuple[int, int],
              ) -> tuple[Tensor, Tensor]:
    """FGD's scaled foreground and background masks on one feature map.

    boxes: N tensors (K_i, 4), xyxy in pixels of the padded input batch of size `image_size` (H_in, W_in);
    feat_size: (H, W) of the feature map. Returns (mask_fg, mask_bg), each (N, H, W), on the boxes' device.

    A box is mapped onto the map by the ratio (x * W / W_in, y * H / H_in) and covers the cells
    floor(x1)..ceil(x2) and floor(y1)..ceil(y2), both ends included and clipped to the map, as in the
    authors' code. Its cells get 1 / (number of cells of that range before clipping); a cell in several
    boxes keeps the largest value, i.e. the smallest box, as the paper prescribes. Background cells (no box)
    get 1 / (number of background cells of the image); an image with no background gets all zeros.
    """
    h_in, w_in = image_size
    h, w = feat_size
    fg_masks, bg_masks = [], []
    for b in boxes:
        b = b.detach().to(torch.float32)
        rows = torch.arange(h, device=b.device).view(1, h, 1)
        cols = torch.arange(w, device=b.device).view(1, 1, w)
        x1 = torch.floor(b[:, 0] * w / w_in).view(-1, 1, 1)
        x2 = torch.ceil(b[:, 2] * w / w_in).view(-1, 1, 1)
        y1 = torch.floor(b[:, 1] * h / h_in).view(-1, 1, 1)
        y2 = torch.ceil(b[:, 3] * h / h_in).view(-1, 1, 1)
        scale = 1.0 / ((y2 - y1 + 1) * (x2 - x1 + 1))  # (K, 1, 1)
        inside = (rows >= y1) & (rows <= y2) & (cols >= x1) & (cols <= x2)  # (K, H, W)
        fg = torch.where(inside, scale, 0.0).amax(dim=0) if len(b) else torch.zeros(h, w, device=b.device)
        bg = (fg == 0).to(torch.float32)
        fg_masks.append(fg)
        bg_masks.append(bg / bg.sum().clamp(min=1.0))
    return torch.stack(fg_masks), torch.stack(bg_masks)


class GcBlock(nn.Module):
    """Global context block (Cao et al., GCNet, 2019) as FGD uses it for its relation loss.

    x: (N, C, H, W) -> x + transform(context(x)), where context(x) = sum_j softmax_j(conv1x1(x)_j) x_j is a
    (N, C, 1, 1) attention-pooled vector and transform = conv1x1 (C -> C/2) -> LayerNorm -> ReLU -> conv1x1
    (C/2 -> C). Initialised as the authors do: Kaiming-normal (fan_in) context conv, zero last conv, so
    the block starts as the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"GcBlock needs at least 2 channels (it halves them), got {channels}")
        hidden = channels // 2
        self.context_conv = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]),
                                       nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        nn.init.kaiming_normal_(self.context_conv.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_conv.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = F.softmax(self.context_conv(x).view(n, h * w), dim=1)  # (N, HW)
        context = torch.bmm(x.view(n, c, h * w), weights.unsqueeze(-1)).view(n, c, 1, 1)
        return x + self.transform(context)


def fgd_attention(feat: Tensor, temp: float) -> tuple[Tensor, Tensor]:
    """FGD attention of (N, C, H, W): spatial (N, H, W) summing to H*W, channel (N, C) summing to C."""
    n, c, h, w = feat.shape
    value = feat.abs()
    spatial = h * w * F.softmax(value.mean(dim=1).view(n, -1) / temp, dim=1).view(n, h, w)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temp, dim=1)
    return spatial, channel


class FGDLoss(_FeatureLoss):
    """Focal and Global Distillation (FGD).

    Paper: Zhendong Yang, Zhe Li, Xiaohu Jiang, Yuan Gong, Zehuan Yuan, Danpei Zhao, Chun Yuan, "Focal and
    Global Knowledge Distillation for Detectors", CVPR 2022, arXiv:2111.11837.

    With S the (adapted) student map, T the teacher map (N, C, H, W), `fgd_masks` giving the scaled
    foreground mask Mf (1/box area inside boxes) and background mask Mb (1/number of background cells),
    and attention A_s(F) = H*W * softmax_hw(mean_c |F| / temp), A_c(F) = C * softmax_c(mean_hw |F| / temp)::

        W      = A_s(T)[n, h, w] * A_c(T)[n, c]                          (teacher attention only)
        L_fg   = sum(Mf * W * (S - T) ** 2) / N
        L_bg   = sum(Mb * W * (S - T) ** 2) / N
        L_att  = (sum|A_c(S) - A_c(T)| + sum|A_s(S) - A_s(T)|) / N       (L1, "attention loss")
        L_glob = sum((GcBlock_s(S) - GcBlock_t(T)) ** 2) / N             (relation loss)
        loss   = alpha_fgd * L_fg + beta_fgd * L_bg + gamma_fgd * L_att + lambda_fgd * L_glob

    As in the authors' code there are two GcBlocks, one per side, both trained by this loss (the teacher
    *map* is constant, the teacher-side block's weights are not). `boxes` must be in the coordinates of the
    padded batch of size `image_size` (for torchvision detectors: the targets after `model.transform`).

    Padding: pkdkit maps a box onto the feature map by the size of the *padded* batch, which is where the
    box really lies on that map. The reference code divides by each image's *unpadded* size while laying the
    mask on the padded map, which shifts and stretches boxes by the padding fraction (about 7% on COCO batches
    of mixed aspect ratios). Without padding the two agree (checked numerically against a port of the
    reference, shared/PAPER.md).

    Defaults: temp = 0.5, alpha_fgd = 1e-3, beta_fgd = 5e-4, gamma_fgd = 5e-4, lambda_fgd = 5e-6, from the
    authors' RetinaNet configs yzd-v/FGD
    `configs/distillers/fgd/fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py` (same values in
    `fgd_retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco.py`); note gamma_fgd there is 5e-4 while the
    class default in their `mmdet/distillation/losses/fgd.py` is 1e-3.
    """

    def __init__(self, student_channels: int, teacher_channels: int, temp: float = 0.5,
                 alpha_fgd: float = 1e-3, beta_fgd: float = 5e-4, gamma_fgd: float = 5e-4,
                 lambda_fgd: float = 5e-6):
        super().__init__(student_channels, teacher_channels)
        self.temp = float(temp)
        self.alpha_fgd, self.beta_fgd = float(alpha_fgd), float(beta_fgd)
        self.gamma_fgd, self.lambda_fgd = float(gamma_fgd), float(lambda_fgd)
        _positive("FGDLoss", temp=self.temp)
        _non_negative("FGDLoss", alpha_fgd=self.alpha_fgd, beta_fgd=self.beta_fgd, gamma_fgd=self.gamma_fgd,
                      lambda_fgd=self.lambda_fgd)
        self.gc_student = GcBlock(teacher_channels)
        self.gc_teacher = GcBlock(teacher_channels)

    def _terms(self, student_feat: Tensor, teacher_feat: Tensor, boxes: list[Tensor] | None,
               image_size: tuple[int, int] | None, per_position: bool) -> Tensor:
        student, teacher = self.prepare(student_feat, teacher_feat)
        n, _, h, w = teacher.shape
        check_boxes(boxes, image_size, n)
        mask_fg, mask_bg = fgd_masks([b.to(teacher.device) for b in boxes], image_size, (h, w))
        spatial_t, channel_t = fgd_attention(teacher, self.temp)

        # alpha_fgd * L_fg + beta_fgd * L_bg: the focal terms, one weight per position
        sq_err = (student - teacher) ** 2 * spatial_t.unsqueeze(1) * channel_t[:, :, None, None]
        focal = _total(sq_err * (self.alpha_fgd * mask_fg + self.beta_fgd * mask_bg).unsqueeze(1), per_position) / n
        if per_position:
            return focal
        spatial_s, channel_s = fgd_attention(student, self.temp)
        attention_loss = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n
        global_loss = F.mse_loss(self.gc_student(student), self.gc_teacher(teacher), reduction="sum") / n
        return focal + self.gamma_fgd * attention_loss + self.lambda_fgd * global_loss


def check_boxes(boxes: list[Tensor] | None, image_size: tuple[int, int] | None, n: int) -> None:
    """FGD's inputs: one (K, 4) xyxy box tensor per image of the batch and the padded batch size (H, W)."""
    if boxes is None:
        raise ValueError("FGDLoss needs the ground-truth boxes: pass boxes=[Tensor (K, 4) xyxy, one per image]")
    if len(boxes) != n:
        raise ValueError(f"FGDLoss: got boxes for {len(boxes)} images, but the feature batch has N={n}")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"FGDLoss: boxes[{i}] must have shape (K, 4) xyxy, got {tuple(b.shape)}")
    if image_size is None or len(image_size) != 2 or not all(int(s) > 0 for s in image_size):
        raise ValueError("FGDLoss needs image_size=(H_in, W_in), the size of the padded input batch the boxes "
                         f"are given in; got {image_size!r}")


class PKDLoss(_FeatureLoss):
    """Pearson-correlation feature imitation (PKD).

    Paper: Weihan Cao, Yifan Zhang, Jianfei Gao, Anda Cheng, Ke Cheng, Jian Cheng, "PKD: General
    Distillation Framework for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022,
    arXiv:2207.02039.

    Each channel of S (adapted student) and of T is standardised over all of (N, H, W) together, as in the
    authors' mmrazor implementation (`PKDLoss.norm`: permute to (C, N*H*W), mean and *unbiased* std)::

        norm(F)[:, c] = (F[:, c] - mean(F[:, c])) / (std(F[:, c]) + 1e-6)
        loss = loss_weight * mean((norm(S) - norm(T)) ** 2) / 2

    which is (M-1)/M * (1 - Pearson r) averaged over channels, M = N*H*W.
    mmrazor's loss bilinearly resizes the student when spatial sizes differ (`resize_stu=True`); in pkdkit
    both maps come from the same batch, so a size mismatch is a bug and raises `ValueError` by default.
    `resize_student=True` restores mmrazor's resizing (we compare H and W; mmrazor compares H only).

    Default loss_weight = 10, from the authors' RetinaNet-X101 -> RetinaNet-R50 config
    open-mmlab/mmrazor `configs/distill/mmdet/pkd/pkd_fpn_retina_x101_retina_r50_2x_coco.py` (inherited by
    `pkd_fpn_fcos_x101_retina_r50_1x_coco.py`); their Faster R-CNN and Swin Mask R-CNN -> RetinaNet configs
    use 6 (`pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py`, `pkd_fpn_mask_rcnn_swin_retina_r50_2x_coco.py`).
    """

    eps = 1e-6

    def __init__(self, student_channels: int, teacher_channels: int, loss_weight: float = 10.0,
                 resize_student: bool = False):
        super().__init__(student_channels, teacher_channels)
        self.loss_weight = float(loss_weight)
        _non_negative("PKDLoss", loss_weight=self.loss_weight)
        if not isinstance(resize_student, bool):
            raise ValueError(f"PKDLoss: resize_student must be True or False, got {resize_student!r}")
        self.resize_student = resize_student

    def prepare(self, student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
        """As every loss does, after resizing the student to the teacher's H, W when `resize_student`."""
        if self.resize_student and student_feat.dim() == 4 and teacher_feat.dim() == 4 \
                and student_feat.shape[-2:] != teacher_feat.shape[-2:]:
            student_feat = F.interpolate(student_feat, size=teacher_feat.shape[-2:], mode="bilinear")
        return super().prepare(student_feat, teacher_feat)

    def _terms(self, student_feat: Tensor, teacher_feat: Tensor, boxes: list[Tensor] | None,
               image_size: tuple[int, int] | None, per_position: bool) -> Tensor:
        student, teacher = self.prepare(student_feat, teacher_feat)
        n, _, h, w = teacher.shape
        sq = (self.standardise(student) - self.standardise(teacher)) ** 2  # (C, N*H*W)
        total = sq.sum(dim=0).reshape(n, h, w) if per_position else sq.sum()
        return self.loss_weight * (total / sq.numel()) / 2

    def standardise(self, feat: Tensor) -> Tensor:
        """Each channel of (N, C, H, W) to zero mean, unit (unbiased) std over (N, H, W); returns (C, N*H*W)."""
        flat = feat.transpose(0, 1).reshape(feat.shape[1], -1)  # (C, N*H*W)
        flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + self.eps)
        return flat


class CWDLoss(_FeatureLoss):
    """Channel-wise distillation (CWD).

    Paper: Changyong Shu, Yifan Liu, Jianfei Gao, Zheng Yan, Chunhua Shen, "Channel-wise Knowledge
    Distillation for Dense Prediction", ICCV 2021, arXiv:2011.13256.

    Each channel of S (adapted student) and T becomes a distribution over its H*W positions::

        p(F)[n, c, :] = softmax(F[n, c].flatten() / tau)
        loss = loss_weight * tau**2 * sum_{n,c} KL(p(T)[n, c] || p(S)[n, c]) / (N * C)

    C is the teacher's channel count (the number of distributions matched). The authors' detection code
    (pppppM/mmdetection-distiller `mmdet/distillation/losses/cwd.py`) uses the cross-entropy
    -sum p(T) log p(S), which differs from the KL by the teacher's entropy, a constant: same gradients.
    mmrazor's port uses the KL; so do we, so that the loss is 0 when S == T.

    Defaults: tau = 1.0, loss_weight = 5.0, from the authors' RetinaNet config pppppM/mmdetection-distiller
    `configs/distillers/cwd/cwd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py` (mmrazor's
    `configs/distill/mmdet/cwd/cwd_fpn_retina_r101_retina_r50_1x_coco.py` uses tau = 1, loss_weight = 10).
    """

    def __init__(self, student_channels: int, teacher_channels: int, tau: float = 1.0, loss_weight: float = 5.0):
        super().__init__(student_channels, teacher_channels)
        self.tau, self.loss_weight = float(tau), float(loss_weight)
        _positive("CWDLoss", tau=self.tau)
        _non_negative("CWDLoss", loss_weight=self.loss_weight)

    def _terms(self, student_feat: Tensor, teacher_feat: Tensor, boxes: list[Tensor] | None,
               image_size: tuple[int, int] | None, per_position: bool) -> Tensor:
        student, teacher = self.prepare(student_feat, teacher_feat)
        n, c, h, w = teacher.shape
        log_p_s = F.log_softmax(student.reshape(n * c, h * w) / self.tau, dim=1)
        log_p_t = F.log_softmax(teacher.reshape(n * c, h * w) / self.tau, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).reshape(n, c, h, w)  # each position's KL term
        return self.loss_weight * self.tau ** 2 * _total(kl, per_position) / (n * c)


class MSELoss(_FeatureLoss):
    """FitNet hint loss: mean squared error between the adapted student and the teacher.

    Paper: Adriana Romero, Nicolas Ballas, Samira Ebrahimi Kahou, Antoine Chassang, Carlo Gatta, Yoshua
    Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550.

        loss = loss_weight * mean((adapter(S) - T) ** 2)

    FitNets' regressor is the 1x1 `adapter` (present only when channel counts differ). The paper has no
    detection config; loss_weight = 1.0 is a neutral default (PAPER.md's formula), to be tuned per level
    scale like the other weights.
    """

    def __init__(self, student_channels: int, teacher_channels: int, loss_weight: float = 1.0):
        super().__init__(student_channels, teacher_channels)
        self.loss_weight = float(loss_weight)
        _non_negative("MSELoss", loss_weight=self.loss_weight)

    def _terms(self, student_feat: Tensor, teacher_feat: Tensor, boxes: list[Tensor] | None,
               image_size: tuple[int, int] | None, per_position: bool) -> Tensor:
        student, teacher = self.prepare(student_feat, teacher_feat)
        return self.loss_weight * _total((student - teacher) ** 2, per_position) / student.numel()


LOSSES: dict[str, type[_FeatureLoss]] = {"mgd": MGDLoss, "fgd": FGDLoss, "pkd": PKDLoss, "cwd": CWDLoss,
                                         "mse": MSELoss}


@dataclass(frozen=True)
class LossDefaults:
    """What the authors used for one loss on one detector family: hyper-parameters, the FPN levels the loss
    is put on (pkdkit's names, `p2`..`p7`; None: every level both models have) and where they come from."""

    params: dict[str, float] = field(default_factory=dict)
    levels: tuple[str, ...] | None = None
    source: str = ""


_P3_P7 = ("p3", "p4", "p5", "p6", "p7")
_MGD_ONE_STAGE = LossDefaults(
    {"alpha_mgd": 2e-5, "lambda_mgd": 0.65}, _P3_P7,
    "yzd-v/MGD det/configs/distillers/mgd/retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py "
    "(fpn_convs.0-4 = P3-P7); the Progressive Distillation release uses the same for RetinaNet and RepPoints")
_MGD_TWO_STAGE = LossDefaults(
    {"alpha_mgd": 5e-7, "lambda_mgd": 0.45}, ("p2", "p3", "p4", "p5"),
    "yzd-v/MGD det/configs/distillers/mgd/cascade_mask_rcnn_rx101_32x4d_distill_{faster,mask}_rcnn_r50_fpn_2x_coco.py "
    "(fpn_convs.0-3 = P2-P5); the Progressive Distillation release uses the same for Mask R-CNN")
_FGD_RETINANET = LossDefaults(
    {"temp": 0.5, "alpha_fgd": 1e-3, "beta_fgd": 5e-4, "gamma_fgd": 5e-4, "lambda_fgd": 5e-6}, _P3_P7,
    "yzd-v/FGD configs/distillers/fgd/fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py (fpn_convs.0-4)")
_FGD_TWO_STAGE = LossDefaults(
    {"temp": 0.5, "alpha_fgd": 5e-5, "beta_fgd": 2.5e-5, "gamma_fgd": 5e-5, "lambda_fgd": 5e-7},
    ("p2", "p3", "p4", "p5"),
    "yzd-v/FGD configs/distillers/fgd/fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py and "
    "fgd_mask_rcnn_r101_fpn_distill_mask_rcnn_r50_fpn_2x_coco.py (fpn_convs.0-3)")
_CWD_ONE_STAGE = LossDefaults(
    {"tau": 1.0, "loss_weight": 5.0}, ("p3", "p4", "p5", "p6"),
    "pppppM/mmdetection-distiller configs/distillers/cwd/cwd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py "
    "(fpn_convs.0-3 = P3-P6)")
_PKD_ONE_STAGE = LossDefaults(
    {"loss_weight": 10.0}, ("p3", "p4", "p5", "p6"),
    "open-mmlab/mmrazor configs/distill/mmdet/pkd/pkd_fpn_retina_x101_retina_r50_2x_coco.py (neck outputs 0-3)")

# loss -> detector arch -> defaults. Where the authors published no config for an architecture, the entry
# reuses the nearest one and its `source` says so.
LOSS_DEFAULTS: dict[str, dict[str, LossDefaults]] = {
    "mgd": {"retinanet": _MGD_ONE_STAGE,
            "fcos": LossDefaults(_MGD_ONE_STAGE.params, _P3_P7, "no FCOS config published; RetinaNet's: "
                                 + _MGD_ONE_STAGE.source),
            "fasterrcnn": _MGD_TWO_STAGE, "maskrcnn": _MGD_TWO_STAGE},
    "fgd": {"retinanet": _FGD_RETINANET,
            "fcos": LossDefaults({"temp": 0.8, "alpha_fgd": 1.6e-3, "beta_fgd": 8e-4, "gamma_fgd": 8e-4,
                                  "lambda_fgd": 8e-6}, _P3_P7,
                                 "yzd-v/FGD configs/distillers/fgd/fgd_fcos_r101_distill_fcos_r50_2x_coco.py "
                                 "(fpn_convs.0-4)"),
            "fasterrcnn": _FGD_TWO_STAGE, "maskrcnn": _FGD_TWO_STAGE},
    "cwd": {"retinanet": _CWD_ONE_STAGE,
            "fcos": LossDefaults(_CWD_ONE_STAGE.params, _CWD_ONE_STAGE.levels,
                                 "no FCOS config published; RetinaNet's: " + _CWD_ONE_STAGE.source),
            **dict.fromkeys(("fasterrcnn", "maskrcnn"), LossDefaults(
                {"tau": 1.0, "loss_weight": 10.0}, ("p2", "p3", "p4", "p5", "p6"),
                "open-mmlab/mmrazor configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py "
                "(neck outputs 0-4 = P2-P6)"))},
    "pkd": {"retinanet": _PKD_ONE_STAGE,
            "fcos": LossDefaults(_PKD_ONE_STAGE.params, _PKD_ONE_STAGE.levels,
                                 "no FCOS-student config published; RetinaNet's: " + _PKD_ONE_STAGE.source),
            **dict.fromkeys(("fasterrcnn", "maskrcnn"), LossDefaults(
                {"loss_weight": 6.0}, ("p2", "p3", "p4", "p5"),
                "open-mmlab/mmrazor configs/distill/mmdet/pkd/pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py "
                "(neck outputs 0-3 = P2-P5)"))},
    "mse": dict.fromkeys(("retinanet", "fcos", "fasterrcnn", "maskrcnn"), LossDefaults(
        {"loss_weight": 1.0}, None, "FitNets has no detection config: a neutral weight on every common level")),
}


def loss_defaults(loss: str, arch: str) -> LossDefaults:
    """The authors' hyper-parameters and FPN levels of `loss` for a student of architecture `arch`
    (``"retinanet"``, ``"fcos"``, ``"fasterrcnn"``, ``"maskrcnn"``)."""
    _loss_class(loss)
    if arch not in LOSS_DEFAULTS[loss]:
        raise ValueError(f"no {loss} defaults for detector arch {arch!r}; known: {sorted(LOSS_DEFAULTS[loss])}")
    return LOSS_DEFAULTS[loss][arch]


def loss_hparams(name: str) -> dict[str, object]:
    """Hyper-parameters of the loss `name` with their defaults, e.g. {"tau": 1.0, "loss_weight": 5.0}."""
    cls = _loss_class(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, student/teacher channels
    return {p.name: p.default for p in params}


def build_loss(name: str, student_channels: int, teacher_channels: int, **hparams: object) -> nn.Module:
    """`LOSSES[name](student_channels, teacher_channels, **hparams)` with errors that list the choices.

    Raises ConfigError (a ValueError) for an unknown loss name (listing the available ones) or an unknown hyper-parameter
    (listing the accepted ones with their defaults).
    """
    accepted = loss_hparams(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        choices = ", ".join(f"{k}={v!r}" for k, v in accepted.items())
        raise ConfigError(f"loss {name!r} got unknown hyper-parameter(s) {unknown}; accepted: {choices}")
    return LOSSES[name](student_channels, teacher_channels, **hparams)


def _loss_class(name: str) -> type[_FeatureLoss]:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; available: {sorted(LOSSES)}")
    return LOSSES[name]


class HeadKDLoss(nn.Module):
    """Response (logit) distillation on a dense detector's classification outputs (RetinaNet, FCOS).

    Hinton et al., *Distilling the Knowledge in a Neural Network* (2015): soft targets at temperature T and
    a T^2 factor, in the per-class sigmoid (binary) form dense detectors use, where each anchor/location has K
    independent class probabilities instead of one softmax (the classification-head KD of General Instance
    Distillation, Dai et al., CVPR 2021, and of Focal and Global KD's head loss, Yang et al., CVPR 2022).
    Each anchor is weighted by the teacher's confidence, its highest class probability, so the many anchors
    the teacher calls background weigh little (the weighting of score-guided dense KD, e.g. Zhou et al.,
    *Dense Teacher*, ECCV 2022). With z_s, z_t the logits (N, A, K) of student and teacher::

        q = sigmoid(z_t / T),  p = sigmoid(z_s / T)
        KL(q || p) = q log(q / p) + (1 - q) log((1 - q) / (1 - p))           (per anchor and class)
        w_na = max_k sigmoid(z_t[n, a, k])                                   (teacher's confidence, T = 1)
        L = T^2 * sum_{n,a} w_na * sum_k KL(q || p)_{nak} / sum_{n,a} w_na

    L is 0 when the logits are equal and its gradient goes only into the student (the teacher is detached).
    KL is computed as BCE(z_s / T, q) - BCE(z_t / T, q), stable for any logit.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        _positive(type(self).__name__, temperature=temperature)
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """`student_logits`, `teacher_logits`: (N, A, K) classification logits of the same anchors and classes."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"head KD needs equal shapes, got student {tuple(student_logits.shape)} and teacher "
                             f"{tuple(teacher_logits.shape)}")
        t = self.temperature
        zs, zt = student_logits / t, teacher_logits.detach() / t
        q = torch.sigmoid(zt)
        kl = (F.binary_cross_entropy_with_logits(zs, q, reduction="none")
              - F.binary_cross_entropy_with_logits(zt, q, reduction="none")).sum(-1)  # (N, A)
        w = torch.sigmoid(teacher_logits.detach()).amax(-1)  # (N, A)
        return t * t * (w * kl).sum() / w.sum().clamp_min(1e-12)


HEAD_LOSSES: dict[str, type[nn.Module]] = {"kd": HeadKDLoss}
__all__ += ["HeadKDLoss", "HEAD_LOSSES"]
