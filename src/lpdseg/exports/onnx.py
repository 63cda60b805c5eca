"""Models for other runtimes: a checkpoint's whole scoring path as one ONNX graph.

:func:`export_onnx` (``lpdseg export CKPT model.onnx``) writes the path from RGB
tiles to label scores that :class:`lpdseg.inference.Predictor` runs for the
classifier gate without test-time augmentation, i.e. the numbers of
``predict_scores(model, tiles, cfg.eval, gate="classifier", tta=False)``: the
network (it normalises its own input), stage-map fusion, the classifier gate
(``eval.cls_threshold``), the background channel and, with
``eval.glass_background``, the white-glass rule. Stage-2 networks export their
softmax (and the glass rule).

The graph takes ``images``: float32 RGB in [0, 1], ``N x 3 x tile x tile``
(NCHW; the batch ``N`` is dynamic, the tile side fixed at export) and returns
``scores``: float32 ``N x (C + 1) x tile x tile``, the C classes then
background; the argmax over channels is the mask. Prototype and CAM models
also return, from the same forward pass, ``raw_0``, ``raw_1``, ...: the
network outputs behind seamless slide scoring (``decode.raw_outputs``: the raw
class maps of each fused stage, then the stage-4 per-pixel logit inputs, at
their own resolution), with the head's gate values (``GateHead``) in the
metadata, so ``lpdseg slide`` stitches and decides an ONNX model's maps over
the whole slide exactly as a checkpoint's. Everything a runtime needs
to use it travels in the model's ``metadata_props`` (keys ``lpdseg.*``, values
are strings, lists as JSON): class names, colours, tile size, the input and
output conventions, the gate settings, ``data.mpp`` when the config has one,
the checkpoint and the lpdseg version.

:class:`OnnxPredictor` runs such a file with onnxruntime behind the same
callable + properties as ``Predictor`` (tiles in, scores out).

The exporter is torch's ``torch.export``-based one (``dynamo=True``, needs
``onnx`` and ``onnxscript``), opset :data:`OPSET`; running needs
``onnxruntime``. All come with ``pip install 'lpdseg[onnx]'`` and are imported
only when used.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import lpdseg
from lpdseg.config import Config, EvalConfig
from lpdseg.errors import LpdsegError
from lpdseg.inference import load_model
from lpdseg.inference.predictor import gate_window_px
from lpdseg.io import atomic_write_bytes, dumps_strict
from lpdseg.models.decode import (
    GateHead,
    SeamlessDecoder,
    needed_stages,
    predict_scores,
    raw_outputs,
    slide_layout,
    stitchable_maps,
    view_scores,
)
from lpdseg.models.lpd import WSSSModel

log = logging.getLogger(__name__)

__all__ = [
    "INPUT_NAME",
    "INSTALL_HINT",
    "META_PREFIX",
    "OPSET",
    "OUTPUT_NAME",
    "OnnxError",
    "OnnxPredictor",
    "ScoringGraph",
    "export_model",
    "export_onnx",
    "onnx_metadata",
]

#: ONNX opset of the exported graphs (onnxruntime >= 1.14 runs opset 18).
OPSET = 18
#: Name of the graph's input (``N x 3 x tile x tile`` float32 RGB in [0, 1]).
INPUT_NAME = "images"
#: Name of the graph's output (``N x (C + 1) x tile x tile`` float32, background last).
OUTPUT_NAME = "scores"
#: Prefix of every metadata key lpdseg writes.
META_PREFIX = "lpdseg."
#: Version of the metadata layout (``lpdseg.format``).
META_FORMAT = "1"
INSTALL_HINT = "pip install 'lpdseg[onnx]'"

_INPUT_DOC = "images: RGB in [0, 1], NCHW float32, N x 3 x tile x tile (N dynamic)"
_OUTPUT_DOC = (
    "scores: N x (C + 1) x tile x tile float32, the C classes (class_names order) then "
    "background last; argmax over channels = mask (background = C)"
)


class OnnxError(LpdsegError):
    """An ONNX export or model cannot be written, read or run (missing package, bad file)."""


class _MissingDependency(OnnxError, ImportError):
    """An optional ONNX package is not installed."""


def _require(module: str, purpose: str) -> Any:
    """Import ``module`` or raise an error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _MissingDependency(
            f"{purpose} needs the Python package {module!r}, which is not installed "
            f"({exc}); install it with: {INSTALL_HINT}"
        ) from None


