"""Native CPU kernels (kernels/cpu_native.cpp): bfloat16 linear layers and decode attention for x86-64
CPUs with AVX-512 BF16, built on first use with the system C++ compiler and called through ctypes.

Why native code: a decode step streams every weight once, and oneDNN's bfloat16 matrix-vector product
reads its blocked layout at ~12 GB/s on one core here where a single sequential stream reaches ~21 GB/s;
the packed layout below is that stream. Decode attention in PyTorch ops copies each sequence's blocks
out of the paged cache before two batched matmuls; the native kernel reads them in place.

The library is compiled once per machine into $PDSERVE_HOME/native (default ~/.cache/pdserve/native),
named by a hash of the source, the compiler and its flags, and written atomically, so concurrent
processes and later runs share it (a build takes ~2 s). Where it cannot be used (no compiler, a CPU
without AVX-512 BF16, `PDSERVE_CPU_NATIVE=off`) `native_kernels()` returns None, says why once in the
log, and callers keep their PyTorch/oneDNN path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger("pdserve.kernels")

SOURCE = Path(__file__).with_name("cpu_native.cpp")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno")
COMPILE_TIMEOUT_S = 300
FEATURE_BLOCK = 32  # output features per packed weight block (kFeatureBlock in the source)
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)  # decode_attention_for in the source
ENV_SWITCH = "PDSERVE_CPU_NATIVE"  # "auto" (default) or "off"

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class NativeKernelError(RuntimeError):
    """The native library could not be built or loaded."""


class CpuNativeKernels:
    """The loaded library's entry points, over torch tensors (CPU, bfloat16)."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._linear = library.pd_linear_bf16
        self._linear.restype = None
        self._linear.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _i64, ctypes.c_int]
        self._attention = library.pd_decode_attention_bf16
        self._attention.restype = ctypes.c_int
        self._attention.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _i64,
                                    _i64, ctypes.c_float, _ptr, _i64, _i64, ctypes.c_int]
        self._silu_and_mul = library.pd_silu_and_mul_bf16
        self._silu_and_mul.restype = None
        self._silu_and_mul.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, ctypes.c_int]
        self._rms_norm = library.pd_rms_norm_bf16
        self._rms_norm.restype = None
        self._rms_norm.argtypes = [_ptr, _ptr, _ptr, ctypes.c_float, _i64, _i64, _ptr, _ptr, ctypes.c_int]
        self._rotary = library.pd_rotary_bf16
        self._rotary.restype = None
        self._write_kv = library.pd_write_kv_bf16
        self._write_kv.restype = None
        self._write_kv.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64]
        self._rotary.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, ctypes.c_int]

    def linear(self, x: torch.Tensor, packed_weight: torch.Tensor, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] bfloat16 times the weight packed by `pack_linear_weight` ([ceil(N/32), K/2, 32, 2]),
        plus bias [N] float32 -> [..., N] bfloat16."""
        in_features = packed_weight.shape[1] * 2
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[-1] != in_features:
            raise ValueError(f"the native linear takes bfloat16 CPU rows of {in_features}, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        if (packed_weight.dtype != torch.bfloat16 or not packed_weight.is_contiguous()
                or packed_weight.shape[2:] != (FEATURE_BLOCK, 2) or out_features > packed_weight.shape[0] * FEATURE_BLOCK
                or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()
                                          or bias.numel() < out_features))):
            raise ValueError("the native linear's packed weight (contiguous bfloat16 [N/32, K/2, 32, 2]) or "
                             "bias (contiguous float32 [N]) is not as pack_linear_weight made it")
        rows = x.reshape(-1, in_features)
        if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < in_features):
            rows = rows.contiguous()
        out = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16, device="cpu")
        self._linear(rows.data_ptr(), rows.shape[0], rows.stride(0), packed_weight.data_ptr(), out_features,
                     in_features, None if bias is None else bias.data_ptr(), out.data_ptr(), out_features,
                     torch.get_num_threads())
        return out

    def decode_attention(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         tokens: torch.Tensor, lengths: torch.Tensor, block_tables: torch.Tensor, scale: float,
                         out: torch.Tensor) -> None:
        """Attention of single-token queries over their sequences' paged K/V, written into `out`.

        query, out: [T, H, D] bfloat16 (last dim contiguous); key_cache, value_cache: [NB, BS, KVH, D]
        bfloat16, contiguous, D in ATTENTION_HEAD_DIMS; tokens, lengths: [R] int32, row r's query token
        and its context length (>= 1); block_tables: [R, max_blocks] int32, contiguous.
        """
        num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
        if head_dim not in ATTENTION_HEAD_DIMS:
            raise ValueError(f"the native decode attention takes head dims {ATTENTION_HEAD_DIMS}, not {head_dim}")
        status = self._attention(query.data_ptr(), query.stride(0), query.stride(1), key_cache.data_ptr(),
                        value_cache.data_ptr(), block_size, num_kv_heads, head_dim, query.shape[1],
                        tokens.data_ptr(), lengths.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
                        tokens.numel(), scale, out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads())
        if status != 0:
            raise ValueError(f"the native decode attention refused head dim {head_dim}")


    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I] bfloat16 (rows may be strided) -> silu(gate) * up [T, I], float32 inside."""
        width = gate_up.shape[-1] // 2
        out = torch.empty(gate_up.shape[0], width, dtype=torch.bfloat16, device="cpu")
        self._silu_and_mul(gate_up.data_ptr(), gate_up.shape[0], gate_up.stride(0), width, out.data_ptr(), width,
                           torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous bfloat16 x, residual [T, W] and weight [W] -> (normed, x + residual), as
        reference.rms_norm computes them."""
        normed = torch.empty_like(x)
        new_residual = torch.empty_like(x) if residual is not None else x
        self._rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
                       x.shape[0], x.shape[1], normed.data_ptr(),
                       None if residual is None else new_residual.data_ptr(), torch.get_num_threads())
        return normed, new_residual

    def rotary_in_place(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor) -> None:
        """Rotate q [T, H, D] and k [T, KVH, D] bfloat16 (last dim contiguous) in place by positions [T]
        int64, from cos_sin_cache [max_positions, D] float32, contiguous."""
        self._rotary(q.data_ptr(), q.stride(0), q.stride(1), q.shape[1], k.data_ptr(), k.stride(0), k.stride(1),
                     k.shape[1], positions.data_ptr(), positions.numel(), cos_sin_cache.data_ptr(), q.shape[2],
                     torch.get_num_threads())

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store key/value [T, KVH, D] bfloat16 (last dim contiguous) into the contiguous caches [NB, BS, KVH, D]
        at flat slots [T] int64 (-1: skip). Slots must be < NB * BS."""
        self._write_kv(key.data_ptr(), key.stride(0), key.stride(1), value.data_ptr(), value.stride(0),
                       value.stride(1), key_cache.data_ptr(), value_cache.data_ptr(), slot_mapping.data_ptr(),
                       slot_mapping.numel(), key.shape[1], key.shape[2])


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bfloat16 -> [ceil(N/32), K/2, 32, 2]: for each block of 32 output features, input pair k's
    weights side by side (features past N are zero). K must be even."""
    out_features, in_features = weight.shape
    if in_features % 2:
        raise ValueError(f"the native linear needs an even number of input features, got {in_features}")
    padded = -(-out_features // FEATURE_BLOCK) * FEATURE_BLOCK
    if padded != out_features:
        weight = torch.cat([weight, weight.new_zeros(padded - out_features, in_features)])
    blocks = weight.reshape(padded // FEATURE_BLOCK, FEATURE_BLOCK, in_features // 2, 2)
    return blocks.permute(0, 2, 1, 3).contiguous()


def native_dir() -> Path:
    """Where built libraries are kept: $PDSERVE_HOME/native, default ~/.cache/pdserve/native."""
    home = os.environ.get("PDSERVE_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "pdserve") / "native"


def build_library(directory: Path | None = None) -> Path:
    """Compile the source (unless a library for the same source, compiler and flags exists) and return
    its path. Without a compiler, a library built earlier from the same source (e.g. into an image)
    is used. Raises NativeKernelError when there is neither, or the build fails."""
    directory = directory or native_dir()
    source_digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        built = sorted(directory.glob(f"pdserve_cpu_native-{source_digest}-*.so"))
        if built:
            return built[0]
        raise NativeKernelError("no C++ compiler (g++ or c++) on PATH, and CXX is not set")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeKernelError(f"cannot run the C++ compiler {compiler!r}: {exc}") from exc
    toolchain_digest = hashlib.sha256("\0".join([version, *COMPILE_FLAGS]).encode()).hexdigest()[:8]
    target = directory / f"pdserve_cpu_native-{source_digest}-{toolchain_digest}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=target.name, suffix=".partial", dir=directory)
    os.close(fd)
    try:
        try:
            result = subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", partial], capture_output=True,
                                    text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeKernelError(f"{compiler} failed to build {SOURCE.name}: {exc}") from exc
        if result.returncode != 0:
            raise NativeKernelError(f"{compiler} failed to build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # atomic: a concurrent build of the same source writes the same bytes
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@cache
def native_kernels() -> CpuNativeKernels | None:
    """The native kernels, built and loaded once per process; None (the reason logged once) when this
    machine cannot run them or `PDSERVE_CPU_NATIVE=off`."""
    try:
        return load_native_kernels()
    except NativeKernelError as exc:
        logger.info("native CPU kernels not used: %s", exc)
        return None


def load_native_kernels() -> CpuNativeKernels:
    """Build (if needed) and load the library; raises NativeKernelError saying why it cannot be used."""
    if os.environ.get(ENV_SWITCH, "auto") == "off":
        raise NativeKernelError(f"{ENV_SWITCH}=off")
    if os.environ.get(ENV_SWITCH, "auto") != "auto":
        raise NativeKernelError(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not 'auto' or 'off'")
    try:
        path = build_library()
    except (OSError, RuntimeError) as exc:  # an unwritable cache folder, no home directory, ...
        if isinstance(exc, NativeKernelError):
            raise
        raise NativeKernelError(f"cannot build the library: {exc}") from exc
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeKernelError(f"cannot load {path}: {exc}") from exc
    if not library.pd_cpu_supported():
        raise NativeKernelError("this CPU lacks AVX-512 BF16 (avx512_bf16)")
    return CpuNativeKernels(library, path)

