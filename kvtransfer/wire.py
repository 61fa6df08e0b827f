"""The framed wire protocol of the TCP backend (no pickle anywhere).

Every frame is a 16-byte header followed by `payload_len` bytes:

    magic b"PDKV" | version u8 | type u8 | flags u16 (0) | payload_len u64      (network byte order)

Frame types and payloads:
    HELLO     sender -> receiver   UTF-8 JSON: protocol, layout, reservation_id, num_tokens,
                                   dst_block_ids (or null), auth_token (or null), metadata {str: str},
                                   nixl (or null): {agent, metadata (base64), memory, device, num_blocks,
                                   bases}, the sender's offer to let the receiver READ its KV cache;
                                   nixl_required: true when the sender takes no other data path
    HELLO_OK  receiver -> sender   JSON: {"num_blocks": n, "data_path": "tcp" | "nixl", "layout": {...}}
                                   (blocks per layer this transfer fills; how the K/V bytes will
                                   move; the receiver's layout, which may differ from the sender's
                                   in its tensor-parallel size only)
    LAYER     sender -> receiver   12-byte sub-header (layer u32, first_block u32, num_blocks u32),
                                   then, for each of the receiver's tensor-parallel ranks in order,
                                   num_blocks * block_bytes raw bytes of that rank's K heads, then the
                                   same of V (the receiver's layout); blocks are logical (0 = the
                                   reservation's first block)
    FINISH    sender -> receiver   empty: everything is sent
    COMPLETE  receiver -> sender   JSON: {"bytes": n}: the whole KV is in the reserved blocks
    CANCEL    sender -> receiver   empty: the sender gives up
    KEEPALIVE sender -> receiver   empty: still here (the prompt waits to be computed); sent after
                                   SENDER_KEEPALIVE_S without a frame, so a receiver's idle timeout
                                   drops dead senders, not queued ones
    ERROR     either way           JSON: {"code": str, "message": str}; the connection closes after it

On the nixl data path LAYER frames are replaced by
    READY     sender -> receiver   the LAYER sub-header, then num_blocks u32: the sender's physical
                                   blocks holding them; the receiver READs them with NIXL from the
                                   sender's cache before it reads the next frame
and COMPLETE is answered by
    CONFIRM   sender -> receiver   empty: the blocks were still held, the bytes read are good; only
                                   then does the receiver report the transfer done
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any

from pdserve.kvtransfer.errors import KVProtocolError
from pdserve.kvtransfer.layout import KVLayout

MAGIC = b"PDKV"
VERSION = 1
HEADER = struct.Struct("!4sBBHQ")
LAYER_HEADER = struct.Struct("!III")
MAX_JSON_PAYLOAD = 4 << 20  # a HELLO lists block ids: 4 MiB is ~500k of them

SENDER_KEEPALIVE_S = 10.0  # well under the decode server's receiver idle timeout (30 s)

HELLO, HELLO_OK, LAYER, FINISH, COMPLETE, CANCEL, ERROR, KEEPALIVE, READY, CONFIRM = range(1, 11)
FRAME_NAMES = {HELLO: "HELLO", HELLO_OK: "HELLO_OK", LAYER: "LAYER", FINISH: "FINISH",
               COMPLETE: "COMPLETE", CANCEL: "CANCEL", ERROR: "ERROR", KEEPALIVE: "KEEPALIVE",
               READY: "READY", CONFIRM: "CONFIRM"}
DATA_PATHS = ("tcp", "nixl")
NIXL_MEMORY_TYPES = ("DRAM", "VRAM")
MAX_NIXL_METADATA = 64 << 10  # an agent's metadata is ~1.5 KiB


def encode_header(frame_type: int, payload_len: int) -> bytes:
    """The 16-byte header of a frame."""
    return HEADER.pack(MAGIC, VERSION, frame_type, 0, payload_len)


def decode_header(data: bytes) -> tuple[int, int]:
    """Parse and validate a header -> (frame_type, payload_len); KVProtocolError when malformed."""
    magic, version, frame_type, flags, payload_len = HEADER.unpack(data)
    if magic != MAGIC:
        raise KVProtocolError(f"bad frame magic {magic!r} (expected {MAGIC!r}): not a pdserve KV peer")
    if version != VERSION:
        raise KVProtocolError(f"unsupported wire version {version} (this side speaks {VERSION})")
    if frame_type not in FRAME_NAMES:
        raise KVProtocolError(f"unknown frame type {frame_type}")
    if flags != 0:
        raise KVProtocolError(f"frame flags must be 0, got {flags}")
    return frame_type, payload_len


def encode_json_frame(frame_type: int, message: dict[str, Any]) -> bytes:
    """Header + compact JSON payload."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    return encode_header(frame_type, len(payload)) + payload