# ------------------------------------------------------------------ the graph
class ScoringGraph(nn.Module):
    """RGB tiles -> label scores, the module that is exported.

    ``forward(images)`` is ``predict_scores(model, images, eval_cfg,
    gate="classifier", tta=False)`` itself (no re-implementation, so the graph
    cannot drift from PyTorch inference).

    Args:
        model: a loaded model (WSSSModel or stage-2 network), put in eval mode.
        eval_cfg: the ``eval`` settings baked into the graph (fuse weights,
            threshold, background exponent, glass rule, gate window).
    """

    def __init__(self, model: nn.Module, eval_cfg: EvalConfig) -> None:
        super().__init__()
        self.model = model.eval()
        self.eval_cfg = eval_cfg
        #: prototype / CAM models also give the raw outputs of seamless slide scoring
        self.raw = isinstance(model, WSSSModel)

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, ...]:
        if not self.raw:
            return predict_scores(self.model, images, self.eval_cfg, gate="classifier", tta=False)
        cfg = self.eval_cfg
        stages = needed_stages(cfg.fuse_weights)
        out = self.model(images, stages=stages, inference_merge=cfg.inference_merge)
        # one forward for both: view_scores equals predict_scores(tta=False) (tested)
        return (view_scores(self.model, out, images, cfg), *raw_outputs(self.model, out, cfg))

    def raw_names(self) -> list[str]:
        """Names of the raw outputs (``raw_0``, ...; none for stage-2 networks)."""
        if not self.raw:
            return []
        return [f"raw_{i}" for i in range(len(slide_layout(self.model, self.eval_cfg).stages) + 1)]


