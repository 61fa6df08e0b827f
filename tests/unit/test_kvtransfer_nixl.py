"""KV transfer over NIXL: READs from the sender's cache land bit-exact in the reserved blocks, the
data path is negotiated (and refused clearly where one side requires NIXL), the receiver reports
success only after the sender's CONFIRM, and nothing leaks.

Real NIXL agents (UCX) and real sockets on 127.0.0.1, in this process; agents are shared per
module (each takes ~0.5 s to start).
"""

from __future__ import annotations

import socket
import uuid

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
from pdserve.kvtransfer import KVLayout, KVTransferCancelled, KVTransferError, TCPKVReceiver, TCPKVSender, wire
from pdserve.kvtransfer.errors import KVProtocolError
from pdserve.kvtransfer.nixl_agent import NixlAgent, nixl_api
from pdserve.kvtransfer.nixl_data import LANE_MIN_BYTES, READ_LANES, NixlReceiveSide, NixlSendSide
from pdserve.kvtransfer.sockio import recv_exact

nixl_api()  # NIXL is part of the test install (pdserve[nixl]): its absence fails here, it is not skipped


def new_agent(role: str) -> NixlAgent:
    return NixlAgent(f"test-{role}-{uuid.uuid4().hex[:8]}")


def move_over_nixl(layout: KVLayout, src, dst, src_ids: list[int], dst_ids: list[int], lanes: int = 1,
                   held_blocks: int = 0):
    """One transfer between fresh NIXL sides over src and dst (NIXL required on both; the receiver
    holds the first held_blocks already); returns the receiver's lane agents once the KV is in and
    both sides are closed again."""
    send = NixlSendSide(new_agent("send"), src)
    agents = [new_agent("recv") for _ in range(lanes)]
    rx = TCPKVReceiver(dst, nixl=NixlReceiveSide(agents, layout, dst), require_nixl=True)
    rx.start()
    try:
        outcomes, num_tokens = Outcomes(), len(dst_ids) * layout.block_size
        rx.expect("moved", dst_ids, num_tokens, outcomes, held_blocks)
        transfer = TCPKVSender(layout, nixl=send, require_nixl=True).open(rx.endpoint, "moved", num_tokens,
                                                                         held_blocks=held_blocks)
        send_all(transfer, src, src_ids)
        stats = transfer.finish(timeout=30)
        assert (stats.data_path, stats.blocks) == ("nixl", len(dst_ids) - held_blocks)
        assert outcomes.wait("moved") is None
        return agents
    finally:
        rx.stop()
        send.close()


@pytest.fixture(scope="module")
def src_caches():
    """The sender's cache, registered once; tests that change it restore it."""
    return random_caches(LAYOUT, NUM_BLOCKS, seed=3)


@pytest.fixture(scope="module")
def send_side(src_caches):
    side = NixlSendSide(new_agent("send"), src_caches)
    yield side
    side.close()


@pytest.fixture(scope="module")
def dst_caches():
    return zero_caches(LAYOUT, NUM_BLOCKS)


@pytest.fixture(scope="module")
def receive_side(dst_caches):
    side = NixlReceiveSide([new_agent("recv") for _ in range(READ_LANES)], LAYOUT, dst_caches)
    yield side
    side.close()


@pytest.fixture
def receiver(dst_caches, receive_side):
    for key, value in dst_caches:
        key.zero_(), value.zero_()
    rx = TCPKVReceiver(dst_caches, handshake_timeout_s=5.0, nixl=receive_side)
    rx.start()
    yield rx
    rx.nixl = None  # the module's receive side outlives this receiver
    rx.stop()
    assert receive_side.counts().transfers_in_flight == 0


@pytest.fixture
def sender(send_side):
    yield TCPKVSender(LAYOUT, nixl=send_side)
    assert send_side.open_transfers == 0  # every transfer ended


