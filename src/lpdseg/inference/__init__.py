"""Using a trained checkpoint: load it anywhere, predict, score, make pseudo masks.

- :func:`load_model` (``loading``): a self-contained checkpoint -> model + config;
- :class:`Predictor` (``predictor``): RGB images of any size -> scores / masks;
- :func:`evaluate_checkpoint` (``evaluation``): a checkpoint's metrics on a split;
- :func:`write_pseudo_masks` (``pseudo``): stage-1 masks for stage-2 training.
"""

from lpdseg.inference.evaluation import evaluate_checkpoint
from lpdseg.inference.loading import load_model, resolve_device
from lpdseg.inference.predictor import Predictor
from lpdseg.inference.pseudo import write_pseudo_masks

__all__ = ["Predictor", "evaluate_checkpoint", "load_model", "resolve_device", "write_pseudo_masks"]
