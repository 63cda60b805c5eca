"""``lpdseg report RUN_DIR``: one self-contained HTML page about a training run.

The page holds the resolved config, the training curves, the test metrics
tables, a per-class confusion-matrix plot per gating mode, a grid of
image | ground truth | prediction overlays for a few test images (the run's
checkpoint on the run's data root) and per-prototype heatmaps
(``lpdseg.explain``). Every picture is a base64 ``data:`` URI and the style
is inline, so the file opens anywhere with no other file and no network.
Parts whose inputs are missing (no test metrics yet, data folder moved) are
replaced by a note saying what to run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lpdseg.errors import DataError, LpdsegError

log = logging.getLogger(__name__)

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1100px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 0.8em; overflow-x: auto;
      font-size: 0.85em; max-height: 28em; }
img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figure { margin: 0.8em 0; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #8a5a00; background: #fff6e0; padding: 0.4em 0.8em; border-radius: 4px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.grid figure { flex: 1 1 300px; }
"""


# ---------------------------------------------------------------- helpers
def png_data_uri(png: bytes) -> str:
    """PNG bytes -> ``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, caption: str) -> str:
    return (
        f'<figure><img src="{png_data_uri(png)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100.0 * float(v):.2f}"


def metrics_table_html(res: dict[str, Any]) -> str:
    """HTML table of one evaluation: per label IoU / Dice / bIoU, then the summary row."""
    names = list(res.get("class_names") or [])
    iou, dice, biou = res.get("iou", []), res.get("dice", []), res.get("biou", [])
    n = max(len(names), len(iou))
    names += [f"label {i}" for i in range(len(names), n)]

    def at(seq: Sequence, i: int) -> Any:
        return seq[i] if i < len(seq) else None

    rows = ["<tr><th>class</th><th>IoU %</th><th>Dice %</th><th>bIoU %</th></tr>"]
    for i in range(n):
        rows.append(
            f"<tr><td>{html.escape(str(names[i]))}</td><td>{_pct(at(iou, i))}</td>"
            f"<td>{_pct(at(dice, i))}</td><td>{_pct(at(biou, i))}</td></tr>"
        )
    summary = (
        f"<tr><th>mIoU %</th><th>mDice %</th><th>mbIoU %</th><th>FwIoU %</th>"
        f"<th>pixel acc %</th><th>images</th></tr><tr><td>{_pct(res.get('mIoU'))}</td>"
        f"<td>{_pct(res.get('mDice'))}</td><td>{_pct(res.get('bIoU'))}</td>"
        f"<td>{_pct(res.get('FwIoU'))}</td><td>{_pct(res.get('pixel_acc'))}</td>"
        f"<td>{res.get('images', 'n/a')}</td></tr>"
    )
    return f"<table>{''.join(rows)}</table><table>{summary}</table>"


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> bytes:
    """Row-normalised confusion matrix (rows = ground truth) with counts, as PNG bytes.

    Args:
        confusion: ``L x L`` counts, rows = ground truth, columns = prediction.
        labels: the L label names.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(labels):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(labels)} labels")
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * n, 1.3 + 0.8 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=10)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}\n({int(cm[i, j])})",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of ground-truth row")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------- sections
def _curves_section(run_dir: Path) -> str:
    curves = run_dir / "curves.png"
    if curves.is_file():
        return _img(curves.read_bytes(), "training loss terms and validation mIoU (curves.png)")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        from lpdseg.viz import plot_training_curves

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "curves.png"
            plot_training_curves(metrics, target)
            return _img(target.read_bytes(), "training loss terms and validation mIoU")
    return _note("no curves.png or metrics.jsonl in the run folder")


def _metrics_sections(run_dir: Path) -> tuple[str, str]:
    path = run_dir / "test_metrics.json"
    if not path.is_file():
        msg = _note(
            f"no {path.name}: run `lpdseg eval {run_dir / 'best.pt'} --split test` to score the run"
        )
        return msg, msg
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} cannot be read as JSON ({exc}); re-run `lpdseg eval`") from exc
    tables, plots = [], []
    # runs scored before the gates were renamed wrote "pseudo" / "predict"
    old_names = {"labels": "pseudo", "classifier": "predict"}
    for mode in ("labels", "classifier", "seg"):
        res = data.get(mode, data.get(old_names.get(mode, "")))
        if not isinstance(res, dict):
            continue
        what = {
            "labels": "label-gated (pseudo-mask quality)",
            "classifier": "classifier-gated (inference)",
            "seg": "segmentation network",
        }[mode]
        tables.append(
            f"<h3>{html.escape(mode)}: {what}</h3>{metrics_table_html(res)}"
            if res.get("iou")
            else ""
        )
        if res.get("confusion"):
            labels = list(res.get("class_names") or [])
            n = len(res["confusion"])
            labels += [f"label {i}" for i in range(len(labels), n)]
            plots.append(
                _img(
                    confusion_png(
                        res["confusion"], labels[:n], f"{data.get('split', 'test')}, {mode}"
                    ),
                    f"confusion matrix, {mode} gate: row-normalised, counts in brackets",
                )
            )
    if not tables:
        return _note(f"{path} holds no metrics"), ""
    return "".join(tables), f'<div class="grid">{"".join(plots)}</div>'


