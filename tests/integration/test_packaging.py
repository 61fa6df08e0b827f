"""The built wheel: one top-level import name (`pdserve`), every source module inside it, and an
install of it that lives beside `transformers` and Hugging Face's `kernels` package without
shadowing either (the clash that broke every transformers call once)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.paths import REPO_ROOT

# Source folder -> the package it installs as (pyproject.toml's package-dir).
SOURCE_PACKAGES = {"services": "pdserve", "models": "pdserve.models", "kernels": "pdserve.kernels",
                   "kvtransfer": "pdserve.kvtransfer", "protos/pdserve/v1": "pdserve.v1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds from this checkout's sources (pip's isolated build, as users
    get it), built from a copy so that setuptools' build/ folder never lands in the checkout."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for folder in ("services", "models", "kernels", "kvtransfer", "protos"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                   check=True, timeout=600, capture_output=True)
    (path,) = out.glob("pdserve-*.whl")
    return path


def test_wheel_installs_exactly_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"pdserve"}
    (record,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if record:
        assert zipfile.ZipFile(wheel).read(record).decode().split() == ["pdserve"]


def test_wheel_holds_every_source_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = []
    for folder, package in SOURCE_PACKAGES.items():
        root = REPO_ROOT / folder
        for source in root.rglob("*.py"):
            relative = source.relative_to(root)
            folders = [root.joinpath(*relative.parts[:i]) for i in range(len(relative.parts))]
            if not all((folder_path / "__init__.py").is_file() for folder_path in folders):
                continue  # not inside a package (e.g. a data folder)
            wanted = "/".join([*package.split("."), *relative.parts])
            if wanted not in names:
                missing.append(wanted)
    assert not missing, f"pyproject.toml's package list leaves these out: {missing}"
    assert "pdserve/v1/router.proto" in names and "pdserve/models/data/corpus.txt" in names
    assert "pdserve/kernels/cpu_native.cpp" in names  # compiled on first use from the installed package


def test_installed_wheel_lives_beside_transformers_and_hf_kernels(wheel, tmp_path):
    """The wheel unpacked into its own site folder, ahead of this environment's (which holds the
    newest transformers and, through it, Hugging Face's `kernels`), run from `/`."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) in (["pdserve"], ["bin", "pdserve"])
    code = f"""
import pdserve, pdserve.kernels, pdserve.models.llama, pdserve.v1.router_pb2, pdserve.cli
assert pdserve.__file__.startswith({str(target)!r}), pdserve.__file__
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig
model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=2))
assert sum(p.numel() for p in model.parameters()) > 0
try:
    import kernels
except ImportError:
    pass  # transformers without Hugging Face's kernels package: nothing to shadow
else:
    assert "pdserve" not in kernels.__file__, kernels.__file__
from pdserve.kernels import cpu_native
assert cpu_native.SOURCE.is_file() and str(cpu_native.SOURCE).startswith({str(target)!r}), cpu_native.SOURCE
try:
    built = cpu_native.build_library()  # from the installed source, into PDSERVE_HOME
except cpu_native.NativeKernelError as exc:
    assert "compiler" in str(exc), exc  # a machine without one: the PyTorch path runs
else:
    assert built.is_file() and built.parent == cpu_native.native_dir(), built
print("ok", transformers.__version__)
"""
    env = {**os.environ, "PYTHONPATH": str(target), "PDSERVE_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-P", "-c", code], cwd="/", env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]
    help_run = subprocess.run([sys.executable, "-P", "-m", "pdserve", "--help"], cwd="/", env=env,
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "make-tiny-model" in help_run.stdout, help_run.stderr[-2000:]