def test_layers_are_read_bit_exact_into_the_reserved_blocks(receiver, sender, dst_caches, src_caches):
    src = src_caches
    src_ids, dst_ids = [3, 4, 5, 20, 7], [30, 2, 11, 12, 0]
    outcomes = Outcomes()
    receiver.expect("r1", dst_ids, 18, outcomes)
    transfer = sender.open(receiver.endpoint, "r1", 18, dst_block_ids=dst_ids)
    assert transfer.data_path == "nixl"
    send_all(transfer, src, src_ids)
    stats = transfer.finish(timeout=10)
    assert outcomes.wait("r1") is None
    assert stats.data_path == "nixl" and stats.blocks == 5 and stats.frames == LAYOUT.num_layers
    assert stats.bytes == LAYOUT.num_layers * 2 * len(src_ids) * LAYOUT.block_bytes
    assert_blocks_equal(dst_caches, dst_ids, src, src_ids)
    assert_blocks_zero(dst_caches, sorted(set(range(NUM_BLOCKS)) - set(dst_ids)))


def test_chunked_layers_in_place_and_no_snapshot(receiver, sender, dst_caches, src_caches):
    """Each layer in two parts (chunked prefill), read from the cache in place: a snapshot, which
    the TCP path takes, is refused (the caller pins the blocks instead)."""
    outcomes = Outcomes()
    receiver.expect("parts", [9, 8, 7, 6, 5, 4], 24, outcomes)
    transfer = sender.open(receiver.endpoint, "parts", 24)
    with pytest.raises(ValueError, match="takes no snapshot"):
        transfer.send_layer(0, *src_caches[0], [10, 11, 12], first_block=3, snapshot=True)
    for layer, (key, value) in enumerate(src_caches):
        transfer.send_layer(layer, key, value, [10, 11, 12], first_block=3)
        transfer.send_layer(layer, key, value, [0, 1, 2], first_block=0)
    transfer.finish(timeout=10)
    assert outcomes.wait("parts") is None
    assert_blocks_equal(dst_caches, [9, 8, 7, 6, 5, 4], src_caches, [0, 1, 2, 10, 11, 12])


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "float8_e4m3fn"])
def test_quantized_and_half_caches_move_exactly(dtype):
    """int8/fp8 caches (their scales live inside each block's bytes) move as bytes like any other."""
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=6, block_size=3, dtype=dtype)
    src, dst = random_caches(layout, 8, seed=1), zero_caches(layout, 8)
    move_over_nixl(layout, src, dst, [0, 2, 7], [6, 1, 4])
    assert_blocks_equal(dst, [6, 1, 4], src, [0, 2, 7])


