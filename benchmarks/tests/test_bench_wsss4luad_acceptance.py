"""benchmarks/wsss4luad_acceptance.py: paired differences and counts from a result file."""

from __future__ import annotations

from _tiny import load_script


def _run(method: str, fold: int, seed: int, last: float, best: float) -> dict:
    def score(v: float) -> dict:
        return {"mIoU": v / 100, "per_class_IoU": [0.5, 0.5, 0.1, 0.7]}

    return {
        "method": method,
        "fold": fold,
        "seed": seed,
        "scores": {"classifier": score(best), "classifier@last": score(last)},
    }


def test_pairs_are_matched_by_fold_and_seed():
    acc = load_script("wsss4luad_acceptance")
    data = {
        "runs": [
            _run("lpd", 0, 0, 50, 40),
            _run("lpd", 1, 0, 40, 45),
            _run("lpd", 2, 0, 30, 30),  # no PBIP partner: not paired
            _run("pbip", 1, 0, 42, 41),
            _run("pbip", 0, 0, 45, 44),
        ]
    }
    runs = {m: acc._runs(data, m) for m in ("lpd", "pbip")}
    mean, lead, n, diffs = acc.paired(runs["lpd"], runs["pbip"], last=True)
    assert (n, lead) == (2, 1) and diffs == [50 - 45, 40 - 42]
    assert abs(mean - 1.5) < 1e-9
    mean, lead, n, _ = acc.paired(runs["lpd"], runs["pbip"], last=False)
    assert (n, lead) == (2, 1) and abs(mean - ((40 - 44) + (45 - 41)) / 2) < 1e-9
    text = "\n".join(acc.summarise(data))
    assert "lpd - pbip: +1.5, lpd ahead in 1 of 2" in text
