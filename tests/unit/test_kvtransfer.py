"""KV transfer over TCP: bit-exact delivery into reserved blocks, handshake checks, API validation.

Real sockets on 127.0.0.1, port 0; the sender and the receiver run in this process on their threads.
"""

from __future__ import annotations

import socket

import pytest
import torch

from helpers.kv_testing import (
    LAYOUT,
    NUM_BLOCKS,
    Outcomes,
    assert_blocks_equal,
    assert_blocks_zero,
    random_caches,
    send_all,
    zero_caches,
)
from pdserve.kvtransfer import (
    KVAuthError,
    KVLayout,
    KVLayoutMismatch,
    KVTransferError,
    TCPKVReceiver,
    TCPKVSender,
    UnknownReservation,
    wire,
)
from pdserve.kvtransfer.errors import KVProtocolError
from pdserve.kvtransfer.sockio import recv_exact


@pytest.fixture
def dst_caches():
    return zero_caches(LAYOUT, NUM_BLOCKS)


@pytest.fixture
def receiver(dst_caches):
    rx = TCPKVReceiver(dst_caches, handshake_timeout_s=5.0)
    rx.start()
    yield rx
    rx.stop()


def test_layers_land_bit_exact_in_the_reserved_blocks(receiver, dst_caches):
    src = random_caches(LAYOUT, NUM_BLOCKS)
    src_ids, dst_ids = [3, 4, 5, 20, 7], [30, 2, 11, 12, 0]
    outcomes = Outcomes()
    receiver.expect("r1", dst_ids, 18, outcomes)  # 18 tokens -> 5 blocks of 4, the last one partial
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, "r1", 18, dst_block_ids=dst_ids)
    send_all(transfer, src, src_ids)
    stats = transfer.finish(timeout=10)
    assert outcomes.wait("r1") is None
    assert stats.bytes == LAYOUT.num_layers * 2 * len(src_ids) * LAYOUT.block_bytes
    assert stats.frames == LAYOUT.num_layers and stats.blocks == 5
    assert_blocks_equal(dst_caches, dst_ids, src, src_ids)
    untouched = sorted(set(range(NUM_BLOCKS)) - set(dst_ids))
    assert_blocks_zero(dst_caches, untouched)
    assert "r1" not in receiver.reservations


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8", "float8_e4m3fn"])
def test_every_dtype_moves_bytes_exactly(dtype):
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=6, block_size=3, dtype=dtype)
    src, dst = random_caches(layout, 8, seed=1), zero_caches(layout, 8)
    with_receiver = TCPKVReceiver(dst)
    with_receiver.start()
    try:
        outcomes = Outcomes()
        with_receiver.expect("x", [6, 1, 4], 9, outcomes)
        transfer = TCPKVSender(layout).open(with_receiver.endpoint, "x", 9)
        send_all(transfer, src, [0, 2, 7])
        transfer.finish(timeout=10)
        assert outcomes.wait("x") is None
        assert_blocks_equal(dst, [6, 1, 4], src, [0, 2, 7])
    finally:
        with_receiver.stop()


def test_blocks_may_arrive_in_parts_and_snapshots(receiver, dst_caches):
    """Chunked prefill: each layer in two sends; snapshot=True copies at call time."""
    src = random_caches(LAYOUT, NUM_BLOCKS, seed=2)
    expected = [(k.clone(), v.clone()) for k, v in src]
    outcomes = Outcomes()
    receiver.expect("parts", [9, 8, 7, 6, 5, 4], 24, outcomes)
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, "parts", 24)
    for layer, (key, value) in enumerate(src):
        transfer.send_layer(layer, key, value, [10, 11, 12], first_block=3, snapshot=True)
        key[10:13] = 0  # the snapshot already holds the old bytes
        transfer.send_layer(layer, key, value, [0, 1, 2], first_block=0)
    transfer.finish(timeout=10)
    assert outcomes.wait("parts") is None
    assert_blocks_equal(dst_caches, [9, 8, 7, 6, 5, 4], expected, [0, 1, 2, 10, 11, 12])


def test_staging_receiver_path_is_exact(dst_caches):
    """The copy path used for caches off the CPU, forced here on CPU caches."""
    rx = TCPKVReceiver(dst_caches, zero_copy=False)
    rx.start()
    try:
        src, outcomes = random_caches(LAYOUT, NUM_BLOCKS, seed=3), Outcomes()
        rx.expect("s", [1, 3, 5], 12, outcomes)
        transfer = TCPKVSender(LAYOUT).open(rx.endpoint, "s", 12)
        send_all(transfer, src, [2, 4, 6])
        transfer.finish(timeout=10)
        assert outcomes.wait("s") is None
        assert_blocks_equal(dst_caches, [1, 3, 5], src, [2, 4, 6])
        assert_blocks_zero(dst_caches, [0, 2, 4, 6])
    finally:
        rx.stop()