def test_large_layers_are_split_across_read_lanes_exactly():
    """Layers of >= LANE_MIN_BYTES: each lane READs part of a layer on its own thread (K and V runs
    of shuffled blocks split by bytes); every byte lands where it belongs."""
    layout = KVLayout(num_layers=2, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
    num_blocks = 2 * LANE_MIN_BYTES // (2 * layout.block_bytes) + 8
    src, dst = random_caches(layout, num_blocks, seed=12), zero_caches(layout, num_blocks)
    src_ids = list(range(num_blocks - 2))
    dst_ids = src_ids[::2] + src_ids[1::2]  # runs of one block: many descriptors per lane
    lanes = move_over_nixl(layout, src, dst, src_ids, dst_ids, lanes=2)
    assert_blocks_equal(dst, dst_ids, src, src_ids)
    assert all(agent.reads_completed == layout.num_layers for agent in lanes)  # each lane read part of each layer
    assert all(agent.counts().remote_agents == 0 for agent in lanes)  # forgotten when the receiver closed


def test_a_receiver_without_nixl_gets_layer_frames_and_a_strict_sender_refuses_it(send_side, src_caches):
    dst = zero_caches(LAYOUT, NUM_BLOCKS)
    src = src_caches
    rx = TCPKVReceiver(dst)  # TCP only
    rx.start()
    try:
        outcomes = Outcomes()
        rx.expect("auto", [1, 2], 8, outcomes)
        transfer = TCPKVSender(LAYOUT, nixl=send_side).open(rx.endpoint, "auto", 8)
        assert transfer.data_path == "tcp"
        send_all(transfer, src, [5, 6])
        assert transfer.finish(timeout=10).data_path == "tcp"
        assert outcomes.wait("auto") is None
        assert_blocks_equal(dst, [1, 2], src, [5, 6])

        rx.expect("strict", [3, 4], 8, outcomes)
        with pytest.raises(KVTransferError, match="NIXL only .* has no NIXL") as info:
            TCPKVSender(LAYOUT, nixl=send_side, require_nixl=True).open(rx.endpoint, "strict", 8)
        assert info.value.code == "data_path_mismatch"
        assert send_side.open_transfers == 0
        # Refused before the reservation was bound: another sender may still fill it.
        transfer = TCPKVSender(LAYOUT, nixl=send_side).open(rx.endpoint, "strict", 8)
        send_all(transfer, src, [7, 8])
        transfer.finish(timeout=10)
        assert outcomes.wait("strict") is None
    finally:
        rx.stop()


def test_a_strict_receiver_refuses_a_tcp_sender_before_binding_the_reservation(dst_caches, receive_side):
    rx = TCPKVReceiver(dst_caches, nixl=receive_side, require_nixl=True)
    rx.start()
    try:
        rx.expect("held", [1, 2], 8, Outcomes())
        with pytest.raises(KVTransferError, match="NIXL only") as info:
            TCPKVSender(LAYOUT).open(rx.endpoint, "held", 8)
        assert info.value.code == "data_path_mismatch"
        assert "held" in rx.reservations and not rx.has_sender("held")  # still open for a NIXL sender
    finally:
        rx.nixl = None
        rx.stop()


def test_receiver_cancel_mid_transfer_stops_reads_and_ends_the_senders_transfer(receiver, sender, dst_caches,
                                                                                 src_caches):
    src = src_caches
    outcomes = Outcomes()
    receiver.expect("gone", [4, 5], 8, outcomes)
    transfer = sender.open(receiver.endpoint, "gone", 8)
    transfer.send_layer(0, *src[0], [1, 2])
    assert receiver.cancel("gone")
    for layer in range(1, LAYOUT.num_layers):  # the sender may not have noticed yet
        try:
            transfer.send_layer(layer, *src[layer], [1, 2])
        except KVTransferError:
            break
    with pytest.raises(KVTransferError):
        transfer.finish(timeout=10)
    assert "gone" not in outcomes.calls  # a cancelled reservation is not reported
    assert_blocks_zero(dst_caches, [4, 5], layers=range(1, LAYOUT.num_layers))


def test_sender_cancel_after_every_layer_fails_the_reservation(receiver, sender, src_caches):
    src = src_caches
    outcomes = Outcomes()
    receiver.expect("quit", [6, 7], 8, outcomes)
    transfer = sender.open(receiver.endpoint, "quit", 8)
    send_all(transfer, src, [1, 2])
    transfer.cancel()
    assert isinstance(outcomes.wait("quit"), KVTransferCancelled)


def _raw_nixl_hello(receiver, offer, rid: str, num_tokens: int):
    """A handshaken socket speaking the nixl data path by hand -> (socket, reply type, reply)."""
    sock = socket.create_connection(("127.0.0.1", int(receiver.endpoint.rsplit(":", 1)[1])), timeout=10)
    sock.sendall(wire.Hello(LAYOUT, rid, num_tokens, nixl=offer).encode())
    frame_type, size = wire.decode_header(recv_exact(sock, wire.HEADER.size))
    return sock, frame_type, wire.decode_json(recv_exact(sock, size), "reply")


def test_success_is_reported_only_after_the_senders_confirm(receiver, send_side):
    """A sender that read COMPLETE but never confirmed (it may have released its blocks) fails."""
    outcomes = Outcomes()
    receiver.expect("unconfirmed", [8], 4, outcomes)
    sock, frame_type, reply = _raw_nixl_hello(receiver, send_side.offer, "unconfirmed", 4)
    try:
        assert frame_type == wire.HELLO_OK and reply["data_path"] == "nixl"
        for layer in range(LAYOUT.num_layers):
            sock.sendall(wire.encode_ready(layer, 0, [5]))
        sock.sendall(wire.encode_header(wire.FINISH, 0))
        frame_type, _ = wire.decode_header(recv_exact(sock, wire.HEADER.size))
        assert frame_type == wire.COMPLETE
        assert "unconfirmed" not in outcomes.calls
    finally:
        sock.close()
    assert isinstance(outcomes.wait("unconfirmed"), KVTransferError)


def test_a_ready_naming_blocks_outside_the_senders_cache_is_refused(receiver, send_side, dst_caches):
    outcomes = Outcomes()
    receiver.expect("outside", [10], 4, outcomes)
    sock, frame_type, _ = _raw_nixl_hello(receiver, send_side.offer, "outside", 4)
    try:
        assert frame_type == wire.HELLO_OK
        sock.sendall(wire.encode_ready(0, 0, [NUM_BLOCKS]))
        frame_type, size = wire.decode_header(recv_exact(sock, wire.HEADER.size))
        reply = wire.decode_json(recv_exact(sock, size), "error")
        assert frame_type == wire.ERROR and reply["code"] == KVProtocolError.code and "outside" in reply["message"]
    finally:
        sock.close()
    assert isinstance(outcomes.wait("outside"), KVProtocolError)
    assert_blocks_zero(dst_caches, [10])


def test_an_offer_whose_metadata_names_another_agent_is_refused(receiver, send_side):
    outcomes = Outcomes()
    receiver.expect("liar", [9], 4, outcomes)
    offer = send_side.offer
    forged = wire.NixlOffer("someone-else", offer.metadata, offer.memory, offer.device, offer.num_blocks, offer.bases)
    sock, frame_type, reply = _raw_nixl_hello(receiver, forged, "liar", 4)
    try:
        assert frame_type == wire.ERROR and reply["code"] == KVProtocolError.code
        assert "names agent" in reply["message"]
    finally:
        sock.close()
    assert "liar" in receiver.reservations  # refused before it was bound


@pytest.mark.parametrize("field,value,message", [
    ("metadata", "!!!", "not valid base64"),
    ("bases", [1] * (2 * LAYOUT.num_layers - 1), "must list"),
    ("bases", [0] * (2 * LAYOUT.num_layers), "must list"),
    ("num_blocks", 0, "positive 32-bit"),
    ("memory", "FILE", "must be one of"),
    ("agent", "", "non-empty string"),
])
def test_malformed_offers_are_protocol_errors(field, value, message):
    offer = wire.NixlOffer("a", b"meta", "DRAM", 0, 8, tuple(range(4096, 4096 + 2 * LAYOUT.num_layers))).to_dict()
    offer[field] = value
    with pytest.raises(KVProtocolError, match=message):
        wire.NixlOffer.from_dict(offer, LAYOUT.num_layers)


def test_many_transfers_with_cancels_leave_no_read_or_peer_behind(receiver, sender, receive_side, src_caches):
    src = src_caches
    before = receive_side.counts()
    outcomes = Outcomes()
    for i in range(60):
        rid = f"many-{i}"
        receiver.expect(rid, [i % NUM_BLOCKS, (i + 1) % NUM_BLOCKS], 8, outcomes)
        transfer = sender.open(receiver.endpoint, rid, 8)
        send_all(transfer, src, [2, 3])
        if i % 3 == 0:
            transfer.cancel()
        elif i % 3 == 1:
            receiver.cancel(rid)
            with pytest.raises(KVTransferError):
                transfer.finish(timeout=10)
        else:
            transfer.finish(timeout=10)
            assert outcomes.wait(rid) is None
    assert len(receiver.reservations) == 0
    after = receive_side.counts()  # the sender's agent may be new to the receiver: one peer more per lane
    assert after.registrations == before.registrations == READ_LANES and after.transfers_in_flight == 0
    assert after.remote_agents <= before.remote_agents + READ_LANES


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_caches_are_read_gpu_to_gpu():
    """VRAM registration on both sides: the receiver READs the sender's GPU cache into its own
    (CUDA IPC or GPUDirect under UCX)."""
    device = torch.device("cuda")
    src = [(k.to(device), v.to(device)) for k, v in random_caches(LAYOUT, NUM_BLOCKS, seed=10)]
    dst = [(k.to(device), v.to(device)) for k, v in zero_caches(LAYOUT, NUM_BLOCKS)]
    move_over_nixl(LAYOUT, src, dst, [1, 2, 30], [7, 3, 9], lanes=READ_LANES)
    torch.cuda.synchronize()
    assert_blocks_equal([(k.cpu(), v.cpu()) for k, v in dst], [7, 3, 9], [(k.cpu(), v.cpu()) for k, v in src], [1, 2, 30])


def test_blocks_the_receiver_holds_are_not_read():
    src, dst = random_caches(LAYOUT, 8, seed=11), zero_caches(LAYOUT, 8)
    move_over_nixl(LAYOUT, src, dst, [0, 1, 2, 3], [4, 5, 6, 7], held_blocks=3)
    assert_blocks_zero(dst, [4, 5, 6])  # held: never written
    assert_blocks_equal(dst, [7], src, [3])
