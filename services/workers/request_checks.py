"""Checks on the internal worker requests (Reserve, Decode, Prefill, colocated Generate) made
before anything is held, so a malformed call is refused at once with a message naming the
field, instead of after a KV wait, a transfer handshake or an engine step; and the translation
of KV-transfer failures into the gRPC statuses the prefill server answers with.

Status codes (through pdserve.runtime.status): InvalidRequestError -> INVALID_ARGUMENT,
PromptTooLongError -> OUT_OF_RANGE, AlreadyExistsError -> ALREADY_EXISTS, NotFoundError ->
NOT_FOUND, IncompatiblePeerError -> FAILED_PRECONDITION, UnavailableError -> UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from pdserve.engine.prefilled import check_progress, first_token_params
from pdserve.engine.validation import blocks_for, worst_case_blocks
from pdserve.kvtransfer.errors import KVAuthError, KVLayoutMismatch, KVTransferError, UnknownReservation
from pdserve.models.sampling_params import MAX_N, SamplingParams
from pdserve.runtime.errors import (
    AlreadyExistsError,
    IncompatiblePeerError,
    InvalidRequestError,
    NotFoundError,
    PromptTooLongError,
    UnavailableError,
)

MAX_LEASE_MS = 600_000  # a reservation may hold its blocks at most 10 minutes without KV
MAX_REQUEST_ID_CHARS = 243  # reservation ids ("<request_id>/<12 hex>") must fit the KV receiver's 256


# Printable ASCII without space: the router's ids (pdserve.router.request_limits) and the
# attempt ids it derives from them ("<id>~<8 hex>"), and nothing that could end a log line.
_REQUEST_ID = re.compile(r"[\x21-\x7e]+")


def check_request_id(request_id: str) -> None:
    """INVALID_ARGUMENT unless request_id is a non-empty id of at most MAX_REQUEST_ID_CHARS
    printable ASCII characters other than space."""
    if not request_id:
        raise InvalidRequestError("request_id is required")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(f"request_id has {len(request_id)} characters; "
                                  f"the limit is {MAX_REQUEST_ID_CHARS}")
    if _REQUEST_ID.fullmatch(request_id) is None:
        raise InvalidRequestError(f"request_id {request_id!r} holds a character other than printable "
                                  "ASCII without space")


def check_reserve(request, engine) -> None:
    """A ReserveRequest the decode engine could serve: ids and counts in range, prompt plus
    max_tokens within max_model_len (OUT_OF_RANGE), the whole request within the engine's KV
    blocks (OUT_OF_RANGE), a lease of at most MAX_LEASE_MS."""
    check_request_id(request.request_id)
    if request.prompt_tokens < 1:
        raise InvalidRequestError("prompt_tokens must be >= 1")
    if request.max_tokens < 1:
        raise InvalidRequestError("max_tokens must be >= 1")
    if not 1 <= request.n <= MAX_N:
        raise InvalidRequestError(f"n must be in [1, {MAX_N}], got {request.n}")
    if request.lease_ms > MAX_LEASE_MS:
        raise InvalidRequestError(f"lease_ms must be at most {MAX_LEASE_MS} (0: the server's default), "
                                  f"got {request.lease_ms}")
    if request.prompt_token_ids and len(request.prompt_token_ids) != request.prompt_tokens:
        raise InvalidRequestError(f"prompt_token_ids has {len(request.prompt_token_ids)} tokens, prompt_tokens "
                                  f"says {request.prompt_tokens}")
    total = request.prompt_tokens + request.max_tokens
    if total > engine.max_model_len:
        raise PromptTooLongError(f"prompt ({request.prompt_tokens} tokens) + max_tokens ({request.max_tokens}) "
                                 f"exceeds the model's context of {engine.max_model_len} tokens")
    params = SamplingParams(max_tokens=request.max_tokens, n=request.n)
    needed = worst_case_blocks(request.prompt_tokens, params, engine.config.block_size)
    if needed > engine.num_blocks:
        raise PromptTooLongError(f"the request may need {needed} KV blocks but this server has "
                                 f"{engine.num_blocks}")


def check_decode(request, params: SamplingParams, engine, reserved_prompt_tokens: int | None) -> None:
    """A DecodeRequest the engine would accept (the checks LLMEngine.add_prefilled_request makes),
    and, when it names a reservation holding KV for reserved_prompt_tokens tokens, a prompt of
    that length whose every sample has its first token."""
    check_request_id(request.request_id)
    prompt = list(request.prompt_token_ids)
    engine.validate_request(prompt, params)
    if not request.samples:
        raise InvalidRequestError("samples is empty: at least one sample must continue")
    generated = [list(s.generated_token_ids) for s in request.samples]
    check_progress(prompt, params, generated, [s.index for s in request.samples],
                   request.cached_tokens, engine.vocab_size, None)
    if reserved_prompt_tokens is None:
        return
    if any(not tokens for tokens in generated):
        raise InvalidRequestError("a sample continued from prefilled KV needs its first token "
                                  "(samples[].generated_token_ids is empty)")
    if reserved_prompt_tokens != len(prompt):
        raise InvalidRequestError(f"reservation {request.reservation_id!r} holds KV for {reserved_prompt_tokens} "
                                  f"prompt tokens, the request's prompt has {len(prompt)}")


def check_prefill(request, params: SamplingParams, engine) -> None:
    """A PrefillRequest the engine would accept (it runs the prompt with first_token_params:
    the decode server, not this one, must have room for the whole generation), whose kv_target
    has a block id for every block of the prompt (the decode server checks they are its
    reservation's)."""
    check_request_id(request.request_id)
    prompt = list(request.prompt_token_ids)
    engine.validate_request(prompt, first_token_params(params))
    target = request.kv_target
    if not target.reservation_id:
        raise InvalidRequestError("kv_target.reservation_id is required")
    needed = blocks_for(len(prompt), engine.config.block_size)
    if len(target.block_ids) < needed:
        raise InvalidRequestError(f"kv_target has {len(target.block_ids)} block ids; a prompt of {len(prompt)} "
                                  f"tokens needs {needed} blocks of {engine.config.block_size}")
    if target.held_blocks > needed:
        raise InvalidRequestError(f"kv_target.held_blocks {target.held_blocks} exceeds the prompt's {needed} blocks")


def transfer_error(exc: BaseException, endpoint: str) -> BaseException:
    """The pdserve error a failed KV handshake with `endpoint` becomes (exc itself when it is
    neither a KVTransferError nor an OSError, e.g. a malformed endpoint's ValueError)."""
    where = f"the KV receiver at {endpoint}"
    if isinstance(exc, UnknownReservation):
        return NotFoundError(f"{where}: {exc}")
    if isinstance(exc, (KVLayoutMismatch, KVAuthError)):
        return IncompatiblePeerError(f"{where} refused this prefill server: {exc}")
    if isinstance(exc, KVTransferError) and exc.code == "size_mismatch":
        return InvalidRequestError(f"kv_target does not match the reservation at {where}: {exc}")
    if isinstance(exc, KVTransferError) and exc.code == "reservation_busy":
        return AlreadyExistsError(f"{where}: {exc}")
    if isinstance(exc, TimeoutError):
        return UnavailableError(f"{where} did not answer the KV handshake in time: {exc}")
    if isinstance(exc, (KVTransferError, OSError)):
        return UnavailableError(f"{where} cannot be reached: {exc}")
    return exc


class RequestIds:
    """Request ids a servicer is serving now: a second call with an id in use is refused with
    ALREADY_EXISTS (on a prefill server it would replace the first call's KV transfer)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    @contextlib.contextmanager
    def hold(self, request_id: str) -> Iterator[None]:
        """Mark request_id in use for the enclosed block (no await between check and mark)."""
        check_request_id(request_id)
        if request_id in self._ids:
            raise AlreadyExistsError(f"request {request_id!r} is already running on this worker")
        self._ids.add(request_id)
        try:
            yield
        finally:
            self._ids.discard(request_id)
