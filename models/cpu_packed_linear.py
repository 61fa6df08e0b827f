"""Linear layers with their weights reordered once, for bfloat16 inference on the CPU: for the native
kernel (kernels/cpu_native.py) where this CPU and machine can run it, else for oneDNN.

The native kernel reads each block of 32 output features' weights as one sequential stream; on this
project's AVX-512 BF16 machines a decode step's matmuls take ~0.55x the time of the oneDNN path below,
and ~0.95x at 64 tokens a step. Its rows do not depend on the other rows of the call (each output row is
the same float32 sum in input order, rounded once), and its results are within bfloat16 rounding of
exact, but not bit-identical to `F.linear`: it rounds once where `F.linear` with a bias rounds twice.

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

from pdserve.kernels.cpu_native import FEATURE_BLOCK, native_kernels, pack_linear_weight

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


class NativePackedLinear(nn.Module):
    """y = x W^T + b computed by the native CPU kernel, W packed as [ceil(out/32), in/2, 32, 2].

    x: [..., in_features] bfloat16 -> [..., out_features] bfloat16. Built from an nn.Linear by `pack`.
    """

    def __init__(self, packed_weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 out_features: int):
        super().__init__()
        self.register_buffer("packed_weight", packed_weight)
        self.register_buffer("bias", bias)  # float32: added to the float32 sums before rounding
        self.in_features = in_features
        self.out_features = out_features
        self.kernels = native_kernels()

    @classmethod
    def pack(cls, linear: nn.Linear) -> NativePackedLinear:
        """The packed equivalent of `linear` (whose weight it does not keep)."""
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        return cls(pack_linear_weight(linear.weight.detach()), bias, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        return self.kernels.linear(x, self.packed_weight, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for the native kernel"


class NativePackedEmbedding(nn.Module):
    """An embedding table read from a NativePackedLinear's packed weight, for a checkpoint whose output
    head is its embedding: the head's weight is packed once and the lookup reads rows from that layout,
    so the tied weight is neither kept twice nor left unpacked.

    ids: [...] int64 -> [..., embedding_dim] bfloat16, the same values as the unpacked table's rows.
    """

    def __init__(self, head: NativePackedLinear):
        super().__init__()
        self._head = (head,)  # not a submodule: the head is the model's; its buffer follows .to() there
        self.num_embeddings = head.out_features
        self.embedding_dim = head.in_features

    @property
    def packed_weight(self) -> torch.Tensor:
        """The output head's packed weight [ceil(V/32), D/2, 32, 2]."""
        return self._head[0].packed_weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [...] -> [..., embedding_dim]."""
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for a vocabulary of {self.num_embeddings}")
        rows = self.packed_weight[flat // FEATURE_BLOCK, :, flat % FEATURE_BLOCK, :]  # [N, K/2, 2]
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, read from the packed output head"


CPU_LINEAR_BACKENDS = ("auto", "native", "onednn", "none")


def pack_linears_for_cpu(model: nn.Module, backend: str = "auto") -> int:
    """Replace the model's bfloat16 CPU nn.Linear layers by packed ones, in place, except one whose
    weight another module shares: a tied output head is packed by the native backend only, together
    with the embedding that shares it (NativePackedEmbedding), and left alone by oneDNN.

    backend: "native" (NativePackedLinear), "onednn" (PackedLinear), "auto" (native where
    `native_kernels()` is available, else oneDNN), "none". Each packed layer is checked on a random
    input (oneDNN: equal to F.linear; native: within bfloat16 rounding of it) and left as it was if
    not. Returns how many layers were packed (0 on a GPU, for float32 models, or without the kernels).
    """
    if backend not in CPU_LINEAR_BACKENDS:
        raise ValueError(f"unknown CPU linear backend {backend!r}; expected one of {list(CPU_LINEAR_BACKENDS)}")
    if backend == "auto":  # the native library is only built for a model it would serve
        wanted = any(_packable(m, set()) for m in model.modules())
        backend = "native" if wanted and native_kernels() is not None else "onednn"
    if backend == "native" and native_kernels() is None:
        raise RuntimeError("the native CPU kernels are not available on this machine (see the log)")
    if backend == "none" or (backend == "onednn" and not packing_available()):
        return 0
    packed = _pack_tied_head(model) if backend == "native" else 0
    shared = _shared_weights(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _packable(child, shared) or (backend == "native" and child.in_features % 2):
                continue
            candidate = (NativePackedLinear if backend == "native" else PackedLinear).pack(child)
            if _same_output(child, candidate, exact=backend == "onednn"):
                setattr(parent, name, candidate)
                packed += 1
    return packed


def _pack_tied_head(model: nn.Module) -> int:
    """Pack a bfloat16 CPU output head that is the model's embedding (model.lm_head.weight is
    model.embed_tokens.weight) once, for both: 1 if it was, else 0."""
    head, embedding = getattr(model, "lm_head", None), getattr(model, "embed_tokens", None)
    if (type(head) is not nn.Linear or type(embedding) is not nn.Embedding or head.weight is not embedding.weight
            or not _packable(head, set()) or head.in_features % 2):
        return 0
    candidate = NativePackedLinear.pack(head)
    if not _same_output(head, candidate, exact=False):
        return 0
    model.lm_head, model.embed_tokens = candidate, NativePackedEmbedding(candidate)
    return 1


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
def _same_output(linear: nn.Linear, packed: nn.Module, exact: bool) -> bool:
    """Whether `packed` computes `linear` on a random input: bit for bit, or (exact=False), on its first
    and last 64 features, within one bfloat16 rounding (2^-8 relative) of the float64 result plus float32
    accumulation error."""
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight.dtype)
    try:
        got = packed(x)
    except RuntimeError:
        return False
    if exact:
        return bool(torch.equal(got, F.linear(x, linear.weight, linear.bias)))
    # the first and last 64 features (the last block may be partial) against float64: enough to catch a bad
    # build or CPU, without a float64 copy of a whole (possibly vocabulary-sized) weight
    features = torch.cat([torch.arange(min(64, linear.out_features)),
                          torch.arange(max(0, linear.out_features - 64), linear.out_features)]).unique()
    weight = linear.weight[features].double()
    bias = None if linear.bias is None else linear.bias[features].double()
    reference = F.linear(x.double(), weight, bias)
    bound = 2.0 ** -8 * reference.abs() + 2.0 ** -14 * F.linear(x.double().abs(), weight.abs())
    return bool(((got[:, features].double() - reference).abs() <= bound).all())