@pytest.mark.parametrize("field,value", [("num_layers", 4), ("num_kv_heads", 1), ("head_dim", 16),
                                         ("block_size", 8), ("dtype", "bfloat16")])
def test_layout_mismatch_is_refused_naming_the_field(receiver, field, value):
    outcomes = Outcomes()
    receiver.expect("m", [0, 1], 8, outcomes)
    other = KVLayout(**{**LAYOUT.to_dict(), field: value})
    with pytest.raises(KVLayoutMismatch) as info:
        TCPKVSender(other).open(receiver.endpoint, "m", 8)
    message = str(info.value)
    assert field in message and repr(getattr(LAYOUT, field)) in message and repr(value) in message
    # the refusal leaves the reservation usable by a sender with the right layout
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, "m", 8)
    send_all(transfer, random_caches(LAYOUT, NUM_BLOCKS), [5, 6])
    transfer.finish(timeout=10)
    assert outcomes.wait("m") is None


def test_unknown_reservation_is_refused(receiver):
    with pytest.raises(UnknownReservation, match="'nope'"):
        TCPKVSender(LAYOUT).open(receiver.endpoint, "nope", 4)


def test_handshake_checks_size_blocks_token_and_exclusivity(dst_caches):
    rx = TCPKVReceiver(dst_caches, auth_token="s3cret")
    rx.start()
    try:
        rx.expect("h", [4, 5], 8, Outcomes())
        with pytest.raises(KVAuthError):
            TCPKVSender(LAYOUT).open(rx.endpoint, "h", 8)
        with pytest.raises(KVAuthError):
            TCPKVSender(LAYOUT, auth_token="wrong").open(rx.endpoint, "h", 8)
        good = TCPKVSender(LAYOUT, auth_token="s3cret")
        with pytest.raises(KVTransferError, match="holds 8 tokens"):
            good.open(rx.endpoint, "h", 9)
        with pytest.raises(KVTransferError, match="dst_block_ids differ"):
            good.open(rx.endpoint, "h", 8, dst_block_ids=[5, 4])
        first = good.open(rx.endpoint, "h", 8, dst_block_ids=[4, 5], metadata={"traceparent": "00-ab-cd-01"})
        assert rx.reservations.get("h").metadata == {"traceparent": "00-ab-cd-01"}
        with pytest.raises(KVTransferError, match="already being filled"):
            good.open(rx.endpoint, "h", 8)
        first.cancel()
    finally:
        rx.stop()


def test_finish_before_every_layer_fails_both_sides(receiver):
    outcomes = Outcomes()
    receiver.expect("short", [1, 2], 8, outcomes)
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, "short", 8)
    key, value = random_caches(LAYOUT, NUM_BLOCKS)[0]
    transfer.send_layer(0, key, value, [3, 4])
    with pytest.raises(KVTransferError, match="FINISH before all KV arrived"):
        transfer.finish(timeout=10)
    error = outcomes.wait("short")
    assert isinstance(error, KVTransferError) and error.code == "incomplete"


def test_expect_validates_reservations(receiver):
    receiver.expect("dup", [0], 1, Outcomes())
    with pytest.raises(ValueError, match="already registered"):
        receiver.expect("dup", [1], 1, Outcomes())
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        receiver.expect("small", [0, 1], 9, Outcomes())
    with pytest.raises(ValueError, match="out of range"):
        receiver.expect("range", [NUM_BLOCKS], 1, Outcomes())
    with pytest.raises(ValueError, match="distinct"):
        receiver.expect("repeat", [2, 2], 5, Outcomes())
    assert receiver.cancel("dup") and not receiver.cancel("dup")


