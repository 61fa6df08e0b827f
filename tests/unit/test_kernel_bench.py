"""The GPU kernel benchmark's command line: it refuses clearly without CUDA, parses its parts,
and knows the peak bandwidth of the GPUs it names (the measurements need a GPU)."""

from __future__ import annotations

import importlib

import pytest
import torch

from pdserve.bench import kernel_bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_cuda_it_exits_2_and_says_why(capsys):
    assert kernel_bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_parts_and_peak_bandwidth():
    assert kernel_bench.parse_args(["--only", "decode, prefill"]).parts == ["decode", "prefill"]
    with pytest.raises(SystemExit):
        kernel_bench.parse_args(["--only", "decode,warp"])
    assert kernel_bench.peak_bandwidth("NVIDIA H100 80GB HBM3", None) == (3350.0, "table (H100)")
    assert kernel_bench.peak_bandwidth("NVIDIA H100 PCIe", None)[0] == 2000.0
    assert kernel_bench.peak_bandwidth("NVIDIA GH200 480GB", None)[0] == 4000.0
    assert kernel_bench.peak_bandwidth("NVIDIA H200", None)[0] == 4800.0
    assert kernel_bench.peak_bandwidth("Mystery GPU", 1234.0) == (1234.0, "--peak-gb-per-s")
    with pytest.raises(SystemExit, match="peak-gb-per-s"):
        kernel_bench.peak_bandwidth("Mystery GPU", None)


@pytest.mark.parametrize("module", ["kernel_bench_attention", "kernel_bench_model"])
def test_benchmark_modules_import(module):
    importlib.import_module(f"pdserve.bench.{module}")
