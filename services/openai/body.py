"""Reading a request's JSON body under the application's bounds (limits.HttpOptions).

- A Content-Length over the cap is a 413 before a byte of the body is read; a chunked body is
  cut at the cap (413) as it arrives.
- The whole body must arrive within body_read_timeout_s: a client that drips it (or never ends a
  chunked body) gets a 408, and the connection closes.
- Malformed JSON is a 400. JSON that Python's parser refuses although it is well-formed (nesting
  deeper than the recursion limit, an integer of more than 4300 digits) is parsed again slowly to
  name the field at fault: an overlong integer becomes limits.NumberTooLarge, which the field's
  reader rejects by name; too deep a value is named by its top-level key.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web

from pdserve.openai.limits import HTTP_OPTIONS_KEY, bounded_int
from pdserve.openai.protocol import OpenAIError, invalid

_WHITESPACE = re.compile(r"[ \t\n\r]*")


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 413 when too big, 408 when too slow, 400 when not a JSON object."""
    options = request.app[HTTP_OPTIONS_KEY]
    limit = options.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    try:
        async with asyncio.timeout(options.body_read_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise OpenAIError(408, f"the request body did not arrive within {options.body_read_timeout_s:g} s",
                          code="request_timeout", close=True) from None
    except web.HTTPRequestEntityTooLarge as exc:  # a chunked body that passed the cap
        raise _too_large(None, limit) from exc
    except web.RequestPayloadError as exc:  # a malformed chunked encoding or compressed body
        raise OpenAIError(400, f"the request body cannot be read: {exc}", close=True) from exc
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def _too_large(size: int | None, limit: int) -> OpenAIError:
    told = f"{size} bytes" if size is not None else "over the limit"
    return OpenAIError(413, f"the request body is {told}; at most {limit} bytes are allowed",
                       code="request_too_large", close=True)


def parse_json(raw: bytes) -> Any:
    """The JSON value of `raw`; a 400 (naming the top-level field when it can) when it is not one
    Python can hold."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # (both are ValueErrors: caught first)
        raise invalid(f"the request body is not valid JSON: {exc}") from exc
    except (RecursionError, ValueError):
        pass  # nested too deep, or an integer too long for int(): parse again below to find where
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    try:
        return json.loads(text, parse_int=bounded_int)
    except RecursionError:
        field = _too_deep_member(text)
        raise invalid(f"{field or 'the request body'} is nested too deeply", field) from None
    except ValueError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from exc


def _too_deep_member(text: str) -> str | None:
    """The key of the first member of a top-level JSON object whose value is nested too deeply
    for the parser; None when the body is no object or no single member is at fault."""
    decoder = json.JSONDecoder(parse_int=bounded_int)
    i = _WHITESPACE.match(text).end()
    if text[i:i + 1] != "{":
        return None
    i = _WHITESPACE.match(text, i + 1).end()
    try:
        while text[i:i + 1] == '"':
            key, i = decoder.raw_decode(text, i)
            i = _WHITESPACE.match(text, i).end()
            if text[i:i + 1] != ":":
                return None
            i = _WHITESPACE.match(text, i + 1).end()
            try:
                _, i = decoder.raw_decode(text, i)
            except RecursionError:
                return key[:64]  # (a client's string: echoed back only in short)
            i = _WHITESPACE.match(text, i).end()
            if text[i:i + 1] != ",":
                return None
            i = _WHITESPACE.match(text, i + 1).end()
    except ValueError:
        return None
    return None
