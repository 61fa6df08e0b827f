"""pdserve.v1.Router: validate and tokenize, record the request in Redis, dispatch, relay."""

from __future__ import annotations

import contextlib
import uuid

import grpc

from models.config import ModelConfig
from models.sampling_params import MAX_LOGPROBS, MAX_N
from models.tokenizer import Tokenizer
from protos.pdserve.v1 import router_pb2, router_pb2_grpc
from services.grpc_common.convert import sampling_params_from_proto, with_resolved_seed
from services.grpc_common.errors import AlreadyExistsError, InvalidRequestError, PromptTooLongError
from services.grpc_common.status import map_errors
from services.lifecycle import Lifecycle
from services.router.dispatch import Dispatcher
from services.router.request_telemetry import RequestTelemetry
from services.router.responses import SampleProgressState, StreamState
from services.telemetry.metrics import RouterMetrics

MAX_PROMPT_CHARS = 1_000_000


class RouterServicer(router_pb2_grpc.RouterServicer):
    """The public API. Thin: parse, hand to the Dispatcher, convert."""

    def __init__(self, tokenizer: Tokenizer, model_config: ModelConfig, model_name: str,
                 dispatcher: Dispatcher, max_model_len: int, block_size: int,
                 metrics: RouterMetrics | None = None, lifecycle: Lifecycle | None = None):
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.model_name = model_name
        self.dispatcher = dispatcher
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.metrics = metrics
        self.lifecycle = lifecycle or Lifecycle()
        self.active: dict[str, StreamState] = {}

    def _prompt_ids(self, request: router_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "prompt":
            if len(request.prompt) > MAX_PROMPT_CHARS:
                raise PromptTooLongError(f"prompt has {len(request.prompt)} characters; "
                                         f"the limit is {MAX_PROMPT_CHARS}")
            ids = self.tokenizer.encode(request.prompt)
        elif kind == "prompt_token_ids":
            ids = list(request.prompt_token_ids.ids)
            bad = [t for t in ids if t >= self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt_token_ids holds {bad[0]}, outside the vocabulary "
                                          f"(size {self.model_config.vocab_size})")
        else:
            raise InvalidRequestError("set either prompt or prompt_token_ids")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    @map_errors
    async def Generate(self, request: router_pb2.GenerateRequest, context):
        """Stream the request's tokens: chunks as they come, then one Completion per sample."""
        self.lifecycle.check_accepting("Generate")
        telemetry = RequestTelemetry(self.metrics, context)
        error: BaseException | None = None
        try:
            # aclosing: a client leaving early closes the inner stream now (its cleanup aborts).
            with self.lifecycle.track():
                async with contextlib.aclosing(self._generate(request, telemetry)) as responses:
                    async for response in responses:
                        telemetry.observe(response)
                        yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            telemetry.end(error)

    async def _generate(self, request: router_pb2.GenerateRequest, telemetry: RequestTelemetry):
        prompt_ids = self._prompt_ids(request)
        params = with_resolved_seed(sampling_params_from_proto(request.sampling if request.HasField("sampling") else None))
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                                     f"exceeds the model's context of {self.max_model_len} tokens")
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.active or not await self.dispatcher.store.create(
                request_id, prompt_ids, {"n": params.n, "max_tokens": params.max_tokens}, params.seed):
            raise AlreadyExistsError(f"request_id {request_id!r} is already in use")
        state = StreamState(request_id, len(prompt_ids), [SampleProgressState() for _ in range(params.n)])
        self.active[request_id] = state
        carrier = telemetry.begin(request_id, len(prompt_ids), params)
        try:
            async for response in self.dispatcher.run(state, prompt_ids, params, carrier):
                yield response
        finally:
            self.active.pop(request_id, None)

    @map_errors
    async def Abort(self, request: router_pb2.AbortRequest, context) -> router_pb2.AbortResponse:
        """Abort a running request by id (its stream ends with finish_reason "abort")."""
        state = self.active.get(request.request_id)
        if state is None:
            return router_pb2.AbortResponse(found=False)
        await self.dispatcher.abort(state)
        return router_pb2.AbortResponse(found=True)

    @map_errors
    async def Tokenize(self, request: router_pb2.TokenizeRequest, context) -> router_pb2.TokenizeResponse:
        """Token ids of a text with this model's tokenizer."""
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
