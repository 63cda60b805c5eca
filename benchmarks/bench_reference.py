"""Figure 5: one LPD training step as the reference design structures it vs lpdseg's default.

Reference design (the public implementation's structure): ``image``-mode
similarity with one encoder call per masked image of every active prototype
(``image_chunk=1``) and the per-image/per-class/per-pair diversity loop of
figure 1. lpdseg's default: ``feature``-mode similarity and the vectorised
diversity loss. Both are full :meth:`Trainer.train_step` calls on the same
batch; the measurement is shared with figure 2 (``bench_similarity``), whose
interleaved run includes this side.
"""

from __future__ import annotations

import time

from bench_similarity import measure_steps
from common import Figure, Scale, side


def run(scale: Scale, context: dict | None = None) -> Figure:
    """Figure 5 from figure 2's measurement when present, else measured here."""
    t_start = time.perf_counter()
    res = (context or {}).get("similarity_steps") or measure_steps(scale)
    times = res["times"]
    fig = Figure(
        id=5,
        title="reference design step vs lpdseg default",
        setting={
            **res["setting"],
            "reference": "image mode, 1 encoder call per masked image, looped diversity",
            "lpdseg": "feature mode, vectorised diversity",
        },
        sides={"reference": side(times["reference"]), "lpdseg": side(times["feature"])},
        ratio_meaning="x faster",
        target=">= 5x",
    )
    fig.ratio = fig.sides["reference"]["median_s"] / fig.sides["lpdseg"]["median_s"]
    fig.met = fig.ratio >= 5
    fig.extra["image_mode_batched_s"] = side(times["image"])
    fig.notes.append(
        f"shared interleaved run with figure 2; n_active = {res['n_active']} at initialisation"
    )
    fig.seconds = time.perf_counter() - t_start
    return fig


if __name__ == "__main__":
    import json

    from common import SCALES

    print(json.dumps(run(SCALES["bench"]).to_dict(), indent=2))