# ------------------------------------------------------------------ metadata
def onnx_metadata(
    cfg: Config,
    tile: int,
    checkpoint: str | Path | None = None,
    gate_head: GateHead | None = None,
    raw_names: list[str] | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` of an export (``lpdseg.*`` keys, string values).

    ``tile`` is the graph's input side; ``eval`` is the run's whole ``eval``
    section as JSON (its own ``tile`` is the checkpoint's default, which
    ``--tile`` may have overridden); ``mpp`` only when ``cfg.data`` has one.
    With ``gate_head`` and ``raw_names`` (prototype / CAM models), what seamless
    slide scoring needs: the raw output names, the head's gate values and the
    gate's field (``eval.gate_window``, else the training crop).
    """
    names = list(cfg.data.class_names or [])
    colors = [[int(v) for v in c[:3]] for c in (cfg.data.colors or [])]
    meta = {
        "format": META_FORMAT,
        "version": lpdseg.__version__,
        "checkpoint": "" if checkpoint is None else str(checkpoint),
        "class_names": dumps_strict(names),
        "colors": dumps_strict(colors),
        "num_labels": str(len(names) + 1),
        "tile": str(int(tile)),
        "input": _INPUT_DOC,
        "input_name": INPUT_NAME,
        "output": _OUTPUT_DOC,
        "output_name": OUTPUT_NAME,
        "head": str(cfg.model.head) if cfg.train.task != "seg" else "segnet",
        "gate": "classifier",
        "tta": "false",
        "cls_threshold": repr(float(cfg.eval.cls_threshold)),
        "glass_background": dumps_strict(bool(cfg.eval.glass_background)),
        "eval": dumps_strict(_plain(cfg.eval.__dict__)),
    }
    mpp = getattr(cfg.data, "mpp", None)
    if mpp is not None:
        meta["mpp"] = dumps_strict(_plain(mpp))
    if gate_head is not None and raw_names:
        meta["raw_outputs"] = dumps_strict(list(raw_names))
        meta["gate_head"] = dumps_strict(gate_head.to_dict())
        meta["gate_window_px"] = str(gate_window_px(cfg.eval, cfg))
    return {META_PREFIX + k: v for k, v in meta.items()}


def _plain(obj: Any) -> Any:
    """JSON-ready copy of config values (tuples -> lists, numpy scalars -> numbers)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item()
    return obj


# ------------------------------------------------------------------ export
@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (optimiser INFO lines, its own deprecations).

    Its warnings that concern the model (e.g. a traced branch) still show.
    """
    levels = {
        "onnxscript": logging.WARNING,
        "onnx_ir": logging.WARNING,
        "torch.onnx": logging.ERROR,
    }
    saved = {name: logging.getLogger(name).level for name in levels}
    try:
        for name, level in levels.items():
            if logging.getLogger(name).getEffectiveLevel() < level:
                logging.getLogger(name).setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _check_target(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise OnnxError(f"{out} is a folder; give the path of the .onnx file to write")
    if out.exists() and not overwrite:
        raise OnnxError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")


def export_model(
    model: nn.Module,
    cfg: Config,
    out: str | Path,
    *,
    tile: int | None = None,
    overwrite: bool = False,
    checkpoint: str | Path | None = None,
    opset: int = OPSET,
) -> Path:
    """Export a loaded model's scoring path (classifier gate, no TTA) to ``out``.

    Args:
        model: the model (moved to the CPU for export; left in eval mode).
        cfg: its config (class names, colours, ``eval`` settings baked into the graph).
        out: the ``.onnx`` file, written atomically.
        tile: the fixed tile side of the graph's input (default ``cfg.eval.tile``).
        overwrite: replace an existing ``out`` (else refused).
        checkpoint: recorded in the metadata (where the weights came from).
        opset: ONNX opset.

    Returns:
        ``out``.

    Raises:
        OnnxError: ``out`` exists without ``overwrite``, a package is missing,
            the tile is out of range or the export fails.
    """
    out = Path(out)
    _check_target(out, overwrite)
    _require("onnx", "exporting to ONNX")
    _require("onnxscript", "exporting to ONNX")
    tile = int(cfg.eval.tile if tile is None else tile)
    min_side = getattr(getattr(model, "backbone", None), "min_input_size", 16)
    if not min_side <= tile <= 4096:
        raise OnnxError(f"tile {tile} px is outside [{min_side}, 4096] for this model")

    model = model.to("cpu").eval()
    graph = ScoringGraph(model, cfg.eval).eval()
    example = torch.rand(2, 3, tile, tile, generator=torch.Generator().manual_seed(0))
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME, *graph.raw_names()],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter's own errors have no common base class
        raise OnnxError(f"the ONNX export of {checkpoint or 'the model'} failed: {exc}") from exc
    proto = program.model_proto
    head = GateHead.of(model) if graph.raw else None
    meta = onnx_metadata(cfg, tile, checkpoint, head, graph.raw_names())
    kept = [p for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    for entry in kept:
        proto.metadata_props.add(key=entry.key, value=entry.value)
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"lpdseg {lpdseg.__version__} scoring graph. {_INPUT_DOC}. {_OUTPUT_DOC}."
    data = proto.SerializeToString()  # < 2 GiB: every lpdseg backbone is far below
    _check_target(out, overwrite)  # the export took a while: it may have appeared since
    atomic_write_bytes(out, data)
    log.info("wrote %s (%.1f MiB, opset %d, tile %d)", out, len(data) / 2**20, opset, tile)
    return out


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tile: int | None = None,
    overwrite: bool = False,
    opset: int = OPSET,
) -> Path:
    """Load ``checkpoint`` and export its scoring path to ``out`` (see :func:`export_model`).

    Raises:
        CheckpointError: the checkpoint is missing or unusable.
        OnnxError: see :func:`export_model`.
    """
    out = Path(out)
    _check_target(out, overwrite)  # before the (slow) load
    model, cfg = load_model(checkpoint, "cpu")
    return export_model(
        model,
        cfg,
        out,
        tile=tile,
        overwrite=overwrite,
        checkpoint=Path(checkpoint).resolve(),
        opset=opset,
    )


# ------------------------------------------------------------------ running
class OnnxPredictor:
    """An exported model run by onnxruntime, in place of :class:`lpdseg.inference.Predictor`.

    Callable on RGB tiles like ``Predictor`` (tiles must be ``tile x tile``, the
    graph's fixed size); the gate is the classifier's, without TTA, as exported.

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx`.
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (default: onnxruntime's choice).

    Raises:
        OnnxError: onnxruntime is missing, the file is missing or unreadable,
            or it is not an lpdseg export.
    """

    gate = "classifier"
    tta = False

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None
    ) -> None:
        ort = _require("onnxruntime", "running an ONNX model")
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxError(
                f"ONNX model {self.path} does not exist; write one with `lpdseg export`"
            )
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own, unrelated classes
            raise OnnxError(f"{self.path} is not a readable ONNX model: {exc}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = {
            k[len(META_PREFIX) :]: v for k, v in props.items() if k.startswith(META_PREFIX)
        }
        missing = [k for k in ("class_names", "tile") if k not in self.metadata]
        if missing:
            raise OnnxError(
                f"{self.path} is not an lpdseg export (no {', '.join(META_PREFIX + k for k in missing)}"
                " in its metadata); write it with `lpdseg export`"
            )
        self._input = self.metadata.get("input_name", self.session.get_inputs()[0].name)
        self._output = self.metadata.get("output_name", self.session.get_outputs()[0].name)
        self._raw = list(json.loads(self.metadata.get("raw_outputs", "[]")))
        self.device = torch.device("cpu")  # where its outputs land (the decoder runs there)

    @property
    def class_names(self) -> list[str]:
        return list(json.loads(self.metadata["class_names"]))

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        return [tuple(int(v) for v in c[:3]) for c in json.loads(self.metadata.get("colors", "[]"))]

    @property
    def num_labels(self) -> int:
        """Classes + background."""
        return len(self.class_names) + 1

    @property
    def tile(self) -> int:
        """The fixed tile side of the graph's input."""
        return int(self.metadata["tile"])

    @property
    def mpp(self) -> Any:
        """``data.mpp`` of the run's config, when it had one (else None)."""
        raw = self.metadata.get("mpp")
        return None if raw is None else json.loads(raw)

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("cls_threshold", "nan"))

    def _check_tiles(self, tiles: Tensor) -> np.ndarray:
        t = self.tile
        if tiles.ndim != 4 or tuple(tiles.shape[1:]) != (3, t, t):
            raise ValueError(
                f"tiles must be B x 3 x {t} x {t} (the export's fixed tile size), got "
                f"{tuple(tiles.shape)}; export again with `lpdseg export --tile N` for another size"
            )
        return np.ascontiguousarray(tiles.detach().to("cpu", torch.float32).numpy())

    def __call__(self, tiles: Tensor, labels: Tensor | None = None) -> Tensor:
        """RGB tiles in [0, 1] (B x 3 x tile x tile) -> label scores (B x L x tile x tile), CPU.

        Raises:
            ValueError: ``labels`` given (the graph has the classifier gate), or
                tiles of another shape than the graph's.
        """
        if labels is not None:
            raise ValueError(
                "ONNX exports use the classifier gate; the labels gate needs the PyTorch Predictor"
            )
        x = self._check_tiles(tiles)
        if tiles.shape[0] == 0:
            return torch.zeros(0, self.num_labels, self.tile, self.tile)
        (scores,) = self.session.run([self._output], {self._input: x})
        return torch.from_numpy(scores)

    # ------------------------------------------------------------ seamless slide scoring
    @property
    def supports_seamless(self) -> bool:
        """Whether the export has the raw outputs of seamless slide scoring (prototype /
        CAM models exported by this version; stage-2 networks and older exports: no)."""
        return bool(self._raw) and "gate_head" in self.metadata

    @functools.cached_property
    def eval_cfg(self) -> EvalConfig:
        """The run's ``eval`` settings, from the metadata."""
        known = set(EvalConfig.__dataclass_fields__)
        saved = json.loads(self.metadata.get("eval", "{}"))
        return EvalConfig(**{k: v for k, v in saved.items() if k in known})

    @functools.cached_property
    def gate_head(self) -> GateHead:
        return GateHead.from_dict(json.loads(self.metadata["gate_head"]))

    @property
    def slide_channels(self) -> int:
        """K, channels of :meth:`slide_raw` (``decode.SlideLayout``)."""
        return slide_layout(self.gate_head, self.eval_cfg).channels

    @property
    def gate_window_px(self) -> int:
        """Side (model input px) of the field the slide gate pools."""
        return int(self.metadata["gate_window_px"])

    def slide_raw(self, tiles: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """RGB tiles (B x 3 x tile x tile) -> stitchable raw maps (B x K x h x w), as
        ``Predictor.slide_raw`` gives them (``decode.stitchable_maps`` on the raw outputs)."""
        x = self._check_tiles(tiles)
        outputs = [torch.from_numpy(o) for o in self.session.run(self._raw, {self._input: x})]
        images = torch.from_numpy(x)
        return stitchable_maps(images, self.eval_cfg, False, lambda v, s: (outputs, []), size)

    def seamless_decoder(self, window: int) -> SeamlessDecoder:
        """The decoder of a stitched canvas (``Predictor.seamless_decoder``)."""
        return SeamlessDecoder(self.gate_head, self.eval_cfg, window)
