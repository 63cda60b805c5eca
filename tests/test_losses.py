"""Each loss against a slow, obviously correct loop reference (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lpdseg.losses import (
    active_prototypes,
    classification_loss,
    diversity_loss,
    diversity_ramp,
    foreground_background_weights,
    similarity_loss,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- references
def ref_classification(logits, labels, weights):
    total = 0.0
    for lg, w in zip(logits, weights):
        if not w:
            continue
        s = 0.0
        for n in range(labels.shape[0]):
            for c in range(labels.shape[1]):
                p = torch.sigmoid(lg[n, c])
                y = labels[n, c]
                s = s - (y * torch.log(p) + (1 - y) * torch.log(1 - p))
        total = total + w * s / labels.numel()
    return total


def ref_diversity(a, m, labels, temperature):
    b, c, k, h, w = a.shape
    terms = []
    for n in range(b):
        for cls in range(c):
            if labels[n, cls] < 0.5:
                continue
            pixels = []
            for y in range(h):
                for x in range(w):
                    best, arg = -math.inf, None
                    for c2 in range(c):
                        if labels[n, c2] > 0.5 and m[n, c2, y, x] > best:
                            best, arg = float(m[n, c2, y, x]), c2
                    if arg == cls:
                        pixels.append((y, x))
            if not pixels:
                continue
            qs = []
            for j in range(k):
                vals = torch.stack([a[n, cls, j, y, x] for y, x in pixels]) / temperature
                qs.append(torch.softmax(vals, 0))
            for j in range(k):
                for m2 in range(j + 1, k):
                    kl1 = (qs[j] * (qs[j].log() - qs[m2].log())).sum()
                    kl2 = (qs[m2] * (qs[m2].log() - qs[j].log())).sum()
                    terms.append(torch.exp(-(kl1 + kl2)))
    return torch.stack(terms).mean()


def ref_similarity(a, logits, labels, protos, dense, delta, temperature, th_fg, th_bg, reg):
    b, c, k, h, w = a.shape
    pn = F.normalize(protos.reshape(c * k, -1), dim=-1)
    fg_terms, bg_terms = [], []
    dense_up = dense  # same spatial size in the test
    for n in range(b):
        for cls in range(c):
            if labels[n, cls] < 0.5:
                continue
            for j in range(k):
                if not a[n, cls, j].mean() > logits[n, cls]:
                    continue
                amap = a[n, cls, j]
                ahat = (amap - amap.min()) / (amap.max() - amap.min())
                bmask = (ahat >= delta * ahat.max()).float()
                wf, wb = bmask * ahat, (1 - bmask) * (1 - ahat)
                f = (dense_up[n] * wf).sum((1, 2)) / wf.sum()
                g = (dense_up[n] * wb).sum((1, 2)) / wb.sum()
                f, g = F.normalize(f, dim=0), F.normalize(g, dim=0)
                own = cls * k + j
                num = torch.exp(f @ pn[own] / temperature)
                den = sum(torch.exp(f @ pn[o] / temperature) for o in range(c * k))
                fg_terms.append(-torch.log(num / den))
                others = [torch.exp(g @ pn[o] / temperature) for o in range(c * k) if o != own]
                mean_o = sum(others) / len(others)
                bg_terms.append(
                    -torch.log(mean_o / (mean_o + torch.exp(g @ pn[own] / temperature)))
                )
    loss = th_fg * torch.stack(fg_terms).mean() + th_bg * torch.stack(bg_terms).mean()
    return loss + reg * a.mean()


# ---------------------------------------------------------------- tests
def test_classification_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 4, generator=g, requires_grad=True) for _ in range(4)]
    labels = (torch.rand(3, 4, generator=g) > 0.5).float()
    weights = (0.0, 0.1, 1.0, 1.0)
    ours = classification_loss(logits, labels, weights)
    ref = ref_classification(logits, labels, weights)
    assert torch.allclose(ours, ref, atol=1e-5)
    g1 = torch.autograd.grad(ours, logits[1:], retain_graph=True)
    g2 = torch.autograd.grad(ref, logits[1:])
    for x, y in zip(g1, g2):
        assert torch.allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_diversity_loss_matches_loop_reference(temperature):
    g = torch.Generator().manual_seed(1)
    b, c, k, h, w = 2, 3, 3, 4, 5
    a = (3 * torch.randn(b, c, k, h, w, generator=g)).requires_grad_()
    m = a.detach().mean(2)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 1]])
    ours = diversity_loss(a, m, labels, temperature)
    ref = ref_diversity(a, m, labels, temperature)
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)
    (g_ours,) = torch.autograd.grad(ours, a)
    (g_ref,) = torch.autograd.grad(ref, a)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)
    assert g_ours.abs().sum() > 0  # the regulariser really pushes the maps


def test_diversity_loss_ignores_huge_logits_outside_the_region():
    # pixels outside a class's region may score far above its region (here by 5e4): they
    # must still get q = 0 exactly, and S = Q X^T must not pick up 0 * 5e4 noise
    g = torch.Generator().manual_seed(2)
    b, c, k, h, w = 2, 3, 3, 4, 5
    base = 3 * torch.randn(b, c, k, h, w, generator=g)
    m = torch.randn(b, c, h, w, generator=g)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 1]])
    pseudo = m.masked_fill(labels[:, :, None, None] < 0.5, float("-inf")).argmax(1)
    outside = pseudo[:, None] != torch.arange(c)[None, :, None, None]  # B x C x H x W
    a = (base + 5e4 * outside[:, :, None].float()).requires_grad_()
    ours = diversity_loss(a, m, labels, 0.5)
    ref = ref_diversity(base.requires_grad_(), m, labels, 0.5)
    assert torch.isfinite(ours) and torch.allclose(ours, ref, atol=1e-5), (ours, ref)
    (g_ours,) = torch.autograd.grad(ours, a)
    (g_ref,) = torch.autograd.grad(ref, base)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


def test_diversity_hand_written_backward_passes_gradcheck():
    # the loss has its own backward (losses._JeffreyDiversity): check it against finite
    # differences in float64, with temperature != 1 and a class owning no pixel
    g = torch.Generator().manual_seed(3)
    b, c, k, h, w = 2, 3, 3, 3, 4
    a = (2 * torch.randn(b, c, k, h, w, generator=g, dtype=torch.float64)).requires_grad_()
    m = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    m[1, 0] = -10.0  # class 0 present in image 1 but owns no pixel: its row is skipped
    labels = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    assert torch.autograd.gradcheck(lambda x: diversity_loss(x, m, labels, 0.7), (a,))


def test_diversity_loss_uses_the_labelled_class_index():
    # class 1 owns all pixels; classes 0 and 2 are absent: only class 1's prototypes count
    b, c, k, h, w = 1, 3, 2, 3, 3
    a = torch.zeros(b, c, k, h, w)
    a[0, 1, 0, 0, 0] = 5.0  # class 1's prototypes attend to different pixels
    a[0, 1, 1, 2, 2] = 5.0
    a[0, 2] = 0.0  # class 2's prototypes identical (would give loss 1 if wrongly used)
    labels = torch.tensor([[0.0, 1.0, 0.0]])
    m = torch.zeros(b, c, h, w)
    loss = diversity_loss(a, m, labels)
    assert loss < 0.5


def test_diversity_lower_for_different_pixels_than_identical():
    h = w = 8
    a_same = torch.zeros(1, 1, 2, h, w)
    a_same[0, 0, :, 2, 2] = 6.0  # both prototypes peak on the same pixel
    a_diff = torch.zeros(1, 1, 2, h, w)
    a_diff[0, 0, 0, 2, 2] = 6.0
    a_diff[0, 0, 1, 6, 6] = 6.0  # different pixels
    labels = torch.ones(1, 1)
    m = torch.zeros(1, 1, h, w)
    same = diversity_loss(a_same, m, labels)
    diff = diversity_loss(a_diff, m, labels)
    assert torch.isclose(same, torch.tensor(1.0))
    assert diff < 0.1 * same


def test_diversity_gradient_nonzero_and_descends():
    torch.manual_seed(0)
    a = torch.randn(2, 2, 4, 6, 6, requires_grad=True)
    labels = torch.ones(2, 2)
    m = torch.zeros(2, 2, 6, 6)
    m[:, 1, :, 3:] = 1.0  # left half class 0, right half class 1
    opt = torch.optim.SGD([a], lr=5.0)
    first = diversity_loss(a, m, labels)
    for _ in range(20):
        loss = diversity_loss(a, m, labels)
        opt.zero_grad()
        loss.backward()
        assert a.grad.abs().sum() > 0
        opt.step()
    assert diversity_loss(a, m, labels) < 0.5 * first


def test_diversity_single_prototype_and_no_labels_are_zero():
    a = torch.randn(2, 3, 1, 4, 4, requires_grad=True)
    assert diversity_loss(a, a.mean(2), torch.ones(2, 3)) == 0
    a = torch.randn(2, 3, 2, 4, 4, requires_grad=True)
    loss = diversity_loss(a, a.mean(2), torch.zeros(2, 3))
    assert loss == 0
    loss.backward()  # still differentiable


def test_fg_bg_weights():
    a = torch.tensor([[[[[0.0, 1.0], [2.0, 4.0]]]]])  # 1x1x1x2x2
    wf, wb = foreground_background_weights(a, 0.5)
    ahat = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    b = (ahat >= 0.5).float()
    assert torch.allclose(wf[0, 0, 0], b * ahat)
    assert torch.allclose(wb[0, 0, 0], (1 - b) * (1 - ahat))


def test_active_prototypes_rule():
    a = torch.zeros(1, 2, 3, 2, 2)
    a[0, 0, 0] = 2.0
    a[0, 0, 1] = 1.0
    a[0, 1, 2] = 5.0
    logits = torch.tensor([[1.5, 0.0]])
    labels = torch.tensor([[1.0, 0.0]])  # class 1 absent -> never active
    act = active_prototypes(a, logits, labels)
    assert act.tolist() == [[[True, False, False], [False, False, False]]]


def test_similarity_feature_mode_matches_reference():
    g = torch.Generator().manual_seed(3)
    b, c, k, h, w, d = 2, 3, 2, 5, 5, 6
    a = (2 * torch.randn(b, c, k, h, w, generator=g)).requires_grad_()
    logits = a.detach().mean((3, 4)).mean(-1)  # mean merge: about half the prototypes active
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    protos = torch.randn(c, k, d, generator=g, requires_grad=True)
    dense = torch.randn(b, d, h, w, generator=g)
    kw = dict(threshold=0.5, temperature=0.5, fg_weight=1.0, bg_weight=0.5, activation_reg=5e-4)
    ours, stats = similarity_loss(
        a, logits, labels, protos, mode="feature", dense_features=dense, **kw
    )
    ref = ref_similarity(a, logits, labels, protos, dense, 0.5, 0.5, 1.0, 0.5, 5e-4)
    assert stats["n_active"] > 0
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)
    go = torch.autograd.grad(ours, [a, protos])
    gr = torch.autograd.grad(ref, [a, protos])
    for x, y in zip(go, gr):
        assert torch.allclose(x, y, atol=1e-5)
    assert go[0].abs().sum() > 0 and go[1].abs().sum() > 0


def test_similarity_image_mode_equals_feature_mode_for_linear_encoder():
    # For an encoder that is a per-pixel linear map followed by a weighted-mean pool,
    # embedding the masked image equals pooling the dense map with the same weights
    # (up to normalisation by the weight sum, which L2-normalisation removes).
    g = torch.Generator().manual_seed(4)
    b, c, k, h, w, d = 2, 2, 2, 6, 6, 5
    a = (2 * torch.randn(b, c, k, h, w, generator=g)).requires_grad_()
    logits = a.detach().mean((3, 4)).mean(-1)
    labels = torch.ones(b, c)
    protos = torch.randn(c, k, d, generator=g)
    proj = torch.randn(d, 3, generator=g)
    images = torch.rand(b, 3, h, w, generator=g)

    def embed(x):  # sum over pixels of a linear map: linear in the mask weights
        return torch.einsum("dc,bchw->bd", proj, x)

    dense = torch.einsum("dc,bchw->bdhw", proj, images)
    kw = dict(threshold=0.5, temperature=0.3)
    lf, _ = similarity_loss(a, logits, labels, protos, mode="feature", dense_features=dense, **kw)
    li, _ = similarity_loss(
        a,
        logits,
        labels,
        protos,
        mode="image",
        images=images,
        embed_images=embed,
        image_chunk=3,
        **kw,
    )
    assert torch.allclose(lf, li, atol=1e-5)


def test_diversity_ramp():
    assert diversity_ramp(0, 100, 0.5, 0.3) == 0.0
    assert diversity_ramp(15, 100, 0.5, 0.3) == pytest.approx(0.25)
    assert diversity_ramp(30, 100, 0.5, 0.3) == 0.5
    assert diversity_ramp(90, 100, 0.5, 0.3) == 0.5
    assert diversity_ramp(0, 100, 0.5, 0.0) == 0.5
