"""The Mix Transformer (MiT) encoder of SegFormer as a detectron2 backbone
(``MODEL.BACKBONE.NAME: "build_mit_backbone"``, keys ``MODEL.MIT.*``).

SegFormer (Xie et al., NeurIPS 2021, "SegFormer: Simple and Efficient Design for Semantic
Segmentation with Transformers"): four stages, each an overlapping patch embedding (strided
conv + LayerNorm), transformer blocks with *efficient self-attention* (keys and values from a
sequence reduced by a strided conv of ratio R) and *Mix-FFN* (MLP with a depth-wise 3x3 conv
between its two linear layers, which gives the positional information: there is no positional
embedding, so any input size works), and a LayerNorm on each stage's output.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["MixVisionTransformer", "build_mit_backbone", "MIT_PRESETS", "mit_settings"]

# embed dims, depths (blocks per stage), attention heads, sequence-reduction ratios
# (paper Table 6 / the official mit_b0..b5; MLP ratio 4 everywhere).
_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
_SR = (8, 4, 2, 1)
MIT_PRESETS: Dict[str, Dict[str, Sequence[int]]] = {
    "b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2)},
    "b1": {"embed_dims": _WIDE, "depths": (2, 2, 2, 2)},
    "b2": {"embed_dims": _WIDE, "depths": (3, 4, 6, 3)},
    "b3": {"embed_dims": _WIDE, "depths": (3, 4, 18, 3)},
    "b4": {"embed_dims": _WIDE, "depths": (3, 8, 27, 3)},
    "b5": {"embed_dims": _WIDE, "depths": (3, 6, 40, 3)},
}
for _p in MIT_PRESETS.values():
    _p.update(num_heads=_HEADS, sr_ratios=_SR)

_STAGE_NAMES = ("res2", "res3", "res4", "res5")

#: eps of the LayerNorms in the transformer blocks and after each stage, as in the official
#: mit_b0..b5 (the patch-embedding and sequence-reduction LayerNorms keep torch's 1e-5), so
#: that converted official weights give the official activations.
BLOCK_NORM_EPS = 1e-6


def mit_settings(name: str, **overrides) -> Dict[str, List[int]]:
    """The preset ``name`` ("b0".."b5") with non-empty ``overrides`` (embed_dims, depths,
    num_heads, sr_ratios) replacing its values; each is a list of 4 ints."""
    key = str(name).lower()
    if key not in MIT_PRESETS:
        raise ValueError(f"MODEL.MIT.NAME must be one of {sorted(MIT_PRESETS)}, got '{name}'")
    out = {k: list(v) for k, v in MIT_PRESETS[key].items()}
    for k, v in overrides.items():
        if v is not None and len(v) > 0:
            out[k] = [int(x) for x in v]
    return out


class OverlapPatchEmbed(nn.Module):
    """Strided conv with kernel > stride (overlapping patches, padding kernel // 2) + LayerNorm.

    (N, Cin, H, W) -> (N, Cout, ceil-ish H / stride, W / stride): the output size is
    floor((H + 2 * (k // 2) - k) / stride) + 1, so any H, W >= 1 works.
    """

    def __init__(self, in_channels: int, embed_dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size, stride, kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        # LayerNorm over channels, kept in (N, C, H, W) layout
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys / values come from the sequence reduced by
    ``sr_ratio`` (a conv with kernel = stride = R, then LayerNorm): cost O(N^2 / R^2).

    forward(x (B, N, C), H, W) -> (B, N, C), N = H * W. When H or W is not a multiple of R the
    map is zero-padded (bottom, right) before the reduction, so every position contributes
    and maps smaller than R work. Inside d2seg's meta-architectures (inputs padded to 32) the
    stage maps are always multiples of their R (8, 4, 2, 1 at strides 4, 8, 16, 32).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MODEL.MIT: embed dim {dim} is not divisible by its number of "
                             f"heads {num_heads} (MODEL.MIT.EMBED_DIMS / NUM_HEADS)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = int(sr_ratio)
        if self.sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, self.sr_ratio, self.sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            r = x.transpose(1, 2).reshape(B, C, H, W)
            R = self.sr_ratio
            # (not while tracing for export: the inputs are padded to multiples of R there)
            if not torch.jit.is_tracing() and (H % R or W % R):
                r = F.pad(r, (0, (R - W % R) % R, 0, (R - H % R) % R))
            r = self.sr(r)  # (B, C, ceil(H / R), ceil(W / R))
            x = self.norm(r.flatten(2).transpose(1, 2))
        kv = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, kv[0], kv[1], dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class MixFFN(nn.Module):
    """Linear -> depth-wise 3x3 conv -> GELU -> Linear (hidden = ``mlp_ratio`` x dim).

    forward(x (B, N, C), H, W) -> (B, N, C).
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        x = self.fc1(x)
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
        x = self.drop(F.gelu(x))
        return self.drop(self.fc2(x))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        # stochastic depth on whole samples of the residual branch (torchvision's)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class MiTStage(nn.Module):
    """Overlapping patch embedding, ``depth`` blocks, LayerNorm.

    (N, Cin, H, W) -> (N, C, H', W').
    """

    def __init__(self, in_channels: int, dim: int, depth: int, num_heads: int, sr_ratio: int,
                 patch_size: int, stride: int, mlp_ratio: float, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_paths: Sequence[float]):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, patch_size, stride)
        self.blocks = nn.ModuleList([
            MiTBlock(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, drop, attn_drop, dp)
            for dp in drop_paths])
        self.norm = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x, H, W)
        return self.norm(x).transpose(1, 2).reshape(B, C, H, W)


class MixVisionTransformer(Backbone):
    """The MiT encoder: 4 stages at strides 4, 8, 16, 32, output ``res2..res5``.

    Input (N, in_channels, H, W), any H, W (inside d2seg's meta-architectures the input is
    padded to ``size_divisibility`` = 32). Output: ``{name: (N, embed_dims[i], H_i, W_i)}`` for
    the names in ``out_features``, where H_1 = floor((H - 1) / 4) + 1 and each next stage
    halves with H_{i+1} = floor((H_i - 1) / 2) + 1 (= H / stride for H divisible by 32).
    Same in training and eval (drop path / dropout only in training).

    The presets ``MIT_PRESETS`` "b0".."b5" follow the paper; with 150 classes and the
    :class:`~d2seg.modeling.heads.SegFormerHead`, b0 / b1 / b2 have 3.8M / 13.7M / 27.5M
    parameters in total (encoder 3.3M / 13.2M / 24.2M, tested in tests/test_segformer.py).
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int = 3,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        out_features: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            embed_dims, depths, num_heads, sr_ratios: 4 values each, one per stage (the
                defaults are b0; see ``MIT_PRESETS``).
            mlp_ratio: Mix-FFN hidden width / embed dim.
            drop_path_rate: stochastic depth, rising linearly from 0 over all blocks to this.
            out_features: subset of ("res2", "res3", "res4", "res5"); None = all four.
        """
        super().__init__()
        for key, v in (("EMBED_DIMS", embed_dims), ("DEPTHS", depths),
                       ("NUM_HEADS", num_heads), ("SR_RATIOS", sr_ratios)):
            if len(v) != 4 or any(int(x) < 1 for x in v):
                raise ValueError(f"MODEL.MIT.{key} must hold 4 positive ints, got {list(v)}")
        for key, v in (("DROP_RATE", drop_rate), ("ATTN_DROP_RATE", attn_drop_rate)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"MODEL.MIT.{key} must be in [0, 1], got {v}")
        if not 0.0 <= drop_path_rate < 1.0:  # the last block drops with this probability
            raise ValueError(f"MODEL.MIT.DROP_PATH_RATE must be in [0, 1), got {drop_path_rate}")
        if out_features is None or len(out_features) == 0:
            out_features = _STAGE_NAMES
        bad = [n for n in out_features if n not in _STAGE_NAMES]
        if bad:
            raise ValueError(f"MODEL.MIT.OUT_FEATURES {list(out_features)}: {bad} not among "
                             f"{list(_STAGE_NAMES)}")
        self.embed_dims = [int(x) for x in embed_dims]
        self.depths = [int(x) for x in depths]
        self._out_features = [n for n in _STAGE_NAMES if n in out_features]
        self._out_feature_channels = {}
        self._out_feature_strides = {}
        n_blocks = sum(self.depths)
        dprs = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        # stages after the last requested output are not built
        n_stages = _STAGE_NAMES.index(self._out_features[-1]) + 1
        self.stages = nn.ModuleList()
        ch, start = in_channels, 0
        for i in range(n_stages):
            patch, stride = (7, 4) if i == 0 else (3, 2)
            self.stages.append(MiTStage(
                ch, self.embed_dims[i], self.depths[i], int(num_heads[i]), int(sr_ratios[i]),
                patch, stride, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                dprs[start:start + self.depths[i]]))
            start += self.depths[i]
            ch = self.embed_dims[i]
            self._out_feature_channels[_STAGE_NAMES[i]] = ch
            self._out_feature_strides[_STAGE_NAMES[i]] = 4 * 2 ** i
        self._out_feature_channels = {n: self._out_feature_channels[n] for n in self._out_features}
        self._out_feature_strides = {n: self._out_feature_strides[n] for n in self._out_features}
        self.apply(_init_weights)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        m = cfg.MODEL.MIT
        s = mit_settings(m.NAME, embed_dims=m.EMBED_DIMS, depths=m.DEPTHS,
                         num_heads=m.NUM_HEADS, sr_ratios=m.SR_RATIOS)
        return {"in_channels": input_shape.channels, **s, "mlp_ratio": m.MLP_RATIO,
                "qkv_bias": m.QKV_BIAS, "drop_rate": m.DROP_RATE,
                "attn_drop_rate": m.ATTN_DROP_RATE, "drop_path_rate": m.DROP_PATH_RATE,
                "out_features": list(m.OUT_FEATURES)}

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """(N, C, H, W) -> {name: (N, C_i, H_i, W_i)} for ``out_features`` (see class doc)."""
        if x.dim() != 4:
            raise ValueError(f"MixVisionTransformer takes (N, C, H, W) inputs, got "
                             f"{tuple(x.shape)}")
        out = {}
        for name, stage in zip(_STAGE_NAMES, self.stages):
            x = stage(x)
            if name in self._out_feature_channels:
                out[name] = x
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n],
                             stride=self._out_feature_strides[n]) for n in self._out_features}


def _init_weights(m: nn.Module) -> None:
    """The paper's init: truncated normal (std 0.02) linears, fan-out normal convs, unit LNs."""
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


@BACKBONE_REGISTRY.register()
def build_mit_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> MixVisionTransformer:
    """MiT encoder from ``cfg.MODEL.MIT`` (NAME "b0".."b5", optional EMBED_DIMS / DEPTHS /
    NUM_HEADS / SR_RATIOS overrides, MLP_RATIO, QKV_BIAS, DROP_RATE, ATTN_DROP_RATE,
    DROP_PATH_RATE, OUT_FEATURES)."""
    return MixVisionTransformer(cfg, input_shape)
