"""Every command-line flag group of pdserve, each with its PDSERVE_* environment-variable equivalent
(what compose and Kubernetes pass), and the functions that turn parsed flags into the typed
objects the library takes (EngineArgs, TlsConfig, ClientSecurity, TelemetrySettings). Library
modules never see an argparse.Namespace: the CLI builds their settings here and in serve.py.

No heavy imports at module level: the parser is built for every command, the healthcheck too."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.engine.setup import EngineArgs
    from pdserve.runtime.channels import ClientSecurity
    from pdserve.runtime.tls import TlsConfig
    from pdserve.settings import TelemetrySettings

DEFAULT_DRAIN_TIMEOUT_S = 30.0
KV_CACHE_DTYPES = ("auto", "int8", "fp8")  # pdserve.kernels.kv_quant.KV_CACHE_DTYPES (checked by a test)
CPU_LINEAR_BACKENDS = ("auto", "native", "onednn", "none")  # pdserve.models.cpu_packed_linear's (tested)
SPECULATIVE_METHODS = ("none", "ngram", "draft")  # pdserve.engine.speculation.SPECULATIVE_METHODS (tested)


def env_default(flag: str, default=None, kind=str):
    """Default for `--some-flag`: $PDSERVE_SOME_FLAG when set (converted by `kind`), else `default`."""
    name = "PDSERVE_" + flag.lstrip("-").replace("-", "_").upper()
    raw = os.environ.get(name)
    if raw is None:
        return default
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        return kind(raw)
    except ValueError as exc:
        raise SystemExit(f"pdserve: error: ${name}={raw!r} is not a valid {kind.__name__}") from exc


def add_flag(parser: argparse.ArgumentParser, flag: str, default=None, kind=str, help: str = "",
             **kwargs) -> None:
    """Add `flag` whose default comes from its PDSERVE_* variable; help text names the variable."""
    env = "PDSERVE_" + flag.lstrip("-").replace("-", "_").upper()
    if kind is bool:
        parser.add_argument(flag, action="store_true", default=env_default(flag, default or False, bool),
                            help=f"{help} [env {env}]", **kwargs)
    else:
        parser.add_argument(flag, type=kind, default=env_default(flag, default, kind),
                            help=f"{help} [env {env}]", **kwargs)


# --- engine ---------------------------------------------------------------------------------

def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Flags (and PDSERVE_* variables) for EngineArgs."""
    add_flag(parser, "--model", None, str, "Hugging Face checkpoint directory, .gguf file (or a directory holding one), "
             "or Hub id ORG/NAME[@REVISION] (fetched into the Hugging Face cache; HF_HOME, HF_TOKEN, HF_HUB_OFFLINE)",
             required=False)
    add_flag(parser, "--dtype", None, str, "float32 | bfloat16 | float16 (default: the checkpoint's)")
    add_flag(parser, "--device", None, str, "cpu or cuda (default: cuda when a GPU is present, else cpu)")
    add_flag(parser, "--block-size", 16, int, "tokens per KV block")
    add_flag(parser, "--kv-cache-mb", 512, int, "memory for the KV cache, MiB")
    add_flag(parser, "--max-num-seqs", 64, int, "running sequences at once")
    add_flag(parser, "--max-num-batched-tokens", 2048, int, "tokens computed per step")
    add_flag(parser, "--max-model-len", None, int, "prompt + output limit (default: the model's)")
    add_flag(parser, "--no-prefix-caching", False, bool, "turn the prefix cache off")
    add_flag(parser, "--threads", None, int, "torch CPU threads (default: torch's choice)")
    add_flag(parser, "--single-thread-step-tokens", 32, int,
             "CPU steps of fewer tokens than this (small decode batches) run on one torch thread: "
             "their matmuls gain little from a second thread, and one descheduled by another process "
             "stalls the whole step (0: every step uses --threads)")
    add_flag(parser, "--cpu-linear", "auto", str,
             "bfloat16 linear layers on the CPU: native (pdserve's AVX-512 BF16 kernel, built on first use), "
             "onednn (torch's oneDNN, weights reordered once), none (plain F.linear), auto (native where the "
             "CPU and a C++ compiler allow it, else onednn); the other native CPU kernels (attention, norms) "
             "follow PDSERVE_CPU_NATIVE=auto|off", choices=CPU_LINEAR_BACKENDS)
    add_flag(parser, "--tensor-parallel-size", 1, int,
             "split the model over this many rank processes (heads, MLP and vocabulary; gloo on CPUs); a prefill "
             "and a decode server may use different sizes (the KV transfer maps heads between them)")
    add_flag(parser, "--speculative", "none", str,
             "speculative decoding on decode steps: none | ngram (prompt lookup: propose what followed the last "
             "tokens' earlier occurrence) | draft (a small model, --draft-model, proposes); proposals are verified "
             "in one forward and every token stays the one the model would draw", choices=SPECULATIVE_METHODS)
    add_flag(parser, "--draft-model", None, str,
             "the draft checkpoint for --speculative draft (directory, .gguf file or Hub id; the model's tokenizer); "
             "its KV cache has as many blocks as the model's")
    add_flag(parser, "--num-speculative-tokens", 4, int, "tokens proposed per sample and decode step, in [1, 16]")
    add_flag(parser, "--speculative-max-batch", None, int,
             "speculate only in steps with at most this many running samples (larger batches are compute-bound; "
             "default: 4 for ngram, 1 for draft, the crossovers measured on CPUs)")
    add_flag(parser, "--kv-cache-dtype", "auto", str,
             "KV cache dtype: auto (the model's) | int8 | fp8 (e4m3), with per-block scales",
             choices=KV_CACHE_DTYPES)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """EngineArgs from the engine flags; a clear error when the model is missing."""
    from pdserve.engine.setup import EngineArgs, default_device
    from pdserve.models.source import names_a_model

    if not ns.model:
        raise ValueError("--model (a checkpoint directory, .gguf file or Hub id; or PDSERVE_MODEL) is required")
    if not names_a_model(ns.model):
        raise FileNotFoundError(f"--model {ns.model}: no such file or directory (and not a Hub id ORG/NAME[@REVISION])")
    if ns.kv_cache_dtype not in KV_CACHE_DTYPES:  # an invalid PDSERVE_KV_CACHE_DTYPE skips argparse
        raise ValueError(f"--kv-cache-dtype {ns.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    if ns.speculative not in SPECULATIVE_METHODS:  # likewise PDSERVE_SPECULATIVE
        raise ValueError(f"--speculative {ns.speculative!r} is not one of {', '.join(SPECULATIVE_METHODS)}")
    if ns.draft_model and not names_a_model(ns.draft_model):
        raise FileNotFoundError(f"--draft-model {ns.draft_model}: no such file or directory (and not a Hub id)")
    if ns.cpu_linear not in CPU_LINEAR_BACKENDS:  # likewise PDSERVE_CPU_LINEAR
        raise ValueError(f"--cpu-linear {ns.cpu_linear!r} is not one of {', '.join(CPU_LINEAR_BACKENDS)}")
    return EngineArgs(model=ns.model, dtype=ns.dtype, device=ns.device or default_device(),
                      block_size=ns.block_size, kv_cache_mb=ns.kv_cache_mb, max_num_seqs=ns.max_num_seqs,
                      max_num_batched_tokens=ns.max_num_batched_tokens, max_model_len=ns.max_model_len,
                      enable_prefix_caching=not ns.no_prefix_caching, threads=ns.threads,
                      kv_cache_dtype=ns.kv_cache_dtype, single_thread_step_tokens=ns.single_thread_step_tokens,
                      cpu_linear=ns.cpu_linear, tensor_parallel_size=ns.tensor_parallel_size,
                      speculative=ns.speculative, num_speculative_tokens=ns.num_speculative_tokens,
                      speculative_max_batch=ns.speculative_max_batch, draft_model=ns.draft_model)


# --- TLS, API keys, secrets -------------------------------------------------------------------

def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """Add --tls-cert, --tls-key, --tls-ca, --tls-server-name and --tls (see pdserve.runtime.tls)."""
    add_flag(parser, "--tls-cert", None, str, "PEM certificate (chain) of this process: servers listen with "
             "TLS, and it is the client certificate presented to peers under mutual TLS")
    add_flag(parser, "--tls-key", None, str, "PEM private key of --tls-cert")
    add_flag(parser, "--tls-ca", None, str, "PEM CA bundle that verifies peers; on a server it makes client "
             "certificates required (mutual TLS)")
    add_flag(parser, "--tls-server-name", None, str, "name expected in peers' certificates "
             "(default: the host dialled)")
    add_flag(parser, "--tls", False, bool, "dial with TLS even without --tls-ca (system root CAs)")


def tls_from(ns: argparse.Namespace) -> TlsConfig | None:
    """The config the TLS flags describe; None when none is set (plaintext)."""
    from pdserve.runtime.tls import TlsConfig

    cert, key, ca = (getattr(ns, name, None) for name in ("tls_cert", "tls_key", "tls_ca"))
    if not (cert or key or ca or getattr(ns, "tls", False)):
        return None
    return TlsConfig(cert, key, ca, getattr(ns, "tls_server_name", None))


def add_client_security_flags(parser: argparse.ArgumentParser, api_key_help: str | None = None) -> None:
    """The TLS flags and, unless api_key_help is None, --api-key (the key sent to the router)."""
    add_tls_flags(parser)
    if api_key_help is not None:
        add_flag(parser, "--api-key", None, str, api_key_help)


def client_security_from(ns: argparse.Namespace, api_key_flag: str | None = "api_key") -> ClientSecurity:
    """How a client dials, from the TLS flags and the flag named `api_key_flag` (None: no key)."""
    from pdserve.runtime.channels import ClientSecurity

    key = getattr(ns, api_key_flag, None) if api_key_flag else None
    return ClientSecurity(tls_from(ns), key or None)


def add_server_security_flags(parser: argparse.ArgumentParser) -> None:
    """TLS flags, --kv-auth-token, --router-api-key and --redis-ca (--api-key is the role's own).
    Secrets are best passed through the PDSERVE_* variables: command lines are visible to every
    user of the machine."""
    add_tls_flags(parser)
    add_flag(parser, "--kv-auth-token", None, str, "prefill/decode: shared secret of the KV transfer port; the "
             "decode refuses senders that do not present it (set the same value on both)")
    add_flag(parser, "--router-api-key", None, str, "openai: the API key it sends to the router "
             "(one of the router's --api-key keys)")
    add_flag(parser, "--redis-ca", None, str, "PEM CA bundle verifying a rediss:// Redis "
             "(default: the system's roots; user:password@ in --redis-url for AUTH/ACL)")


# --- telemetry and shutdown -------------------------------------------------------------------

def add_telemetry_flags(parser: argparse.ArgumentParser) -> None:
    """--otlp-endpoint, --metrics-port, --metrics-host, --log-json, --log-level and --drain-timeout-s."""
    add_flag(parser, "--otlp-endpoint", None, str,
             "OTLP/gRPC collector for traces, host:port or http://host:port (default: "
             "$OTEL_EXPORTER_OTLP_ENDPOINT; neither set: tracing off)")
    add_flag(parser, "--metrics-port", None, int,
             "serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; unset: off)")
    add_flag(parser, "--metrics-host", None, str, "address the metrics server listens on (default: --host)")
    add_flag(parser, "--log-json", False, bool, "log one JSON object per line (with request and trace ids)")
    add_flag(parser, "--log-level", "INFO", str, "DEBUG, INFO, WARNING or ERROR")
    add_flag(parser, "--drain-timeout-s", DEFAULT_DRAIN_TIMEOUT_S, float,
             "on SIGTERM: seconds to finish in-flight requests before exiting (a second signal: at once)")


def telemetry_from(ns: argparse.Namespace) -> TelemetrySettings:
    """TelemetrySettings from the telemetry flags."""
    from pdserve.settings import TelemetrySettings

    return TelemetrySettings(otlp_endpoint=ns.otlp_endpoint, metrics_port=ns.metrics_port,
                             metrics_host=ns.metrics_host, log_json=bool(ns.log_json),
                             log_level=ns.log_level or "INFO")