def _test_samples(cfg: Any, n: int) -> list:
    from lpdseg.data.datasets import list_split

    samples, _ = list_split(cfg.data.root, cfg.data.format, "test", skip_bad=True)
    return samples[:n]


def _overlay_and_explain_sections(run_dir: Path, n_images: int, progress: bool) -> tuple[str, str]:
    """Overlays (image | truth | prediction) and prototype heatmaps for a few test images."""
    ckpt = next((run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()), None)
    if ckpt is None:
        msg = _note(f"no best.pt or last.pt in {run_dir}")
        return msg, msg
    from lpdseg.data.datasets import read_image, read_mask
    from lpdseg.inference import Predictor
    from lpdseg.viz import png_bytes, triptych

    predictor = Predictor.from_checkpoint(ckpt)
    model, cfg = predictor.model, predictor.cfg
    names = list(cfg.data.class_names)
    colors = [list(c) for c in cfg.data.colors]
    try:
        samples = _test_samples(cfg, n_images)
    except LpdsegError as exc:
        msg = _note(f"test images of {cfg.data.root} not available ({exc})")
        return msg, msg
    if not samples:
        msg = _note(f"{cfg.data.root} has no test images")
        return msg, msg
    figures, images = [], []
    for s in samples:
        image = read_image(s.image)
        truth = read_mask(s.mask, len(names), expected_hw=image.shape[:2]) if s.mask else None
        pred = predictor.mask(image)
        k = int(math.ceil(120 / image.shape[1]))  # small patches: enlarge (nearest) to see them
        if k > 1:
            image_k, pred_k = image.repeat(k, 0).repeat(k, 1), pred.repeat(k, 0).repeat(k, 1)
            truth_k = truth.repeat(k, 0).repeat(k, 1) if truth is not None else None
        else:
            image_k, truth_k, pred_k = image, truth, pred
        panel = triptych(image_k, truth_k, pred_k, names, colors)
        png = png_bytes(panel, compress_level=9)  # smallest: the page embeds it
        figures.append(_img(png, f"{s.image.name}: image | truth | prediction"))
        images.append((s.image.name, image))
    overlays = f'<div class="grid">{"".join(figures)}</div>'

    from lpdseg.explain import explain_figure, prototype_maps

    if not hasattr(getattr(model, "head", None), "prototypes"):
        return overlays, _note(
            f"{ckpt.name} has no prototypes ({cfg.model.head} head): nothing to show"
        )
    heat = []
    for name, image in images[:2]:
        maps, probs = prototype_maps(model.cpu(), image)
        heat.append(
            _img(
                explain_figure(image, maps, probs, names),
                f"{name}: per-class, per-prototype activation maps (A_4)",
            )
        )
    return overlays, "".join(heat)


# ---------------------------------------------------------------- page
def build_report_html(run_dir: str | Path, n_images: int = 4, progress: bool = False) -> str:
    """The report page of a run folder as one HTML string.

    Args:
        run_dir: a folder written by ``lpdseg train``.
        n_images: test images shown as overlays.
        progress: show progress bars.

    Raises:
        DataError: the folder is missing or is not a run folder (no config.yaml).
    """
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise DataError(
            f"{run_dir} is not a run folder (no config.yaml); give the train.out_dir of "
            "an `lpdseg train` run, e.g. runs/lpd"
        )
    config_text = config.read_text(encoding="utf-8")
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            log.warning("%s/summary.json is not valid JSON; left out", run_dir)
    tables, confusion = _metrics_sections(run_dir)
    overlays, heatmaps = _overlay_and_explain_sections(run_dir, n_images, progress)
    facts = ""
    if summary:
        keep = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
        facts = (
            "<table>"
            + "".join(
                f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                for k, v in keep.items()
            )
            + "</table>"
        )
    title = f"lpdseg run report: {run_dir.resolve().name}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Run folder <code>{html.escape(str(run_dir.resolve()))}</code>.</p>",
        facts,
        "<h2>Training curves</h2>",
        _curves_section(run_dir),
        "<h2>Test metrics</h2>",
        tables,
        "<h2>Confusion matrices</h2>",
        confusion,
        "<h2>Predictions on test images</h2>",
        overlays,
        "<h2>Prototype heatmaps</h2>",
        heatmaps,
        "<h2>Resolved config</h2>",
        f"<pre>{html.escape(config_text)}</pre>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    n_images: int = 4,
    progress: bool = True,
) -> Path:
    """Write the self-contained HTML report of a run folder.

    Args:
        run_dir: a folder written by ``lpdseg train``.
        out: HTML file to write (default ``RUN_DIR/report.html``).
        n_images: test images shown as overlays.
        progress: show progress bars.

    Returns:
        The path written.

    Raises:
        DataError: the folder is not a run folder.
    """
    from lpdseg.io import atomic_write_text

    run_dir = Path(run_dir)
    target = Path(out) if out is not None else run_dir / "report.html"
    page = build_report_html(run_dir, n_images=n_images, progress=progress)
    atomic_write_text(target, page)
    log.info("wrote %s (%.0f KiB)", target, len(page) / 1024)
    return target
