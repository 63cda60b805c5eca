"""Figure 1: the vectorised diversity loss vs a per-image/per-class/per-pair loop.

The loop is the reference implementation's design, written here with tensor
operations inside the loops (pseudo labels by one argmax per image, one
softmax per prototype, one pair of KL terms per prototype pair), so it is a
fair "straightforward" loop, not a per-pixel one. Both sides run forward +
backward on the same inputs; the benchmark also checks they agree.
"""

from __future__ import annotations

import time

import torch
from common import Figure, Scale, side, time_interleaved


def looped_diversity(
    proto_maps: torch.Tensor, class_maps: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Jeffrey's-divergence diversity loss with Python loops over image, class and pair."""
    b, c, k, _, _ = proto_maps.shape
    terms = []
    for n in range(b):
        present = labels[n] > 0.5
        gated = class_maps[n].detach().masked_fill(~present[:, None, None], float("-inf"))
        pseudo = gated.argmax(0)
        for cls in range(c):
            if not present[cls]:
                continue
            region = pseudo == cls
            if not region.any():
                continue
            log_q = [
                torch.log_softmax(proto_maps[n, cls, j][region] / temperature, 0) for j in range(k)
            ]
            for j in range(k):
                for m in range(j + 1, k):
                    qj, qm = log_q[j].exp(), log_q[m].exp()
                    kl1 = (qj * (log_q[j] - log_q[m])).sum()
                    kl2 = (qm * (log_q[m] - log_q[j])).sum()
                    terms.append(torch.exp(-(kl1 + kl2)))
    if not terms:
        return proto_maps.sum() * 0.0
    return torch.stack(terms).mean()


def make_inputs(
    batch: int, classes: int, k: int, side_px: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random prototype maps (scaled like ``s * cos``), their class maps and labels."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, classes, k, side_px, side_px, generator=g)
    labels = (torch.rand(batch, classes, generator=g) < 0.5).float()
    labels[:, 0] = 1.0
    return a.requires_grad_(), a.detach().mean(2), labels


def run(scale: Scale, context: dict | None = None) -> Figure:
    """Time both sides (forward + backward) and return the figure."""
    from lpdseg.losses import diversity_loss

    t_start = time.perf_counter()
    b, c, k, hw = (2, 4, 4, 14) if scale.tiny else (10, 4, 10, 56)
    a, m, labels = make_inputs(b, c, k, hw)
    temperature = 1.0

    def vectorised() -> None:
        a.grad = None
        diversity_loss(a, m, labels, temperature).backward()

    def looped() -> None:
        a.grad = None
        looped_diversity(a, m, labels, temperature).backward()

    ours = diversity_loss(a, m, labels, temperature)
    ref = looped_diversity(a, m, labels, temperature)
    agree = bool(torch.allclose(ours, ref, atol=1e-5))
    # both sides are cheap (< 0.5 s), so take more repeats than the heavy figures
    times = time_interleaved(
        {"loop": looped, "vectorised": vectorised},
        repeats=max(15, scale.heavy_repeats),
        warmup=scale.warmup,
    )
    fig = Figure(
        id=1,
        title="diversity loss: vectorised vs loop",
        setting={"B": b, "C": c, "k": k, "H": hw, "W": hw, "pass": "forward+backward"},
        sides={"loop": side(times["loop"]), "vectorised": side(times["vectorised"])},
        ratio_meaning="x faster",
        target=">= 50x",
    )
    fig.ratio = fig.sides["loop"]["median_s"] / fig.sides["vectorised"]["median_s"]
    fig.met = fig.ratio >= 50
    fig.extra["values_agree"] = agree
    fig.extra["loss"] = {"vectorised": float(ours.detach()), "loop": float(ref.detach())}
    fig.seconds = time.perf_counter() - t_start
    return fig


if __name__ == "__main__":
    import json

    from common import SCALES

    print(json.dumps(run(SCALES["bench"]).to_dict(), indent=2))
