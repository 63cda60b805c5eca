"""SegFormer's Mix Transformer (MiT-B0 ... B5), the default backbone.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation
with Transformers", NeurIPS 2021. Written from the paper and the facts of the
official release (module layout, key names, hyper-parameters, init), so that
the ImageNet-1k MiT files of that release (``mit_b0.pth`` ... ``mit_b5.pth``)
load into it unchanged, with only their classifier ``head.*`` left out.

Four stages; stage i is

1. an *overlapping* patch embedding: a conv (7x7 stride 4 for stage 1, 3x3
   stride 2 after) with padding k // 2, then LayerNorm over channels;
2. ``depths[i]`` transformer blocks, each pre-norm with two residual branches:
   - *efficient self-attention*: queries from every token; keys and values
     from a ``sr x sr`` stride-``sr`` conv of the map (+ LayerNorm), which
     shrinks their number ``sr^2`` times (no conv when sr = 1, stage 4);
   - *Mix-FFN*: Linear(C -> 4C), 3x3 depthwise conv (the only positional
     cue, there is no position embedding), GELU, Linear(4C -> C);
   both branches go through stochastic depth (drop path), whose rate grows
   linearly from 0 to ``drop_path_rate`` over all blocks;
3. a final LayerNorm, then the tokens are folded back into a B x C_i x H_i x W_i map.

State-dict keys (as the release; ``{s}`` = stage 1..4, ``{j}`` = block):
``patch_embed{s}.proj`` / ``.norm``; ``block{s}.{j}.norm1``, ``.attn.q``,
``.attn.kv``, ``.attn.sr`` and ``.attn.norm`` (only where sr > 1),
``.attn.proj``, ``.norm2``, ``.mlp.fc1``, ``.mlp.dwconv.dwconv``, ``.mlp.fc2``;
``norm{s}``. ``attn.kv`` holds keys then values, each head-major
(output row = kv * C + head * C / heads + d), which the reshape in
:class:`EfficientSelfAttention` relies on.

Facts the weights depend on: LayerNorm eps is 1e-6 in the blocks and the stage
norms, but PyTorch's default 1e-5 in the patch embeddings and in ``attn.norm``;
q/kv have biases; attention scale is head_dim^-0.5; dropout rates are 0 in
every released config (so no dropout layers here, only drop path).

``last_stride`` (lpdseg's addition, docs/method.md): the stride of
``patch_embed4``'s conv. 1 keeps stage 4 at the resolution of stage 3 (strides
4, 8, 16, 16); 2 is the original (4, 8, 16, 32). The conv weights have the same
shape either way, so pretrained files load into both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpdseg.errors import CheckpointError, ConfigError
from lpdseg.models.pretrained import PretrainedCfg, pretrained_cfg

log = logging.getLogger(__name__)

BLOCK_NORM_EPS = 1e-6  # blocks' norm1/norm2 and the stage norms; patch_embed and attn.norm: 1e-5


@dataclass(frozen=True)
class MiTConfig:
    """Hyper-parameters of one MiT size (per stage, stages 1..4)."""

    embed_dims: tuple[int, int, int, int]  # channels C_i
    num_heads: tuple[int, int, int, int]  # attention heads (head dim = C_i / heads)
    depths: tuple[int, int, int, int]  # transformer blocks
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)  # Mix-FFN hidden width / C_i
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)  # key/value spatial reduction
    patch_sizes: tuple[int, int, int, int] = (7, 3, 3, 3)  # patch-embedding conv kernel
    patch_strides: tuple[int, int, int, int] = (4, 2, 2, 2)  # ... and stride (stage 4: last_stride)

    def __post_init__(self) -> None:
        for c, h in zip(self.embed_dims, self.num_heads, strict=True):
            if c % h:
                raise ConfigError(f"MiT embed dim {c} is not divisible by its {h} heads")


# The six released sizes; B2-B5 differ from B1 only in depth.
_HEADS = (1, 2, 5, 8)
_DIMS = (64, 128, 320, 512)  # B1-B5
MIT_CONFIGS: dict[str, MiTConfig] = {
    "mit_b0": MiTConfig(embed_dims=(32, 64, 160, 256), num_heads=_HEADS, depths=(2, 2, 2, 2)),
    "mit_b1": MiTConfig(embed_dims=_DIMS, num_heads=_HEADS, depths=(2, 2, 2, 2)),
    "mit_b2": MiTConfig(embed_dims=_DIMS, num_heads=_HEADS, depths=(3, 4, 6, 3)),
    "mit_b3": MiTConfig(embed_dims=_DIMS, num_heads=_HEADS, depths=(3, 4, 18, 3)),
    "mit_b4": MiTConfig(embed_dims=_DIMS, num_heads=_HEADS, depths=(3, 8, 27, 3)),
    "mit_b5": MiTConfig(embed_dims=_DIMS, num_heads=_HEADS, depths=(3, 6, 40, 3)),
}


# --------------------------------------------------------------------------- layers


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (padding k // 2), then LayerNorm."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as the release

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)  # B x C x H' x W', H' = ceil(H / stride)
        _, _, h, w = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))  # B x N x C, N = H' * W'
        return x, h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced map."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        # sr = 1 (stage 4) has neither layer, so the keys match the release files
        self.sr: nn.Conv2d | None = None
        self.norm: nn.LayerNorm | None = None
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5, as the release

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape  # n = h * w
        nh, hd = self.num_heads, c // self.num_heads
        q = self.q(x).view(b, n, nh, hd).transpose(1, 2)  # B x nh x N x hd
        if self.sr is not None:
            x = x.transpose(1, 2).reshape(b, c, h, w)
            x = self.sr(x).flatten(2).transpose(1, 2)  # B x N' x C, N' = (h // sr) * (w // sr)
            x = self.norm(x)
        kv = self.kv(x).view(b, -1, 2, nh, hd).permute(2, 0, 3, 1, 4)  # 2 x B x nh x N' x hd
        k, v = kv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # B x nh x N x hd, scale hd^-0.5
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """3x3 depthwise conv on a token sequence (module kept for the ``dwconv.dwconv`` key)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, h, w)  # B x C x h x w
        if x.is_cpu:
            # On CPUs without native bf16 (e.g. AMD EPYC) PyTorch runs a bf16/fp16 depthwise
            # conv as one slow conv per channel, 4x the whole B0 step under CPU autocast.
            # The conv is cheap, so run it in fp32 (a no-op for fp32 inputs).
            conv = self.dwconv
            with torch.autocast("cpu", enabled=False):
                y = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1, groups=c)
            y = y.to(x.dtype)
        else:
            y = self.dwconv(x)
        return y.flatten(2).transpose(1, 2)  # B x N x C


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples.

    Surviving samples are scaled by 1 / (1 - rate) so the expectation is kept;
    identity in eval mode or when ``rate`` is 0.
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # B x 1 x 1
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


