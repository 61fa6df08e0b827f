"""Regenerate the checked-in Python code of the .proto files, or check that it is current.

    python -m pdserve.protos.generate          # regenerate protos/pdserve/v1/*_pb2.py, .pyi, _pb2_grpc.py
    python -m pdserve.protos.generate --check  # exit 1 (listing the files) if the checked-in code differs

Layout: the .proto files live under protos/ with import paths relative to it
("pdserve/v1/router.proto", package pdserve.v1), the conventional layout any client in any
language compiles with `-I protos`. protoc names the Python module of a file after its path,
so its generated code imports siblings as `from pdserve.v1 import x_pb2`; protos/pdserve/v1 is
installed as exactly that package (`pdserve.v1`, see pyproject.toml), so the code is used as
protoc writes it, with no rewriting.

The check ignores the tool-version stamps protoc writes (protobuf gencode version,
GRPC_GENERATED_VERSION): a different grpcio-tools release that produces the same code is not
drift. The checked-in stamps still set the oldest protobuf / grpcio runtime the code accepts.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_VERSION_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
               r"\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"),
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE),
)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """All .proto files under root, as paths relative to it (their import paths), sorted."""
    return sorted(path.relative_to(root) for path in root.rglob("*.proto"))


def generated_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Checked-in generated modules under root, relative to it, sorted."""
    return sorted(path.relative_to(root) for path in root.rglob("*")
                  if path.is_file() and path.name.endswith(GENERATED_SUFFIXES))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every .proto under root into out_dir (same relative layout); return the
    generated files relative to out_dir."""
    run_protoc([f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"], root)
    return generated_files(out_dir)


def run_protoc(output_flags: list[str], root: Path = PROTO_ROOT) -> None:
    """Compile every .proto under root (import paths relative to it, plus protobuf's well-known
    types) with grpcio-tools' protoc and the given output flags; RuntimeError when it fails.

    protoc runs in a child process: its compiler bundles its own abseil and protobuf, which crash
    a process that has also loaded NIXL's (the KV transfer's)."""
    protos = proto_files(root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {root}")
    spec = importlib.util.find_spec("grpc_tools")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("grpcio-tools is not installed (pip install grpcio-tools)")
    well_known = Path(spec.submodule_search_locations[0]) / "_proto"
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"-I{well_known}", *output_flags,
               *(str(root / p) for p in protos)]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"protoc failed on {root} (see the messages above)")


def without_version_stamps(code: str) -> str:
    """The code with protoc's tool-version stamps blanked (what the drift check compares)."""
    for stamp in _VERSION_STAMPS:
        code = stamp.sub("<version stamp>", code)
    return code


def drifted_files(root: Path = PROTO_ROOT) -> list[str]:
    """Generated files under root that differ from a fresh generation, are missing, or have
    no .proto any more; empty when the checked-in code is current."""
    with tempfile.TemporaryDirectory(prefix="pdserve-protos-") as tmp:
        fresh_dir = Path(tmp)
        fresh = set(generate(fresh_dir, root))
        problems = []
        for relative in sorted(fresh | set(generated_files(root))):
            if relative not in fresh:
                problems.append(f"{relative}: stale (no .proto generates it)")
            elif not (root / relative).is_file():
                problems.append(f"{relative}: missing")
            elif _normalized(root / relative) != _normalized(fresh_dir / relative):
                problems.append(f"{relative}: differs from its .proto")
        return problems


def _normalized(path: Path) -> str:
    return without_version_stamps(path.read_text(encoding="utf-8"))


def write(root: Path = PROTO_ROOT) -> list[Path]:
    """Regenerate the code under root in place (deleting generated files whose .proto is
    gone); return the generated files relative to root."""
    with tempfile.TemporaryDirectory(prefix="pdserve-protos-") as tmp:
        fresh = generate(Path(tmp), root)
        for relative in set(generated_files(root)) - set(fresh):
            (root / relative).unlink()
        for relative in fresh:
            (root / relative).write_bytes((Path(tmp) / relative).read_bytes())
    return fresh


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate in place, or with --check report drift (exit 1)."""
    parser = argparse.ArgumentParser(prog="python -m pdserve.protos.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the checked-in code differs")
    args = parser.parse_args(argv)
    if not args.check:
        for relative in write():
            print(PROTO_ROOT / relative)
        return 0
    problems = drifted_files()
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("run `python -m pdserve.protos.generate` to regenerate", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
