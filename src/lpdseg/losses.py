"""Losses of LPD and PBIP as pure functions (tensors in, tensors out).

docs/method.md steps 3-5:

- :func:`classification_loss` -- multi-stage BCE on GAP logits;
- :func:`active_prototypes`, :func:`foreground_background_weights`,
  :func:`similarity_loss` -- PBIP's foreground/background similarity (InfoNCE
  per active sub-prototype, averaged);
- :func:`diversity_loss` -- LPD's Jeffrey's-divergence diversity regulariser.

Everything is vectorised over batch, class and prototype; the tests compare
each function with a slow loop reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_loss(
    logits: Sequence[Tensor | None], labels: Tensor, stage_weights: Sequence[float]
) -> Tensor:
    """``L_cls = sum_i w_i * BCEWithLogits(y_hat_i, y)`` over stages with w_i > 0.

    Args:
        logits: per stage, B x C logits (``None`` allowed where w_i = 0).
        labels: B x C in {0, 1}.
        stage_weights: one weight per stage.
    """
    total = labels.new_zeros(())
    for stage_logits, weight in zip(logits, stage_weights):
        if weight:
            total = total + weight * F.binary_cross_entropy_with_logits(
                stage_logits.float(), labels.float()
            )
    return total


def diversity_loss(
    proto_maps: Tensor, class_maps: Tensor, labels: Tensor, temperature: float = 1.0
) -> Tensor:
    """Jeffrey's-divergence diversity regulariser (LPD), bounded in (0, 1].

    For image n and present class c, ``R_nc`` are the pixels whose pseudo label
    (argmax of the label-gated class maps) is c. Prototype j of c gives
    ``q_j = softmax_{p in R_nc}(A(p, c, j) / T)``; for every pair j < l,
    ``J = KL(q_j||q_l) + KL(q_l||q_j)`` and the loss is the mean of ``exp(-J)``
    over (n, c present with non-empty R_nc, j < l). All pairs of one (n, c)
    come from one matrix product: ``J = d 1^T + 1 d^T - (S + S^T)``,
    ``S = Q X^T`` with ``X = A / T`` on R_nc and ``d = diag(S)`` (docs/method.md's
    ``Q L^T`` form, with the log-normalisers cancelled).

    Args:
        proto_maps: ``A`` (B x C x k x H x W), already carrying the scale s.
        class_maps: ``M`` (B x C x H x W) used for the pseudo labels.
        labels: B x C image-level labels.
        temperature: ``T_div``.

    Returns:
        Scalar loss (0 with a zero gradient path when no pair exists, e.g. k = 1).
    """
    b, c, k, h, w = proto_maps.shape
    if k < 2:
        return proto_maps.sum() * 0.0
    present = labels > 0.5  # B x C
    gated = class_maps.detach().float().masked_fill(~present[:, :, None, None], float("-inf"))
    # argmax over a contiguous last dim: argmax over the strided class dim is ~7x slower
    pseudo = gated.permute(0, 2, 3, 1).contiguous().argmax(-1).flatten(1)  # B x P
    # Row n*C + c counts when class c is present in image n and owns at least one pixel;
    # only those rows (about half of B x C) are processed.
    owner = pseudo + c * torch.arange(b, device=pseudo.device)[:, None]  # B x P row index
    owned = torch.bincount(owner.flatten(), minlength=b * c) > 0
    rows = torch.nonzero(present.flatten() & owned).squeeze(1)
    if rows.numel() == 0:
        return proto_maps.sum() * 0.0
    region = pseudo.index_select(0, rows // c) == (rows % c)[:, None]  # V x P: R_nc
    x = proto_maps.reshape(b * c, k, h * w).index_select(0, rows)
    x = x if x.dtype == torch.float64 else x.float()
    if temperature != 1.0:
        x = x / temperature
    return _JeffreyDiversity.apply(x, region)


class _JeffreyDiversity(torch.autograd.Function):
    """mean over rows and pairs j < l of ``exp(-J(j, l))``, with a hand-written backward.

    Input ``x`` (V x k x P): ``A / T`` of the counted (n, c) rows; ``region`` (V x P):
    the pixels of each row's R_nc. Forward and backward are a handful of passes over
    ``x`` and three k x k x P products; on figure 1's shapes this is ~2.5x faster than
    autograd on the same forward (14 -> 5.5 ms on 2 cores), because autograd keeps and
    revisits every intermediate.

    Forward: ``Q = softmax_R(X)`` (0 outside R). On R, ``log q_j = x_j - lse_j`` and
    every row of Q sums to 1, so the log-normalisers cancel and
    ``J = d 1^T + 1 d^T - S - S^T`` with ``S = Q X^T``, ``d = diag(S)`` -- no log of
    0 is ever formed. Backward: with ``G = dL/dS`` (symmetric: ``G_jj = sum_l W_jl``,
    ``G_jl = -W_jl``, ``W_jl = dL/dJ_jl``), ``dL/dX = G Q + Q * (G X - r)`` where
    ``r_j = sum_l G_jl S_jl`` is the softmax's row correction.
    """

    @staticmethod
    def forward(ctx, x: Tensor, region: Tensor) -> Tensor:  # type: ignore[override]
        k = x.shape[1]
        # -inf outside R, not a large finite bias: exp of arguments below about -87
        # (float32 underflow) takes a slow path, 5-10x slower on CPU
        bias = torch.where(region, 0.0, float("-inf")).to(x.dtype)
        q = torch.softmax(x + bias[:, None, :], dim=-1)
        s = q @ x.transpose(1, 2)  # V x k x k
        d = torch.diagonal(s, dim1=-2, dim2=-1)
        jeffrey = d[:, :, None] + d[:, None, :] - s - s.transpose(1, 2)
        off_diag = ~torch.eye(k, dtype=torch.bool, device=x.device)
        e = torch.exp(-jeffrey) * off_diag  # each pair twice, diagonal excluded
        count = x.shape[0] * k * (k - 1) // 2
        ctx.save_for_backward(x, q, s, e)
        ctx.count = count
        return e.sum() / (2 * count)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, q, s, e = ctx.saved_tensors
        # dL/dJ_jl for the unordered pair {j, l}: -exp(-J)/count (both (j,l) and (l,j) hold it)
        w = -e * (grad_out / ctx.count)
        g = torch.diag_embed(w.sum(-1)) - w  # dL/dS, symmetric
        r = (g * s).sum(-1, keepdim=True)  # V x k x 1
        grad_x = torch.bmm(g, x).sub_(r).mul_(q)  # in place: no extra V x k x P buffers
        return grad_x.baddbmm_(g, q), None  # + G Q, in place


def active_prototypes(proto_maps: Tensor, class_logits: Tensor, labels: Tensor) -> Tensor:
    """Active sub-prototypes (B x C x k, bool): class present and score above the class's.

    The score of prototype (c, j) is the GAP of ``A_4(., c, j)``; it is active
    when it exceeds the merged class score ``y_hat_4(c)`` (the public code's rule).
    """
    scores = proto_maps.detach().float().mean((3, 4))  # B x C x k
    above = scores > class_logits.detach().float()[:, :, None]
    return above & (labels > 0.5)[:, :, None]


def foreground_background_weights(proto_maps: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Soft foreground and background weights of every prototype map.

    ``A_hat`` is ``A`` min-max normalised per (n, c, j) to [0, 1]; ``b = [A_hat >=
    threshold * max A_hat]``; foreground weight ``b * A_hat``, background weight
    ``(1 - b)(1 - A_hat)``. Gradients flow through ``A_hat``: this is how the
    similarity loss shapes the maps.

    Returns:
        ``(w_fg, w_bg)``, each B x C x k x H x W in [0, 1].
    """
    a = proto_maps.float()
    flat = a.flatten(3)
    lo = flat.min(-1).values[..., None, None]
    hi = flat.max(-1).values[..., None, None]
    a_hat = (a - lo) / (hi - lo).clamp_min(1e-6)
    top = a_hat.detach().flatten(3).max(-1).values[..., None, None]
    b = (a_hat.detach() >= threshold * top).to(a_hat.dtype)
    return b * a_hat, (1 - b) * (1 - a_hat)


def info_nce_fg_bg(
    fg: Tensor, bg: Tensor, own: Tensor, prototypes: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-item foreground and background InfoNCE terms.

    Args:
        fg: M x D L2-normalised foreground embeddings ``f``.
        bg: M x D L2-normalised background embeddings ``g``.
        own: M indices into the flattened prototypes (c * k + j) of each item.
        prototypes: N x D prototypes (normalised inside).
        temperature: T.

    Returns:
        ``(L_fg, L_bg)``, each of shape M:
        ``L_fg = -log(e^{f.P_own/T} / sum_o e^{f.P_o/T})`` and
        ``L_bg = -log(mean_{o != own} e^{g.P_o/T} / (mean_{o != own} e^{g.P_o/T} + e^{g.P_own/T}))``.
    """
    protos = F.normalize(prototypes.float(), dim=-1)
    n = protos.shape[0]
    s_fg = fg.float() @ protos.T / temperature  # M x N
    l_fg = F.cross_entropy(s_fg, own, reduction="none")
    s_bg = bg.float() @ protos.T / temperature  # M x N
    s_own = s_bg.gather(1, own[:, None])[:, 0]
    others = s_bg.masked_fill(F.one_hot(own, n).bool(), float("-inf"))
    log_mean_others = torch.logsumexp(others, dim=1) - math.log(max(n - 1, 1))
    l_bg = torch.logaddexp(log_mean_others, s_own) - log_mean_others
    return l_fg, l_bg


def weighted_pool(dense: Tensor, weights: Tensor) -> Tensor:
    """Masked weighted average of a dense map, L2-normalised.

    Args:
        dense: B x D x h x w encoder features.
        weights: B x N x H x W weights (resized to h x w here).

    Returns:
        B x N x D normalised embeddings.
    """
    if weights.shape[-2:] != dense.shape[-2:]:
        weights = F.interpolate(
            weights, size=dense.shape[-2:], mode="bilinear", align_corners=False
        )
    pooled = torch.einsum("bnhw,bdhw->bnd", weights, dense.float())
    pooled = pooled / weights.sum((2, 3))[..., None].clamp_min(1e-6)
    return F.normalize(pooled, dim=-1)


def similarity_loss(
    proto_maps: Tensor,
    class_logits: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    *,
    mode: str,
    dense_features: Tensor | None = None,
    images: Tensor | None = None,
    embed_images=None,
    fill: Tensor | None = None,
    threshold: float = 0.5,
    temperature: float = 0.07,
    fg_weight: float = 1.0,
    bg_weight: float = 1.0,
    activation_reg: float = 5e-4,
    image_chunk: int = 64,
) -> tuple[Tensor, dict[str, float]]:
    """Foreground/background similarity loss (PBIP's ImgMatch, kept by LPD).

    Args:
        proto_maps: stage-4 maps ``A_4`` (B x C x k x H x W).
        class_logits: stage-4 merged class scores ``y_hat_4`` (B x C).
        labels: B x C.
        prototypes: ``P`` (C x k x D) in the encoder's space.
        mode: ``feature`` (masked pooling of one dense encoder map per image)
            or ``image`` (the encoder embeds every masked image).
        dense_features: feature mode: B x D x h x w from the frozen encoder.
        images: image mode: B x 3 x H x W input images (RGB in [0, 1]).
        embed_images: image mode: callable ``(M x 3 x H x W) -> M x D`` embeddings.
        fill: image mode: colour (1 x 3 x 1 x 1) of masked-out pixels; with RGB
            inputs the model's mean colour keeps them neutral (0 after normalising).
        threshold, temperature, fg_weight, bg_weight, activation_reg: docs/method.md's
            delta, T, theta_fg, theta_bg and the 5e-4 activation penalty.
        image_chunk: image mode: masked images embedded per encoder call.

    Returns:
        ``(loss, stats)``; stats hold ``n_active``, the number of active prototypes.
    """
    b, c, k, h, w = proto_maps.shape
    active = active_prototypes(proto_maps, class_logits, labels)  # B x C x k
    reg = activation_reg * proto_maps.float().mean()
    idx = active.nonzero(as_tuple=False)  # M x 3 (n, c, j)
    if idx.shape[0] == 0:
        return reg + proto_maps.sum() * 0.0, {"n_active": 0}
    w_fg, w_bg = foreground_background_weights(proto_maps, threshold)
    own = idx[:, 1] * k + idx[:, 2]
    if mode == "feature":
        if dense_features is None:
            raise ValueError("feature mode needs dense_features")
        # one pooling per image for all C*k prototypes, then pick the active ones
        fg = weighted_pool(dense_features, w_fg.flatten(1, 2))[idx[:, 0], own]  # M x D
        bg = weighted_pool(dense_features, w_bg.flatten(1, 2))[idx[:, 0], own]
    elif mode == "image":
        if images is None or embed_images is None:
            raise ValueError("image mode needs images and embed_images")
        fg_parts, bg_parts = [], []
        for start in range(0, idx.shape[0], image_chunk):
            part = idx[start : start + image_chunk]
            imgs = images[part[:, 0]]
            size = imgs.shape[-2:]
            mfg = F.interpolate(
                w_fg[part[:, 0], part[:, 1], part[:, 2]][:, None],
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            mbg = F.interpolate(
                w_bg[part[:, 0], part[:, 1], part[:, 2]][:, None],
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            if fill is not None:  # masked-out pixels take the fill colour, not black
                mfg_imgs = mfg * imgs + (1 - mfg) * fill
                mbg_imgs = mbg * imgs + (1 - mbg) * fill
            else:
                mfg_imgs, mbg_imgs = mfg * imgs, mbg * imgs
            fg_parts.append(F.normalize(embed_images(mfg_imgs).float(), dim=-1))
            bg_parts.append(F.normalize(embed_images(mbg_imgs).float(), dim=-1))
        fg, bg = torch.cat(fg_parts), torch.cat(bg_parts)
    else:
        raise ValueError(f"unknown similarity mode {mode!r}; use 'feature' or 'image'")
    l_fg, l_bg = info_nce_fg_bg(fg, bg, own, prototypes.reshape(c * k, -1), temperature)
    loss = fg_weight * l_fg.mean() + bg_weight * l_bg.mean() + reg
    # only what needs no device sync (a shape): the training step runs this every step
    return loss, {"n_active": int(idx.shape[0])}


def diversity_ramp(step: int, total_steps: int, weight: float, warmup: float) -> float:
    """``lambda_div`` ramped linearly from 0 over the first ``warmup`` fraction of steps."""
    if warmup <= 0:
        return weight
    ramp_steps = max(1, int(round(warmup * total_steps)))
    return weight * min(1.0, step / ramp_steps)