# --------------------------------------------------------------------------- model


class MixTransformer(nn.Module):
    """MiT encoder returning the four stage maps.

    Attributes:
        config: the :class:`MiTConfig` it was built from.
        last_stride: stride of ``patch_embed4`` (1 or 2).
        stage_channels: C_1..C_4 (B1: 64, 128, 320, 512).
        stage_strides: output strides, (4, 8, 16, 16) or (4, 8, 16, 32).
        min_input_size: the smallest input side accepted (see :meth:`forward`).
        pretrained_cfg: where the weights came from (random until a factory
            loads a file).
    """

    def __init__(
        self,
        config: MiTConfig,
        last_stride: int = 1,
        drop_path_rate: float = 0.1,
        in_chans: int = 3,
    ) -> None:
        """Build a randomly initialised MiT.

        Args:
            config: stage hyper-parameters, e.g. ``MIT_CONFIGS["mit_b1"]``.
            last_stride: stride of stage 4's patch embedding: 1 (stage 4 at
                stride 16, docs/method.md's default) or 2 (the original stride 32).
            drop_path_rate: stochastic-depth rate of the last block (0 for the
                first, linear in between); 0.1 as the release trains with.
            in_chans: input channels.

        Raises:
            ConfigError: ``last_stride`` not 1 or 2, or a bad ``drop_path_rate``.
        """
        super().__init__()
        if last_stride not in (1, 2):
            raise ConfigError(f"MiT last_stride must be 1 or 2, got {last_stride!r}")
        self.config = config
        self.last_stride = last_stride
        c = config
        strides = (*c.patch_strides[:3], last_stride)
        self.stage_channels: tuple[int, ...] = tuple(c.embed_dims)
        self.stage_strides: tuple[int, ...] = tuple(math.prod(strides[: i + 1]) for i in range(4))
        # the sr conv (kernel = stride = sr, no padding) needs a map of at least sr x sr:
        # ceil(H / stride_i) >= sr_i  <=>  H >= stride_i * (sr_i - 1) + 1
        self.min_input_size = max(
            s * (r - 1) + 1 for s, r in zip(self.stage_strides, c.sr_ratios, strict=True)
        )
        self.pretrained_cfg = PretrainedCfg()

        in_dims = (in_chans, *c.embed_dims[:3])
        for i in range(4):
            embed = OverlapPatchEmbed(in_dims[i], c.embed_dims[i], c.patch_sizes[i], strides[i])
            blocks = nn.ModuleList(
                Block(c.embed_dims[i], c.num_heads[i], c.mlp_ratios[i], c.sr_ratios[i], 0.0)
                for _ in range(c.depths[i])
            )
            # release names: patch_embed1..4, block1..4, norm1..4
            self.add_module(f"patch_embed{i + 1}", embed)
            self.add_module(f"block{i + 1}", blocks)
            self.add_module(f"norm{i + 1}", nn.LayerNorm(c.embed_dims[i], eps=BLOCK_NORM_EPS))
        self.set_drop_path(drop_path_rate)
        self.apply(_init_weights)

    def stages(self) -> Iterator[tuple[OverlapPatchEmbed, nn.ModuleList, nn.LayerNorm]]:
        """(patch embedding, blocks, norm) of stages 1..4."""
        for i in range(1, 5):
            yield (
                getattr(self, f"patch_embed{i}"),
                getattr(self, f"block{i}"),
                getattr(self, f"norm{i}"),
            )

    def set_drop_path(self, rate: float) -> None:
        """Set the stochastic-depth rate: 0 for the first block, ``rate`` for the last.

        Raises:
            ConfigError: ``rate`` outside [0, 1).
        """
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"drop path rate must be in [0, 1), got {rate!r}")
        blocks = [blk for _, stage, _ in self.stages() for blk in stage]
        for i, blk in enumerate(blocks):  # linspace(0, rate, len(blocks)), in Python floats
            blk.drop_path.rate = rate * i / max(len(blocks) - 1, 1)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Four feature maps.

        Any input size of at least ``min_input_size`` (29 px for every
        released config) works; it need not be a multiple of 32. With the
        overlapping paddings every stride-s conv gives ``ceil(H / s)``, so stage
        i has size ``ceil(H / stage_strides[i]) x ceil(W / stage_strides[i])``:
        224 -> 56, 28, 14, 14 (last_stride 1) or 56, 28, 14, 7 (2);
        250 -> 63, 32, 16, 16 (or 8).

        Args:
            x: B x in_chans x H x W, normalised images.

        Returns:
            ``[F_1, F_2, F_3, F_4]``, F_i of shape B x C_i x H_i x W_i.

        Raises:
            ValueError: an input side below ``min_input_size``.
        """
        b, _, h, w = x.shape
        if min(h, w) < self.min_input_size:
            raise ValueError(
                f"MiT input {h}x{w} is too small: each side must be at least "
                f"{self.min_input_size} px (spatial reduction of stage 1); use 32 px or more"
            )
        feats = []
        for embed, blocks, norm in self.stages():
            x, h, w = embed(x)  # B x N x C_i, N = h * w
            for blk in blocks:
                x = blk(x, h, w)
            x = norm(x)
            x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()  # B x C_i x h x w
            feats.append(x)
        return feats


def _init_weights(m: nn.Module) -> None:
    """The release's init: trunc-normal(0.02) Linear, fan-out normal conv, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- weights