def test_send_layer_validates_its_arguments(receiver):
    receiver.expect("v", [0, 1], 8, Outcomes())
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, "v", 8)
    key, value = random_caches(LAYOUT, NUM_BLOCKS)[0]
    with pytest.raises(ValueError, match="layer 3 out of range"):
        transfer.send_layer(3, key, value, [0, 1])
    with pytest.raises(ValueError, match="dtype"):
        transfer.send_layer(0, key.half(), value.half(), [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        transfer.send_layer(0, key, value, [0, NUM_BLOCKS])
    with pytest.raises(ValueError, match="do not fit"):
        transfer.send_layer(0, key, value, [0, 1, 2])
    transfer.cancel()


def test_layout_and_wire_validation():
    with pytest.raises(ValueError, match="dtype"):
        KVLayout(1, 1, 1, 1, "float64")
    with pytest.raises(ValueError, match="head_dim"):
        KVLayout(1, 1, 0, 1, "float32")
    assert KVLayout.from_kv_caches(zero_caches(LAYOUT, 2)) == LAYOUT
    with pytest.raises(KVProtocolError, match="magic"):
        wire.decode_header(b"HTTP" + bytes(12))
    with pytest.raises(KVProtocolError, match="frame type"):
        wire.decode_header(wire.HEADER.pack(wire.MAGIC, wire.VERSION, 99, 0, 0))
    with pytest.raises(KVProtocolError, match="num_tokens"):
        wire.Hello.decode(b'{"layout": %s, "reservation_id": "a", "num_tokens": true}'
                          % str(LAYOUT.to_dict()).replace("'", '"').encode())
    hello = wire.Hello(LAYOUT, "a", 5, (1, 2), None, {"k": "v"})
    assert wire.Hello.decode(hello.encode()[wire.HEADER.size:]) == hello


def test_layer_done_hook_streams_a_real_prefill(hf_checkpoint):
    """ModelRunner prefill with layer_done sending each layer as soon as it is in the cache."""
    from pdserve.engine.model_runner import ModelRunner, ScheduledChunk

    prefill = ModelRunner.from_dir(hf_checkpoint("llama"), num_blocks=16, block_size=4)
    decode = ModelRunner.from_dir(hf_checkpoint("llama"), num_blocks=16, block_size=4)
    layout = KVLayout.from_kv_caches(prefill.kv_caches)
    rx = TCPKVReceiver(decode.kv_caches)
    rx.start()
    try:
        prompt, src_ids, dst_ids = list(range(1, 23)), [9, 3, 5, 0, 14, 2], [1, 2, 3, 4, 12, 13]
        outcomes = Outcomes()
        rx.expect("req", dst_ids, len(prompt), outcomes)
        transfer = TCPKVSender(layout).open(rx.endpoint, "req", len(prompt))
        sent = []

        def layer_done(i):
            sent.append(i)
            transfer.send_layer(i, *prefill.kv_caches[i], src_ids)

        prefill_logits = prefill.execute([ScheduledChunk(0, prompt, 0, src_ids, True)], layer_done=layer_done)
        transfer.finish(timeout=30)
        assert outcomes.wait("req") is None and sent == list(range(layout.num_layers))
        assert_blocks_equal(decode.kv_caches, dst_ids, prefill.kv_caches, src_ids)
        # decoding the next token on the receiving side matches the prefill side doing it itself
        token = int(prefill_logits.argmax(-1))
        mine = prefill.execute([ScheduledChunk(0, [token], len(prompt), src_ids, True)])
        theirs = decode.execute([ScheduledChunk(0, [token], len(prompt), dst_ids, True)])
        assert torch.equal(mine, theirs)
    finally:
        rx.stop()


def test_blocks_the_receiver_holds_are_neither_sent_nor_writable(receiver, dst_caches):
    """A decode server that holds a prompt's first blocks (its prefix cache) gets only the rest: the
    sender leaves them out, the receiver counts them in already, refuses a sender that disagrees, and
    refuses a frame into them (they are shared with other sequences)."""
    src = random_caches(LAYOUT, NUM_BLOCKS, seed=5)
    dst_ids, src_ids = [20, 21, 22, 23, 24], [1, 2, 3, 4, 5]
    outcomes = Outcomes()
    receiver.expect("held", dst_ids, 18, outcomes, held_blocks=2)
    with pytest.raises(KVTransferError, match="holds 2 leading blocks already, the sender skips 1"):
        TCPKVSender(LAYOUT).open(receiver.endpoint, "held", 18, held_blocks=1)
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, "held", 18, dst_block_ids=dst_ids, held_blocks=2)
    for layer, (key, value) in enumerate(src):  # as a prefill step hands them over: all five blocks
        transfer.send_layer(layer, key, value, src_ids[:1], first_block=0)  # wholly held: nothing sent
        transfer.send_layer(layer, key, value, src_ids[1:], first_block=1)  # the held one is dropped
    stats = transfer.finish(timeout=10)
    assert outcomes.wait("held") is None
    assert (stats.blocks, stats.bytes) == (3, LAYOUT.num_layers * 2 * 3 * LAYOUT.block_bytes)
    assert_blocks_zero(dst_caches, dst_ids[:2])
    assert_blocks_equal(dst_caches, dst_ids[2:], src, src_ids[2:])

    receiver.expect("guarded", [10, 11], 8, Outcomes(), held_blocks=1)
    with socket.create_connection(receiver.endpoint.rsplit(":", 1)) as sock:  # a sender that writes a held block
        sock.sendall(wire.Hello(LAYOUT, "guarded", 8, held_blocks=1).encode())
        frame_type, size = wire.decode_header(recv_exact(sock, wire.HEADER.size))
        assert frame_type == wire.HELLO_OK and recv_exact(sock, size)
        sock.sendall(wire.encode_layer_header(0, 0, 1, LAYOUT.block_bytes) + bytes(2 * LAYOUT.block_bytes))
        frame_type, size = wire.decode_header(recv_exact(sock, wire.HEADER.size))
        assert frame_type == wire.ERROR and b"blocks to fill [1, 2)" in recv_exact(sock, size)
    assert_blocks_zero(dst_caches, [10, 11])
