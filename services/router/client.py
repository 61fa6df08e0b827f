"""A client of the router's public API: stream a generation (used by `pdserve generate --router`)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from pdserve.engine.outputs import RequestOutput, SampleOutput
from pdserve.models.sampling_params import SamplingParams
from pdserve.runtime.channels import CHANNEL_OPTIONS, PLAINTEXT, ClientSecurity
from pdserve.runtime.sampling_proto import structured_to_proto
from pdserve.v1 import router_pb2, router_pb2_grpc


def sampling_params_to_proto(params: SamplingParams) -> router_pb2.SamplingParams:
    """The public message for SamplingParams (every field set explicitly)."""
    msg = router_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        stop=params.stop, stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
        n=params.n, min_tokens=params.min_tokens, no_speculation=not params.speculative,
        logit_bias=dict(params.logit_bias), structured_output=structured_to_proto(params.structured))
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


class RouterCallError(ValueError):
    """The router ended the call with an error status (`code`): refused credentials, bad input..."""

    def __init__(self, address: str, error: grpc.RpcError):
        self.code = error.code()
        super().__init__(f"the router at {address} answered {self.code.name}: {error.details()}")


def stream_from_router(address: str, prompt: str, params: SamplingParams, timeout_s: float = 600.0,
                       security: ClientSecurity = PLAINTEXT) -> Iterator[RequestOutput]:
    """Yield RequestOutput-shaped deltas (one sample each) as the router streams them
    (`security`: TLS and the API key to dial with); RouterCallError when the call fails."""
    with security.channel(address, CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        request = router_pb2.GenerateRequest(prompt=prompt, sampling=sampling_params_to_proto(params))
        try:
            yield from _outputs(stub.Generate(request, timeout=timeout_s))
        except grpc.RpcError as error:
            raise RouterCallError(address, error) from None


def _outputs(responses) -> Iterator[RequestOutput]:
    for response in responses:
        if response.HasField("prompt_logprobs"):
            continue  # (this client streams text)
        if response.HasField("chunk"):
            c = response.chunk
            sample = SampleOutput(index=c.index, token_ids=list(c.token_ids), text=c.text)
            yield RequestOutput(response.request_id, [sample], 0, 0, False)
        else:
            done = response.complete
            sample = SampleOutput(index=done.index, finish_reason=done.finish_reason)
            yield RequestOutput(response.request_id, [sample], done.prompt_tokens,
                                done.cached_tokens, False)