def infer_mit_variant(state: dict[str, Tensor]) -> str | None:
    """Which ``mit_b*`` a state dict belongs to (from its widths and depths), if any."""
    if "patch_embed1.proj.weight" not in state:
        return None
    dim = state["patch_embed1.proj.weight"].shape[0]
    depths = tuple(
        len({k.split(".")[1] for k in state if k.startswith(f"block{s}.")}) for s in range(1, 5)
    )
    for name, cfg in MIT_CONFIGS.items():
        if cfg.embed_dims[0] == dim and cfg.depths == depths:
            return name
    return None


def load_mit_weights(model: MixTransformer, path: str | Path, name: str = "") -> None:
    """Load a MiT weights file (official release or lpdseg) strictly, without ``head.*``.

    Args:
        model: the network.
        path: ``.pth``/``.pt``/``.bin``/``.safetensors`` file.
        name: the backbone name, for messages.

    Raises:
        CheckpointError: unreadable file, or weights that do not fit; when the
            file matches another MiT size, the message names it.
    """
    from lpdseg.models.weights import load_into, read_state_dict

    state = read_state_dict(path)
    try:
        report = load_into(model, state, strict=True, ignore_prefixes=("head.",), source=str(path))
    except CheckpointError as err:
        guess = infer_mit_variant(state)
        if guess is not None and guess != name:
            raise CheckpointError(
                f"{err} -- the file looks like {guess} weights: use backbone {guess!r}"
            ) from None
        raise
    log.info("loaded %s weights from %s (%s)", name or "MiT", path, report)


