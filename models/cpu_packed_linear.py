"""Linear layers with their weights reordered once for oneDNN, for bfloat16 inference on the CPU.

`F.linear` on a plain [out, in] bfloat16 weight makes oneDNN read it in a layout its kernels do not
want, on every call. Reordering the weight once into oneDNN's blocked layout (what torch's own
CPU compiler does when it freezes a model) makes a decode step's matmuls, which only stream the
weights, about 1.5x faster on an AVX-512 CPU (`python -m pdserve.bench.engine_bench` shows it),
and gives the same results: the arithmetic is the same oneDNN kernel's.

Only bfloat16 weights are packed. A float32 `F.linear` runs MKL instead, and the packed oneDNN
path would round differently from it (and from `transformers`), so float32 models are left as
they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_DTYPES = (torch.bfloat16,)


def packing_available() -> bool:
    """Whether this torch build has oneDNN and the weight-reorder ops."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (not readable as [out, in]).

    x: [..., in_features] bfloat16 -> [..., out_features]. Built from an nn.Linear by `pack`.
    """

    def __init__(self, packed_weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 out_features: int):
        super().__init__()
        self.register_buffer("packed_weight", packed_weight)
        self.register_buffer("bias", bias)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def pack(cls, linear: nn.Linear) -> PackedLinear:
        """The packed equivalent of `linear` (whose weight it does not keep)."""
        weight = linear.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, bias, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def pack_linears_for_cpu(model: nn.Module) -> int:
    """Replace the model's bfloat16 CPU nn.Linear layers by PackedLinear, in place, except one
    whose weight another module shares (a tied output head). Checks each packed layer against
    F.linear on a random input, and leaves the layer as it was if they differ. Returns how many
    layers were packed (0 on a GPU, for float32 models, or without oneDNN)."""
    if not packing_available():
        return 0
    shared = _shared_weights(model)
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _packable(child, shared):
                continue
            candidate = PackedLinear.pack(child)
            if _same_output(child, candidate):
                setattr(parent, name, candidate)
                packed += 1
    return packed


def _packable(module: nn.Module, shared: set[int]) -> bool:
    return (type(module) is nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype in PACKED_DTYPES and id(module.weight) not in shared)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (e.g. an embedding tied to the head)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


@torch.no_grad()
def _same_output(linear: nn.Linear, packed: PackedLinear) -> bool:
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight.dtype)
    try:
        return bool(torch.equal(packed(x), F.linear(x, linear.weight, linear.bias)))
    except RuntimeError:
        return False
