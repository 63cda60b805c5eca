"""lpdseg: weakly supervised segmentation of H&E tissue with learnable prototypes."""

__version__ = "0.1.0"