def build_mit(
    name: str,
    weights: str | Path | None = None,
    last_stride: int = 1,
    *,
    drop_path_rate: float = 0.1,
    load_weights: bool = True,
) -> MixTransformer:
    """Build a registered MiT size, random or from a local weights file.

    Args:
        name: ``"mit_b0"`` ... ``"mit_b5"``.
        weights: ``None`` for random init, or the path of a local weights
            file such as the SegFormer release's ImageNet-1k ``mit_b1.pth``
            (its ``head.*`` classifier is ignored). Inputs should then be
            normalised with ``pretrained_cfg.mean/std`` (ImageNet statistics).
        last_stride: stride of stage 4's patch embedding (1 or 2).
        drop_path_rate: stochastic-depth rate of the last block.
        load_weights: ``False`` builds the network ``weights`` describes without
            reading the file (a checkpoint supplies the weights).

    Returns:
        The backbone.

    Raises:
        ConfigError: unknown name, bad ``last_stride``, or ``weights`` that is
            not an existing local file (lpdseg downloads nothing).
        CheckpointError: the file is unreadable or does not fit this size.
    """
    if name not in MIT_CONFIGS:
        raise ConfigError(f"unknown MiT {name!r}; valid names: {', '.join(MIT_CONFIGS)}")
    model = MixTransformer(
        MIT_CONFIGS[name], last_stride=last_stride, drop_path_rate=drop_path_rate
    )
    if weights is None:
        return model
    if not load_weights:
        model.pretrained_cfg = pretrained_cfg(name, weights)
        return model
    path = Path(weights).expanduser() if isinstance(weights, (str, Path)) else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"{name} weights {weights!r}: not a local file. Only local paths are accepted "
            f"(lpdseg downloads nothing): pass the path of e.g. {name}.pth from the SegFormer "
            "release (ImageNet-1k MiT weights), or None for random init"
        )
    load_mit_weights(model, path, name)
    model.pretrained_cfg = pretrained_cfg(name, path)
    return model


def mit_b0(weights: str | Path | None = None, last_stride: int = 1, **kwargs) -> MixTransformer:
    """MiT-B0: 32-64-160-256 channels, depths 2-2-2-2 (3.3M parameters). See :func:`build_mit`."""
    return build_mit("mit_b0", weights, last_stride, **kwargs)


def mit_b1(weights: str | Path | None = None, last_stride: int = 1, **kwargs) -> MixTransformer:
    """MiT-B1: 64-128-320-512 channels, depths 2-2-2-2 (13.1M parameters). See :func:`build_mit`."""
    return build_mit("mit_b1", weights, last_stride, **kwargs)


def mit_b2(weights: str | Path | None = None, last_stride: int = 1, **kwargs) -> MixTransformer:
    """MiT-B2: 64-128-320-512 channels, depths 3-4-6-3 (24.2M parameters). See :func:`build_mit`."""
    return build_mit("mit_b2", weights, last_stride, **kwargs)


def mit_b3(weights: str | Path | None = None, last_stride: int = 1, **kwargs) -> MixTransformer:
    """MiT-B3: 64-128-320-512 channels, depths 3-4-18-3 (44.0M parameters). See :func:`build_mit`."""
    return build_mit("mit_b3", weights, last_stride, **kwargs)


def mit_b4(weights: str | Path | None = None, last_stride: int = 1, **kwargs) -> MixTransformer:
    """MiT-B4: 64-128-320-512 channels, depths 3-8-27-3 (60.8M parameters). See :func:`build_mit`."""
    return build_mit("mit_b4", weights, last_stride, **kwargs)


def mit_b5(weights: str | Path | None = None, last_stride: int = 1, **kwargs) -> MixTransformer:
    """MiT-B5: 64-128-320-512 channels, depths 3-6-40-3 (81.4M parameters). See :func:`build_mit`."""
    return build_mit("mit_b5", weights, last_stride, **kwargs)
