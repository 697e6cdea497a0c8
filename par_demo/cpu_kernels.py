"""Linear layers on CPU with weights prepacked once for oneDNN, so that short (pruned) sequences run at full speed.

Why: torch's CPU `F.linear` calls MKL's sgemm, which on this project's machines (2-core AMD EPYC) gets no faster
from a second thread below ~100 rows: a prefill pruned to ~40 rows ran its MLPs at ~60-70 GFLOP/s against ~120 at
~280 rows. Pruning is exactly what makes sequences short, so saved FLOPs did not become saved seconds. oneDNN (which
torch ships) runs the same fp32 product at ~200 GFLOP/s from 39 to 1,024 rows once the weight is reordered into its
blocked layout, which is done once at load time. The arithmetic is the same fp32 matrix product (summed in another
order: last bits differ, about 1e-6 relative).

`prepack(model)` swaps every `nn.Linear` under the model (the LM head excepted: it sees one row per step and ties
to the embeddings in some models) for a `PackedLinear` that keeps the *same* weight and bias Parameters (state dict,
fingerprints and every `.weight` reader see nothing new) plus the packed copy, which costs the layers' weights once
more in memory. With gradients on, it runs the stock `F.linear` (training the embedded model backpropagates through
its layers). fp32 on CPU only; quantized or GPU models are never touched. `PAR_DEMO_CPU_KERNELS=stock` turns it off
(to measure what it buys).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

ENV = "PAR_DEMO_CPU_KERNELS"
# oneDNN's call costs ~20 us against MKL's ~7: a 128 x 512 layer on one decode row is 3x slower packed, on 85 rows
# even, on 1,360 rows 10 % faster; from 768 x 768 up it wins at every row count (measured on this project's CPU).
LARGE_WEIGHT = 2**19  # in x out
LARGE_PRODUCT = 2**23  # rows x in x out


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Packed(nn.Module):
    """Holds a oneDNN-packed copy of `self.weight` (flattened to 2-D) that follows the weight: an update in place
    (`load_state_dict`, `w += d`, and `w.data += d`, which is how PEFT merges an adapter and which no version counter
    sees) re-packs it on the next call, and a weight that is no longer fp32 on the CPU (the model was cast or moved)
    has its packed copy dropped: the stock call runs then. Copied or pickled, a layer leaves its packed copy behind
    (oneDNN's layout has no storage to copy) and packs again when it is next called."""

    weight: nn.Parameter
    PROBES = 8  # weights compared on every call: a merged low-rank update changes all of them

    def pack(self) -> None:
        weight = self.weight.detach()
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.flatten(1), None)
        # a few weights, read through a view of the same storage (an update in place shows in it), and their values
        probe = weight.reshape(-1)[:: max(1, weight.numel() // self.PROBES)]
        self.packed_from = (self.weight._version, self.weight.data_ptr(), probe, probe.clone())

    def current_packed(self) -> torch.Tensor | None:
        weight = self.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            self.packed = self.packed_from = None  # a cast or a move: the fp32 copy would only hold memory
            return None
        known = self.packed_from
        if known is None or (weight._version, weight.data_ptr()) != known[:2] or not torch.equal(known[2], known[3]):
            self.pack()
        return self.packed

    def __getstate__(self) -> dict:
        return {**self.__dict__, "packed": None, "packed_from": None}


class PackedLinear(Packed):
    """`nn.Linear`'s forward on a oneDNN-packed copy of its weight (inference); the stock path when autograd runs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters, not copies
        self.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):  # the packed product is fp32 only
            return F.linear(x, self.weight, self.bias)
        size = self.in_features * self.out_features
        if size < LARGE_WEIGHT and x.numel() * self.out_features < LARGE_PRODUCT:
            return F.linear(x, self.weight, self.bias)  # a small product: oneDNN's ~20 us per call would dominate
        packed = self.current_packed()
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedPatchConv(Packed):
    """A convolution whose kernel covers each input window whole, stride = kernel, is a linear map of the window: Qwen2.5-VL's
    patch embedding runs its Conv3d on inputs of exactly (C, 2, 14, 14). Such calls take the packed product (oneDNN's
    direct convolution ran them at ~50 GFLOP/s); any other input shape runs the stock convolution."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d):
        super().__init__()
        self.stock = (conv,)  # in a tuple: not a submodule, so the state dict holds its weight once, under this name
        self.kernel_size = tuple(conv.kernel_size)
        self.weight, self.bias = conv.weight, conv.bias
        self.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole = tuple(x.shape[2:]) == self.kernel_size and x.dtype == torch.float32
        packed = self.current_packed() if whole and not torch.is_autocast_enabled("cpu") else None
        if packed is None or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            # this layer's own Parameters, which a load with `assign=True` may have replaced since
            return self.stock[0]._conv_forward(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.flatten(1), packed, self.bias, "none", [], "")
        return out.view(x.shape[0], -1, *([1] * (x.dim() - 2)))


def is_patch_conv(module: nn.Module) -> bool:
    """A plain convolution with stride = kernel and nothing else (no padding, dilation or groups)."""
    return (type(module) in (nn.Conv2d, nn.Conv3d) and tuple(module.stride) == tuple(module.kernel_size)
            and all(p == 0 for p in module.padding) and all(d == 1 for d in module.dilation) and module.groups == 1
            and module.padding_mode == "zeros" and module.weight.dtype == torch.float32)


def wanted(model: nn.Module) -> bool:
    """Prepack this model? fp32 weights on the CPU, not switched off, and a torch with oneDNN."""
    head = model.get_output_embeddings()
    return (os.environ.get(ENV, "onednn") != "stock" and available() and head is not None
            and head.weight.device.type == "cpu" and head.weight.dtype == torch.float32)


def prepack(model: nn.Module) -> int:
    """Swap the model's linear layers (not the LM head, not quantized ones) for `PackedLinear` and its patch
    convolutions for `PackedPatchConv`; returns how many."""
    head = model.get_output_embeddings()
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child is not head and child.weight.dtype == torch.float32:
                swaps.append((parent, name, PackedLinear(child)))
            elif is_patch_conv(child):
                swaps.append((parent, name, PackedPatchConv(child)))
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """For `FlopCounterMode` (the FLOPs tests): a packed linear is the matrix product it replaces."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


if available():
    register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_linear_flops)
