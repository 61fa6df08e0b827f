"""pdserve.v1.Router: validate and tokenize, record the request in Redis, dispatch, relay."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid

from pdserve.models.config import ModelConfig
from pdserve.models.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.admission import AdmissionControl
from pdserve.router.dispatch import Dispatcher, params_record
from pdserve.router.identity import caller_identity
from pdserve.router.request_limits import check_received_tokens, check_request_id
from pdserve.router.request_telemetry import RequestTelemetry
from pdserve.router.responses import SampleProgressState, StreamState
from pdserve.router.resume import params_from_record, resumed_state
from pdserve.runtime.errors import AlreadyExistsError, InvalidRequestError, NotFoundError, PromptTooLongError
from pdserve.runtime.lifecycle import Lifecycle
from pdserve.runtime.sampling_proto import sampling_params_from_proto, with_resolved_seed
from pdserve.runtime.status import map_errors
from pdserve.telemetry.metrics import RouterMetrics
from pdserve.v1 import router_pb2, router_pb2_grpc

MAX_PROMPT_CHARS = 1_000_000


class RouterServicer(router_pb2_grpc.RouterServicer):
    """The public API. Thin: parse, hand to the Dispatcher, convert."""

    def __init__(self, tokenizer: Tokenizer, model_config: ModelConfig, model_name: str,
                 dispatcher: Dispatcher, max_model_len: int, block_size: int,
                 metrics: RouterMetrics | None = None, lifecycle: Lifecycle | None = None,
                 admission: AdmissionControl | None = None):
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.model_name = model_name
        self.dispatcher = dispatcher
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.metrics = metrics
        self.lifecycle = lifecycle or Lifecycle()
        self.admission = admission or AdmissionControl()  # bounded calls in flight: RESOURCE_EXHAUSTED beyond
        self.active: dict[str, StreamState] = {}

    def _prompt_ids(self, request: router_pb2.GenerateRequest, params: SamplingParams) -> list[int]:
        """The request's prompt as token ids, within the context with params.max_tokens, after
        checking every token id it names (prompt and stop_token_ids) against the vocabulary. A
        token-id prompt's length is checked before its ids are read."""
        kind = request.WhichOneof("input")
        if kind == "prompt":
            if not request.prompt:  # else the tokenizer's BOS alone would make it a prompt
                raise InvalidRequestError("the prompt is empty")
            _check_text_length("prompt", request.prompt)
            ids = self.tokenizer.encode(request.prompt)
        elif kind == "prompt_token_ids":
            self._check_context(len(request.prompt_token_ids.ids), params)
            ids = list(request.prompt_token_ids.ids)
            self._check_in_vocab("prompt_token_ids", ids)
        else:
            raise InvalidRequestError("set either prompt or prompt_token_ids")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        self._check_context(len(ids), params)
        self._check_in_vocab("sampling.stop_token_ids", params.stop_token_ids)
        return ids

    def _check_context(self, prompt_tokens: int, params: SamplingParams) -> None:
        """OUT_OF_RANGE when the prompt plus max_tokens exceeds the model's context."""
        if prompt_tokens + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(f"prompt ({prompt_tokens} tokens) + max_tokens ({params.max_tokens}) "
                                     f"exceeds the model's context of {self.max_model_len} tokens")

    def _check_in_vocab(self, field: str, ids) -> None:
        vocab_size = self.model_config.vocab_size
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"{field} holds {bad}, outside the vocabulary (size {vocab_size})")

    @map_errors
    async def Generate(self, request: router_pb2.GenerateRequest, context):
        """Stream the request's tokens: chunks as they come, then one Completion per sample."""
        self.lifecycle.check_accepting("Generate")
        telemetry = RequestTelemetry(self.metrics, context)
        error: BaseException | None = None
        try:
            # aclosing: a client leaving early closes the inner stream now (its cleanup aborts).
            with self.admission.admit(), self.lifecycle.track():
                stream = self._generate(request, caller_identity(context), telemetry)
                async with contextlib.aclosing(stream) as responses:
                    async for response in responses:
                        telemetry.observe(response)
                        yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            telemetry.end(error)

    async def _generate(self, request: router_pb2.GenerateRequest, owner: str, telemetry: RequestTelemetry):
        check_request_id(request.request_id)
        if request.resume:
            state, prompt_ids, params, record, replay = await self._resumed(request, owner)
        else:
            state, prompt_ids, params = await self._created(request, owner)
            record, replay = None, []
        request_id = state.request_id
        self.active[request_id] = state
        carrier = telemetry.begin(request_id, len(prompt_ids), params)
        try:
            for response in replay:
                yield response
            if not state.finished:
                async with contextlib.aclosing(self.dispatcher.run(state, prompt_ids, params, carrier, record)) as rs:
                    async for response in rs:
                        yield response
        finally:
            self.active.pop(request_id, None)
            telemetry.note_route(state.route)

    async def _created(self, request: router_pb2.GenerateRequest, owner: str):
        """Validate a new request and record it in Redis, bound to `owner`: (state, prompt ids,
        params). Every size the client chose is checked before tokenizing or Redis."""
        params = with_resolved_seed(sampling_params_from_proto(request.sampling if request.HasField("sampling") else None))
        prompt_ids = self._prompt_ids(request, params)
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.active or not await self.dispatcher.store.create(
                request_id, prompt_ids, params_record(params), params.seed, owner):
            raise AlreadyExistsError(f"request_id {request_id!r} is already in use (resume it with resume=true)")
        state = StreamState(request_id, len(prompt_ids), [SampleProgressState() for _ in range(params.n)], owner=owner)
        return state, prompt_ids, params

    async def _resumed(self, request: router_pb2.GenerateRequest, owner: str):
        """A reconnecting client's request from its Redis record: (state, prompt ids, params,
        the record as rewritten, responses to send before the continuation). A request another
        identity made is NOT_FOUND, exactly like an unknown one."""
        request_id = request.request_id
        if not request_id:
            raise InvalidRequestError("resume needs the request_id of the request to resume")
        check_received_tokens(len(request.received_tokens))
        active = self.active.get(request_id)
        if active is not None and active.owner == owner:
            raise AlreadyExistsError(f"request_id {request_id!r} is still streaming on this router")
        record = await self.dispatcher.store.get(request_id)
        if record is None or record.owner != owner:
            raise NotFoundError(f"no record of request_id {request_id!r} (never started, or expired)")
        params = params_from_record(record)
        state, replay = resumed_state(record, params, list(request.received_tokens), self.tokenizer)
        # From here on the record holds what the client and this router agree on.
        record = dataclasses.replace(record, sent_tokens=[list(s.token_ids) for s in state.samples],
                                     finished=[s.finish_reason for s in state.samples])
        store = self.dispatcher.store
        await store.wait.call(lambda: store.rewrite(record))  # Redis away: wait, then UNAVAILABLE
        if request_id in self.active:  # a concurrent resume of the same id got here first
            raise AlreadyExistsError(f"request_id {request_id!r} is still streaming on this router")
        return state, record.prompt_token_ids, params, record, replay

    @map_errors
    async def Abort(self, request: router_pb2.AbortRequest, context) -> router_pb2.AbortResponse:
        """Abort a running request by id (its stream ends with finish_reason "abort"). Only the
        identity that made it may: for any other the answer is found=false, as for an unknown id."""
        check_request_id(request.request_id)
        state = self.active.get(request.request_id)
        if state is None or state.owner != caller_identity(context):
            return router_pb2.AbortResponse(found=False)
        await self.dispatcher.abort(state)
        return router_pb2.AbortResponse(found=True)

    @map_errors
    async def Tokenize(self, request: router_pb2.TokenizeRequest, context) -> router_pb2.TokenizeResponse:
        """Token ids of a text with this model's tokenizer."""
        _check_text_length("text", request.text)
        ids = self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        return router_pb2.TokenizeResponse(ids=ids, count=len(ids))

    @map_errors
    async def GetModelInfo(self, request, context) -> router_pb2.ModelInfo:
        """The served model's name, architecture and limits."""
        cfg = self.model_config
        info = router_pb2.ModelInfo(model_name=self.model_name, architecture=cfg.architecture,
                                    vocab_size=cfg.vocab_size, max_model_len=self.max_model_len,
                                    eos_token_ids=sorted(self.tokenizer.eos_token_ids),
                                    block_size=self.block_size, dtype=cfg.torch_dtype, max_n=MAX_N,
                                    max_logprobs=MAX_LOGPROBS)
        if self.tokenizer.bos_token_id is not None:
            info.bos_token_id = self.tokenizer.bos_token_id
        return info


def _check_text_length(field: str, text: str) -> None:
    """OUT_OF_RANGE for a text longer than MAX_PROMPT_CHARS (tokenizing it would hold the loop)."""
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptTooLongError(f"{field} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
