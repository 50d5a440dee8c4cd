"""Fixed normalisations folded into the convolution before them (``D2SEG.SPEED.FOLD_NORM``).

detectron2's ``Conv2d(norm=FrozenBatchNorm2d)`` - every ResNet layer of the model-zoo
configs (``MODEL.RESNETS.NORM: "FrozenBN"``) and whatever ``D2SEG.FINETUNE.FREEZE`` freezes -
runs a convolution, then ``x * scale + shift`` over the whole activation: two more passes
over memory in the forward and one (``grad * scale``) in the backward, per layer. A frozen
normalisation is a fixed per-channel affine map, so the same result comes from one
convolution with weight ``W * scale`` (per output channel) and bias ``shift``; the gradient
reaches ``W`` through the (small) product. BatchNorms in eval mode (running statistics) are
fixed maps too: evaluation and prediction fold them the same way.

:func:`fold_norms` switches every foldable ``detectron2.layers.Conv2d`` of a model to
:class:`NormFoldedConv2d` in place. Parameters, buffers, ``state_dict`` keys and module
structure stay the same (checkpoints load and save as before, also after folding). The fold
follows the current weights: for trainable layers it is recomputed at every call; frozen
layers cache it and recompute it when a weight or statistic is replaced or written
(``load_state_dict``, ``.to()``). A BatchNorm in training mode (batch statistics) is
left alone at call time. Outputs equal the unfolded layer's up to float rounding.

Forward-only calls (no gradient will flow through the layer: ``torch.no_grad``, or a frozen
layer whose input needs none, such as the zoo's frozen stem) run folded only on the devices in
:data:`FOLD_FORWARD_ONLY_DEVICES` (the CPU). On CUDA they run detectron2's path: eager
PyTorch adds a convolution's bias in a separate broadcast kernel that was slower than the
batch-norm kernel it replaces, so folding saved nothing there without a backward (R50 eval
forward on an H100, batch 16 at 800x1216, bf16: 29.8 ms unfolded, 33.2 ms folded; 53 bias adds
at 201 us each against 53 batch-norm transforms at 146 us each; docs/benchmarks.md). Code
being compiled always folds: the compiler generates its own elementwise kernels (the
compiled GPU steps in docs/benchmarks.md were measured that way; the two forms have not
been compared compiled).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

__all__ = ["FOLD_FORWARD_ONLY_DEVICES", "NormFoldedConv2d", "fold_norms",
           "folded_weight_and_bias"]

#: Device types on which a forward-only call (no gradient through the layer) runs folded.
#: Measured (R50 backbone, eval forward): CPU 1.09x faster folded; CUDA 0.90x in eager mode
#: (see the module docstring). benchmarks/fold_norm.py extends it to time the old rule.
FOLD_FORWARD_ONLY_DEVICES: Tuple[str, ...] = ("cpu",)


def _foldable_type(norm: Optional[nn.Module]) -> bool:
    """Whether ``norm`` is a kind of normalisation that can be a fixed per-channel map."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return (isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats
            and norm.running_var is not None)


def _fixed_now(norm: nn.Module) -> bool:
    """Whether ``norm`` applies fixed statistics in this call (frozen, or a BN in eval mode)."""
    return isinstance(norm, FrozenBatchNorm2d) or not norm.training


def folded_weight_and_bias(conv: nn.Conv2d, norm: nn.Module) -> Tuple[Tensor, Tensor]:
    """``(weight, bias)`` of one convolution equal to ``norm(conv(x))`` for a fixed ``norm``.

    Args:
        conv: a convolution with weight (C_out, C_in / groups, kh, kw) and optional bias (C_out,).
        norm: a ``FrozenBatchNorm2d`` or an eval-mode BatchNorm with running statistics over
            C_out channels.

    Returns:
        ``weight * scale`` (the conv weight's shape and memory format) and ``shift`` (C_out,),
        where ``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean *
        scale`` (+ ``conv.bias * scale``). Autograd flows to ``conv``'s parameters, and to
        ``norm``'s affine parameters where they require gradients.
    """
    inv_std = torch.rsqrt(norm.running_var + norm.eps)
    scale = inv_std if norm.weight is None else norm.weight * inv_std
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv.weight * scale.reshape(-1, 1, 1, 1), shift