def decode_json(payload: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object payload; KVProtocolError when it is not one."""
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise KVProtocolError(f"{what} payload is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(message, dict):
        raise KVProtocolError(f"{what} payload must be a JSON object, got {type(message).__name__}")
    return message


def encode_layer_header(layer: int, first_block: int, num_blocks: int, block_bytes: int) -> bytes:
    """Frame header + LAYER sub-header for `num_blocks` blocks of K then V."""
    payload_len = LAYER_HEADER.size + 2 * num_blocks * block_bytes
    return encode_header(LAYER, payload_len) + LAYER_HEADER.pack(layer, first_block, num_blocks)


def encode_ready(layer: int, first_block: int, src_block_ids: list[int]) -> bytes:
    """A READY frame: logical blocks first_block, ... of that layer are computed, in the sender's
    physical blocks src_block_ids (u32 each, after the LAYER sub-header)."""
    count = len(src_block_ids)
    return (encode_header(READY, LAYER_HEADER.size + 4 * count) + LAYER_HEADER.pack(layer, first_block, count)
            + struct.pack(f"!{count}I", *src_block_ids))


@dataclass(frozen=True)
class NixlOffer:
    """What a sender's HELLO says to let the receiver READ its KV cache in place: its NIXL agent's
    name and metadata, the NIXL memory type and device id of its cache, its number of blocks, and
    the address of every cache tensor, in the order K of layer 0, V of layer 0, K of layer 1, ... of
    rank 0, then the same of rank 1, ... (a tensor-parallel server's ranks share their caches with the
    process that talks to the receiver)."""

    agent: str
    metadata: bytes
    memory: str
    device: int
    num_blocks: int
    bases: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """The HELLO's `nixl` object."""
        return {"agent": self.agent, "metadata": base64.b64encode(self.metadata).decode(), "memory": self.memory,
                "device": self.device, "num_blocks": self.num_blocks, "bases": list(self.bases)}

    @classmethod
    def from_dict(cls, data: Any, num_layers: int, num_ranks: int = 1) -> NixlOffer:
        """Parse and bound a HELLO's `nixl` object for a cache of num_layers layers on each of
        num_ranks ranks; KVProtocolError names the bad field."""
        if not isinstance(data, dict):
            raise KVProtocolError("HELLO nixl must be null or an object")
        agent, encoded = data.get("agent"), data.get("metadata")
        if not isinstance(agent, str) or not 0 < len(agent) <= 256:
            raise KVProtocolError("HELLO nixl.agent must be a non-empty string of <= 256 chars")
        if not isinstance(encoded, str) or len(encoded) > MAX_NIXL_METADATA * 4 // 3 + 4:
            raise KVProtocolError(f"HELLO nixl.metadata must be base64 of <= {MAX_NIXL_METADATA} bytes")
        try:
            metadata = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise KVProtocolError("HELLO nixl.metadata is not valid base64") from None
        memory, device, num_blocks, bases = (data.get(k) for k in ("memory", "device", "num_blocks", "bases"))
        if memory not in NIXL_MEMORY_TYPES:
            raise KVProtocolError(f"HELLO nixl.memory must be one of {NIXL_MEMORY_TYPES}")
        if not _is_int(device) or not 0 <= device < 1024:
            raise KVProtocolError("HELLO nixl.device must be an int in [0, 1024)")
        if not _is_int(num_blocks) or not 0 < num_blocks < 1 << 32:
            raise KVProtocolError("HELLO nixl.num_blocks must be a positive 32-bit int")
        if (not isinstance(bases, list) or len(bases) != 2 * num_layers * num_ranks
                or not all(_is_int(b) and 0 < b < 1 << 64 for b in bases)):
            raise KVProtocolError(f"HELLO nixl.bases must list {2 * num_layers * num_ranks} positive 64-bit addresses "
                                  f"(K and V of each layer of each rank)")
        return cls(agent, metadata, memory, device, num_blocks, tuple(bases))


def error_frame(code: str, message: str) -> bytes:
    """An ERROR frame."""
    return encode_json_frame(ERROR, {"code": code, "message": message})


@dataclass(frozen=True)
class Hello:
    """The sender's handshake: which reservation it fills and with what layout."""

    layout: KVLayout
    reservation_id: str
    num_tokens: int
    dst_block_ids: tuple[int, ...] | None = None
    auth_token: str | None = None
    metadata: dict[str, str] | None = None
    nixl: NixlOffer | None = None
    held_blocks: int = 0  # leading blocks the receiver holds already; not sent
    nixl_required: bool = False  # the sender takes no other data path (its --kv-transfer nixl)
    states_ranks: bool = True  # the layout names its tensor-parallel size (releases before TP did not)

    def encode(self) -> bytes:
        """The HELLO frame."""
        return encode_json_frame(HELLO, {
            "protocol": VERSION, "layout": self.layout.to_dict(), "reservation_id": self.reservation_id,
            "num_tokens": self.num_tokens,
            "dst_block_ids": None if self.dst_block_ids is None else list(self.dst_block_ids),
            "auth_token": self.auth_token, "metadata": self.metadata or {},
            "nixl": None if self.nixl is None else self.nixl.to_dict(), "held_blocks": self.held_blocks,
            "nixl_required": self.nixl_required,
        })

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        """Parse and validate a HELLO payload; KVProtocolError names the bad field."""
        msg = decode_json(payload, "HELLO")
        try:
            layout = KVLayout.from_dict(msg.get("layout"))
        except (TypeError, ValueError) as exc:
            raise KVProtocolError(f"HELLO layout: {exc}") from None
        rid = msg.get("reservation_id")
        if not isinstance(rid, str) or not 0 < len(rid) <= 256:
            raise KVProtocolError("HELLO reservation_id must be a non-empty string of <= 256 chars")
        num_tokens = msg.get("num_tokens")
        if not _is_int(num_tokens) or num_tokens < 1:
            raise KVProtocolError(f"HELLO num_tokens must be a positive int, got {num_tokens!r}")
        ids = msg.get("dst_block_ids")
        if ids is not None and (not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids)):
            raise KVProtocolError("HELLO dst_block_ids must be null or a list of non-negative ints")
        token = msg.get("auth_token")
        if token is not None and not isinstance(token, str):
            raise KVProtocolError("HELLO auth_token must be null or a string")
        metadata = msg.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise KVProtocolError("HELLO metadata must be an object of string to string")
        nixl = msg.get("nixl")
        required = msg.get("nixl_required", False)
        if not isinstance(required, bool):
            raise KVProtocolError("HELLO nixl_required must be a boolean")
        held = msg.get("held_blocks", 0)
        if not _is_int(held) or not 0 <= held <= layout.num_blocks_for(num_tokens):
            raise KVProtocolError(f"HELLO held_blocks must be an int in [0, the prompt's blocks], got {held!r}")
        return cls(layout, rid, num_tokens, None if ids is None else tuple(ids), token, metadata,
                   None if nixl is None else NixlOffer.from_dict(nixl, layout.num_layers, layout.tensor_parallel_size),
                   held, required and nixl is not None, "tensor_parallel_size" in msg["layout"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
