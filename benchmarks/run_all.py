"""Run the benchmark suite (``make bench`` / ``lpdseg bench``): table + results.json.

Usage::

    python benchmarks/run_all.py [--scale bench|full|tiny] [--only 1 3] [--out PATH]

Figures (see benchmarks/README.md): 1 diversity loss, 2 similarity modes,
3 method overhead, 4 precision, 5 reference design, 6 data pipeline,
7 inference, 8 training memory. One failing figure is recorded with its error
and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import RESULTS, SCALES, machine_info, markdown_table, write_json  # noqa: E402

# run order: figure 5 reuses figure 2's interleaved steps, figure 6 figure 3's LPD step
MODULES = {
    1: "bench_diversity",
    2: "bench_similarity",
    5: "bench_reference",
    3: "bench_overhead",
    4: "bench_precision",
    6: "bench_data",
    7: "bench_inference",
    8: "bench_memory",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="bench")
    parser.add_argument("--only", type=int, nargs="+", default=None, help="figure numbers")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default: benchmarks/results/results.json)",
    )
    args = parser.parse_args(argv)
    import torch

    scale = SCALES[args.scale]
    out = args.out or (RESULTS if args.scale != "tiny" else None)
    info = machine_info()
    results = {
        "command": "python benchmarks/run_all.py " + " ".join(argv or sys.argv[1:]),
        "scale": args.scale,
        "machine": info,
        "torch": torch.__version__,
        "figures": [],
    }
    context: dict = {}
    t0 = time.perf_counter()
    for fig_id, module in MODULES.items():
        if args.only and fig_id not in args.only:
            continue
        print(f"[bench] figure {fig_id} ({module}) ...", flush=True)
        t = time.perf_counter()
        try:
            fig = importlib.import_module(module).run(scale, context).to_dict()
        except Exception as exc:  # record and go on: one broken figure must not hide the rest
            traceback.print_exc()
            fig = {"id": fig_id, "title": module, "error": f"{type(exc).__name__}: {exc}"}
        fig["seconds"] = round(time.perf_counter() - t, 1)
        ratio = fig.get("ratio")
        print(
            f"[bench] figure {fig_id}: ratio {ratio if ratio is None else round(ratio, 2)} "
            f"(target {fig.get('target', '-')}, met {fig.get('met')}) in {fig['seconds']} s",
            flush=True,
        )
        results["figures"].append(fig)
    results["figures"].sort(key=lambda f: f["id"])
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    table = markdown_table(results["figures"])
    results["table_markdown"] = table
    print()
    print(table)
    print(f"\ntotal {results['total_seconds']} s on {info['cpu']} ({info['cpu_count']} cores)")
    if out is not None:
        write_json(out, results)
        print(f"wrote {out}")
    return 0 if all("error" not in f for f in results["figures"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