def _fold_key(conv: nn.Conv2d, norm: nn.Module) -> Tuple:
    """What a frozen layer's cached fold depends on: identity and in-place version of every
    tensor in it (``load_state_dict`` writes in place, ``.to()`` replaces)."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None
                 for t in (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
                           norm.running_var)) + (float(norm.eps),)


def _fold_pays(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether folding with gradients saves memory traffic for this input: it removes passes
    over the conv's output and adds passes over its weight (``W * scale`` and its gradient),
    so it pays when the output has at least as many elements as the weight (every layer of
    a detection-sized input; not the deep layers of a tiny one)."""
    n, _, h, w = x.shape
    if conv.padding == "same":  # stride 1 (torch's rule): the input's size
        return n * conv.out_channels * h * w >= conv.weight.numel()
    pad = (0, 0) if conv.padding == "valid" else conv.padding
    ho = (h + 2 * pad[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) \
        // conv.stride[0] + 1
    wo = (w + 2 * pad[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) \
        // conv.stride[1] + 1
    return n * conv.out_channels * ho * wo >= conv.weight.numel()


class NormFoldedConv2d(Conv2d):
    """detectron2's ``Conv2d`` (conv -> norm -> activation) whose fixed norm is folded into
    the convolution: one ``F.conv2d`` with :func:`folded_weight_and_bias`, then the activation.

    ``forward(x)``: (N, C_in, H, W) -> (N, C_out, H', W'), in training and eval mode alike.
    Frozen layers (no parameter requires gradients: the zoo's stem and res2, whatever
    ``D2SEG.FINETUNE.FREEZE`` freezes, a predictor's model) cache the folded weight and bias
    until one of their tensors is replaced or written (``load_state_dict``, ``.to()``; checked
    by identity and version at every call). Trainable layers recompute the fold at every call
    and use it only if the output is at least as large as the weight (otherwise folding would
    move more memory than it saves).
    A norm that uses batch statistics in this call (a BatchNorm in training mode) runs
    unfolded, as detectron2's ``Conv2d``. Made by :func:`fold_norms` (a class switch of an
    existing layer); same parameters, buffers and state_dict as ``Conv2d``.
    """

    def _cached_fold(self, norm: nn.Module) -> Tuple[Tensor, Tensor]:
        key = _fold_key(self, norm)
        cache = self.__dict__.get("_d2seg_fold")
        if cache is None or cache[0] != key:
            with torch.no_grad(), torch.inference_mode(False):  # plain tensors, reusable
                weight, bias = folded_weight_and_bias(self, norm)
            cache = (key, weight, bias)
            self.__dict__["_d2seg_fold"] = cache
        return cache[1], cache[2]

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        if norm is None or not _fixed_now(norm):
            return super().forward(x)
        params = (self.weight, self.bias, norm.weight, norm.bias)
        trainable = any(p is not None and p.requires_grad for p in params)
        if torch.compiler.is_compiling():  # traced: the fold becomes part of the graph
            weight, bias = folded_weight_and_bias(self, norm)
        elif (x.device.type not in FOLD_FORWARD_ONLY_DEVICES
              and not (torch.is_grad_enabled() and (trainable or x.requires_grad))):
            return super().forward(x)  # forward only, eager CUDA: detectron2's kernels are faster
        elif not trainable:
            weight, bias = self._cached_fold(norm)  # frozen: only loads and .to() change it
        else:
            # trainable: optimizers update in place without always bumping the version
            # (torch's fused SGD does not), so nothing is cached
            self.__dict__.pop("_d2seg_fold", None)
            if not _fold_pays(self, x):
                return super().forward(x)
            weight, bias = folded_weight_and_bias(self, norm)
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            x = self.activation(x)
        return x


def fold_norms(model: nn.Module) -> int:
    """Switch every ``detectron2.layers.Conv2d`` of ``model`` whose ``norm`` is a
    ``FrozenBatchNorm2d`` or a BatchNorm with running statistics to :class:`NormFoldedConv2d`
    (in place). Other layers (GroupNorm, no norm, subclasses of ``Conv2d``) are unchanged.

    Returns:
        the number of layers switched (0 when called again on the same model).
    """
    n = 0
    for module in model.modules():
        if type(module) is Conv2d and _foldable_type(module.norm):
            module.__class__ = NormFoldedConv2d
            n += 1
    return n
