"""Fuzz payloads for the service fuzz test: random bytes, byte-level mutations of a valid
serialized message (bit flips, overwrites, cuts, insertions, truncation) and field-level
mutations (fields set to edge values through the message's descriptor), all drawn from one
seeded random.Random so a failing run can be replayed."""

from __future__ import annotations

import math
import random

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

FD = FieldDescriptor
INT32 = [0, 1, -1, 2, 16, 17, 255, 256, 2**31 - 1, -(2**31)]
UINT32 = [0, 1, 2, 15, 16, 17, 20, 21, 255, 256, 4096, 2**31, 2**32 - 1]
INT64 = [0, 1, -1, 2**63 - 1, -(2**63)]
UINT64 = [0, 1, 2**63, 2**64 - 1]
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 1e-30, 1e38, -1.0, 0.5, 1.0, 2.0, 2.5, 10.0, 101.0]
STRINGS = ["", "a", "x" * 300, "\u00e9\u4e2d\U0001f600", "\x00\x01", "127.0.0.1:1", "127.0.0.1", "a" * 2000,
           "grpc.health.v1.Health", "pdserve.v1.Router"]


def random_bytes(rng: random.Random) -> bytes:
    """Random bytes, usually short, sometimes a few KB."""
    size = rng.choice([0, 1, 2, 3, 5, 8, 16, 64, 256, rng.randint(0, 4096)])
    return rng.randbytes(size)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """data with 1-4 byte-level mutations."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # flip one bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # overwrite a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:  # cut a range
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == 3:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:  # truncate
            del buf[pos:]
        else:  # repeat a chunk
            buf[pos:pos] = buf[pos:pos + rng.randint(1, 16)]
    return bytes(buf)


def _scalar(rng: random.Random, field: FieldDescriptor):
    cpp = field.cpp_type
    if cpp == FD.CPPTYPE_INT32:
        return rng.choice(INT32 + [rng.randint(-1000, 1000)])
    if cpp == FD.CPPTYPE_UINT32:
        return rng.choice(UINT32 + [rng.randint(0, 1000)])
    if cpp == FD.CPPTYPE_INT64:
        return rng.choice(INT64 + [rng.randint(-1000, 1000)])
    if cpp == FD.CPPTYPE_UINT64:
        return rng.choice(UINT64 + [rng.randint(0, 1000)])
    if cpp in (FD.CPPTYPE_FLOAT, FD.CPPTYPE_DOUBLE):
        return rng.choice(FLOATS + [rng.uniform(-5, 5)])
    if cpp == FD.CPPTYPE_BOOL:
        return rng.random() < 0.5
    if cpp == FD.CPPTYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99])
    if cpp == FD.CPPTYPE_STRING:
        if field.type == FD.TYPE_BYTES:
            return rng.randbytes(rng.randint(0, 32))
        return rng.choice(STRINGS + ["".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(1, 20)))])
    raise TypeError(f"no generator for {field.full_name}")


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _mutate_field(rng: random.Random, message: Message, field: FieldDescriptor, depth: int) -> None:
    value = getattr(message, field.name)
    if _is_map(field):
        value.clear()
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        for _ in range(rng.randint(0, 5)):
            value[_scalar(rng, key_field)] = _scalar(rng, value_field)
    elif field.is_repeated and field.cpp_type == FD.CPPTYPE_MESSAGE:
        if rng.random() < 0.3:
            del value[:]
        for _ in range(rng.randint(0, 3)):
            mutate_fields(rng, value.add(), depth + 1)
    elif field.is_repeated:
        del value[:]
        count = rng.choice([0, 1, 2, 5, 17, 300, rng.randint(0, 50)])
        value.extend(_scalar(rng, field) for _ in range(count))
    elif field.cpp_type == FD.CPPTYPE_MESSAGE:
        if rng.random() < 0.2:
            message.ClearField(field.name)
        else:
            mutate_fields(rng, value, depth + 1)
    else:
        setattr(message, field.name, _scalar(rng, field))


def mutate_fields(rng: random.Random, message: Message, depth: int = 0) -> Message:
    """Set 1-3 random fields of message (in place) to edge or random values; returns it."""
    fields = message.DESCRIPTOR.fields
    if not fields or depth > 3:
        return message
    for _ in range(rng.randint(1, 3)):
        _mutate_field(rng, message, rng.choice(fields), depth)
    return message


def fuzz_payload(rng: random.Random, valid: Message) -> tuple[str, bytes]:
    """(kind, bytes): random bytes, a byte mutation of `valid`, a field mutation of it, or
    (rarely) `valid` itself."""
    roll = rng.random()
    if roll < 0.2:
        return "random", random_bytes(rng)
    if roll < 0.5:
        return "bytes", mutate_bytes(rng, valid.SerializeToString())
    if roll < 0.95:
        copy = type(valid)()
        copy.CopyFrom(valid)
        return "fields", mutate_fields(rng, copy).SerializeToString()
    return "valid", valid.SerializeToString()
