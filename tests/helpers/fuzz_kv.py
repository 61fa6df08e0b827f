"""One fuzz connection to a decode server's KV transfer port: random bytes, frames with random
headers, mutated or truncated HELLOs, or a valid HELLO for a real reservation followed by
garbage, truncated or out-of-range LAYER frames, an early FINISH, a CANCEL, or a whole valid
transfer. The connection's write side is then closed; the outcome is the frames the receiver
answered with (or "closed"), or "no-answer" if it neither answered nor closed."""

from __future__ import annotations

import asyncio
import json
import random

from helpers.fuzz_messages import mutate_bytes, random_bytes
from helpers.fuzz_seeds import FuzzContext, request_id_for
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.tcp_sender import parse_endpoint

ANSWER_TIMEOUT_S = 15.0
KINDS = ("random", "random-header", "mutated-hello", "truncated-hello", "hello-unknown-reservation",
         "hello-then-random", "hello-then-bad-layer", "hello-then-truncated-layer", "hello-then-finish",
         "hello-then-cancel", "whole-transfer")


def _hello(ctx: FuzzContext, reservation_id: str, num_tokens: int, block_ids) -> bytes:
    return wire.Hello(ctx.layout, reservation_id, num_tokens, tuple(block_ids)).encode()


def _layers(ctx: FuzzContext, rng: random.Random, num_blocks: int) -> bytes:
    """Every layer's blocks as valid LAYER frames of random bytes."""
    block_bytes = ctx.layout.block_bytes
    return b"".join(wire.encode_layer_header(layer, 0, num_blocks, block_bytes)
                    + rng.randbytes(2 * num_blocks * block_bytes) for layer in range(ctx.layout.num_layers))


def _after_hello(kind: str, ctx: FuzzContext, rng: random.Random, num_blocks: int) -> bytes:
    block_bytes = ctx.layout.block_bytes
    if kind == "hello-then-random":
        return random_bytes(rng)
    if kind == "hello-then-bad-layer":
        layer, first, count = rng.choice([(99, 0, 1), (0, num_blocks, 1), (0, 0, 0), (0, 0, num_blocks + 5)])
        return wire.encode_layer_header(layer, first, count, block_bytes)
    if kind == "hello-then-truncated-layer":
        frame = _layers(ctx, rng, num_blocks)
        return frame[:rng.randrange(1, len(frame))]
    if kind == "hello-then-finish":
        return wire.encode_header(wire.FINISH, 0)
    if kind == "hello-then-cancel":
        return wire.encode_header(wire.CANCEL, 0)
    return _layers(ctx, rng, num_blocks) + wire.encode_header(wire.FINISH, 0)  # whole-transfer


async def _payload(kind: str, ctx: FuzzContext, rng: random.Random) -> tuple[bytes, set[str]]:
    """(the bytes to send, the request ids of the reservations made for them)."""
    unknown = _hello(ctx, request_id_for(rng) + "/0", 20, [0, 1])
    if kind == "random":
        return random_bytes(rng), set()
    if kind == "random-header":
        return wire.HEADER.pack(rng.choice([wire.MAGIC, b"PDKX"]), rng.choice([1, 2]), rng.randrange(10), 0,
                                rng.choice([0, 1, 12, 1 << 22, (1 << 64) - 1])) + random_bytes(rng), set()
    if kind == "mutated-hello":
        return mutate_bytes(rng, unknown), set()
    if kind == "truncated-hello":
        return unknown[:rng.randrange(len(unknown))], set()
    if kind == "hello-unknown-reservation":
        return unknown, set()
    num_tokens = rng.randint(1, 40)
    reservation = await ctx.reserve(rng, num_tokens)
    hello = _hello(ctx, reservation.reservation_id, num_tokens, reservation.block_ids)
    request_id = reservation.reservation_id.rsplit("/", 1)[0]
    return hello + _after_hello(kind, ctx, rng, len(reservation.block_ids)), {request_id}


def _answer(data: bytes) -> str:
    """The frames in data, in order ("HELLO_OK+ERROR:protocol_error", an ERROR with its code),
    or "closed" when the receiver closed without a frame."""
    names = []
    while len(data) >= wire.HEADER.size:
        frame_type, size = wire.decode_header(data[:wire.HEADER.size])
        payload, data = data[wire.HEADER.size:wire.HEADER.size + size], data[wire.HEADER.size + size:]
        code = ":" + json.loads(payload)["code"] if frame_type == wire.ERROR else ""
        names.append(wire.FRAME_NAMES[frame_type] + code)
    return "+".join(names) or "closed"


async def fuzz_kv_connection(rng: random.Random, ctx: FuzzContext) -> str:
    """Send one fuzz payload to the KV port; returns "<kind> -> <the answer's frames>"."""
    kind = rng.choice(KINDS)
    payload, reserved = await _payload(kind, ctx, rng)
    reader, writer = await asyncio.open_connection(*parse_endpoint(ctx.kv_endpoint))
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = _answer(await asyncio.wait_for(reader.read(), ANSWER_TIMEOUT_S))
    except TimeoutError:
        answer = "no-answer"
    except ConnectionError:
        answer = "reset"
    finally:
        writer.close()
        await ctx.release(reserved)  # this connection's reservation, if it made one
    return f"{kind} -> {answer}"
