"""What every HTTP handler shares: the router link, the tokenizer and chat template, the served
model's name and limits, the metrics, and helpers to read a request."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from pdserve.models.tokenizer import Tokenizer
from pdserve.openai.chat_template import ChatTemplate
from pdserve.openai.errors import OpenAIError, invalid
from pdserve.openai.fields import opt_bool, opt_dict
from pdserve.openai.logprobs import TokenStrings
from pdserve.openai.metrics import Metrics
from pdserve.openai.router_link import RouterLink
from pdserve.openai.sampling import Limits
from pdserve.runtime.channels import PLAINTEXT, ClientSecurity
from pdserve.v1 import router_pb2


@dataclass(frozen=True)
class FrontendConfig:
    """How `pdserve serve openai` was configured.

    router: the router's host:port; model_dir: the checkpoint (tokenizer and chat template);
    model_name: the name clients use (None: the router's GetModelInfo name); api_keys: accepted
    `Authorization: Bearer` keys (empty: no key needed); router_wait_s: how long to wait for
    the router at start; router_security: TLS and the API key for the front end's channel to the router.
    """

    router: str
    model_dir: str
    model_name: str | None = None
    api_keys: tuple[str, ...] = ()
    router_wait_s: float = 120.0
    router_security: ClientSecurity = PLAINTEXT


class Frontend:
    """The shared state of the OpenAI server (one per process); handlers find it with
    `frontend_of(request)`."""

    def __init__(self, config: FrontendConfig, link: RouterLink, tokenizer: Tokenizer,
                 info: router_pb2.ModelInfo) -> None:
        self.config = config
        self.link = link
        self.tokenizer = tokenizer
        self.info = info
        self.model_name = config.model_name or info.model_name
        self.limits = Limits(info.max_model_len, info.max_n or 1, info.max_logprobs)
        self.strings = TokenStrings(tokenizer)
        self.metrics = Metrics()
        self.created = int(time.time())
        source = tokenizer.chat_template
        self.chat_template = ChatTemplate(source, tokenizer.bos_token, tokenizer.eos_token) if source else None

    @classmethod
    async def connect(cls, config: FrontendConfig) -> Frontend:
        """Load the tokenizer and ask the router for the model's facts (waiting for it to come up)."""
        tokenizer = Tokenizer.from_dir(config.model_dir)
        link = RouterLink(config.router, config.router_security)
        try:
            info = await link.model_info(config.router_wait_s)
        except grpc.aio.AioRpcError as error:
            await link.close()
            raise ValueError(f"cannot reach the router at {config.router} within {config.router_wait_s}s "
                             f"({error.code().name}: {error.details()})") from error
        if sorted(tokenizer.eos_token_ids) != sorted(info.eos_token_ids):
            await link.close()
            raise ValueError(f"--model {config.model_dir} is not the router's model: its eos token ids "
                             f"{sorted(tokenizer.eos_token_ids)} differ from the router's {list(info.eos_token_ids)}")
        return cls(config, link, tokenizer, info)

    def check_model(self, body: dict[str, Any]) -> str:
        """The served model's name when the request names it (or names none); else a 404."""
        model = body.get("model")
        if model is None or model == self.model_name:
            return self.model_name
        if not isinstance(model, str):
            raise invalid("model must be a string", "model")
        raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                          param="model", code="model_not_found")


FRONTEND_KEY = web.AppKey("frontend", Frontend)


def frontend_of(request: web.Request) -> Frontend:
    """The Frontend of the application serving `request`."""
    return request.app[FRONTEND_KEY]


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; a 400 when the body is not one."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def read_stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage); stream_options is only allowed with stream true, as OpenAI says."""
    stream = bool(opt_bool(body, "stream"))
    options = opt_dict(body, "stream_options")
    if options is not None and not stream:
        raise invalid("stream_options can only be set when stream is true", "stream_options")
    include_usage = bool(opt_bool(options or {}, "include_usage"))
    return stream, include_usage
