"""KV transfer between servers of different tensor-parallel sizes: each receiving rank's cache gets exactly
its own KV heads, from whichever of the sender's ranks hold them, over TCP (LAYER frames assembled in the
receiver's layout) and over NIXL (READs of whole blocks, or of each token's heads where they are cut).

The ranks' caches are slices of one whole-model cache, cut as the model's shards cut the heads; a
transfer is right when every destination rank's blocks equal the whole cache's blocks at that rank's heads.
"""

from __future__ import annotations

import json
import socket
import uuid

import pytest
import torch

from helpers.kv_testing import Outcomes, random_caches, raw_bytes
from pdserve.kvtransfer import KVLayout, KVLayoutMismatch, TCPKVReceiver, TCPKVSender, wire
from pdserve.kvtransfer.layout import HeadSlice, kv_heads_of_rank
from pdserve.kvtransfer.nixl_agent import NixlAgent
from pdserve.kvtransfer.nixl_data import NixlReceiveSide, NixlSendSide
from pdserve.kvtransfer.tcp_sender import parse_endpoint, read_control_frame

NUM_BLOCKS = 24


def whole_layout(num_kv_heads: int) -> KVLayout:
    return KVLayout(num_layers=2, num_kv_heads=num_kv_heads, head_dim=8, block_size=4, dtype="float32")


def rank_layout(whole: KVLayout, size: int) -> KVLayout:
    return KVLayout(whole.num_layers, whole.num_kv_heads, whole.head_dim, whole.block_size, whole.dtype, size)


def shard_caches(whole_caches, num_kv_heads: int, size: int):
    """Per rank, per layer (K, V): the whole cache's heads that rank holds, as its own contiguous tensors."""
    return [[tuple(t[:, :, heads.start:heads.stop].contiguous() for t in pair) for pair in whole_caches]
            for heads in (kv_heads_of_rank(num_kv_heads, r, size) for r in range(size))]


def zero_rank_caches(layout: KVLayout):
    shape = (NUM_BLOCKS, layout.block_size, layout.heads_per_rank, layout.head_dim)
    return [[(torch.zeros(shape), torch.zeros(shape)) for _ in range(layout.num_layers)]
            for _ in range(layout.tensor_parallel_size)]


def assert_ranks_hold(dst_ranks, dst_layout: KVLayout, dst_ids, whole_caches, src_ids):
    """Every destination rank's blocks dst_ids hold the whole cache's blocks src_ids at that rank's heads."""
    for rank, caches in enumerate(dst_ranks):
        heads = dst_layout.rank_heads(rank)
        for layer, pair in enumerate(caches):
            for half in (0, 1):
                want = whole_caches[layer][half][src_ids][:, :, heads.start:heads.stop]
                assert torch.equal(raw_bytes(pair[half][dst_ids]), raw_bytes(want)), (rank, layer, half)


def move(src_layout, src_ranks, dst_layout, dst_ranks, src_ids, dst_ids, nixl: bool, snapshot: bool = False,
         held_blocks: int = 0, required: bool = True):
    """One transfer from src_ranks into dst_ranks, over NIXL (where both sides require it, unless not
    `required`) or TCP; returns the sender's TransferStats."""
    send = NixlSendSide(NixlAgent(f"tp-send-{uuid.uuid4().hex[:8]}"), src_ranks) if nixl else None
    recv = (NixlReceiveSide(NixlAgent(f"tp-recv-{uuid.uuid4().hex[:8]}"), dst_layout, dst_ranks)
            if nixl else None)
    rx = TCPKVReceiver(dst_ranks, dst_layout, nixl=recv, require_nixl=nixl and required)
    rx.start()
    try:
        outcomes, num_tokens = Outcomes(), len(dst_ids) * dst_layout.block_size
        rx.expect("tp", dst_ids, num_tokens, outcomes, held_blocks)
        sender = TCPKVSender(src_layout, nixl=send, require_nixl=nixl and required)
        transfer = sender.open(rx.endpoint, "tp", num_tokens, held_blocks=held_blocks)
        for layer in range(src_layout.num_layers):
            transfer.send_layer_ranks(layer, [caches[layer] for caches in src_ranks], src_ids, snapshot=snapshot)
        stats = transfer.finish(timeout=30)
        assert outcomes.wait("tp") is None
        return stats
    finally:
        rx.stop()
        if send is not None:
            send.close()


def test_head_map_takes_each_head_from_a_rank_that_holds_it():
    four = whole_layout(4)
    # 2 ranks -> 1: the one rank takes heads 0-1 from rank 0 and 2-3 from rank 1.
    assert rank_layout(four, 2).head_map(four) == ((HeadSlice(0, 0, 0, 0, 2), HeadSlice(0, 1, 0, 2, 2)),)
    # 1 -> 2: each rank takes its half of the one rank's heads.
    assert four.head_map(rank_layout(four, 2)) == ((HeadSlice(0, 0, 0, 0, 2),), (HeadSlice(1, 0, 2, 0, 2),))
    # The same size maps rank r to rank r, whole blocks.
    assert rank_layout(four, 2).maps_whole_blocks(rank_layout(four, 2))
    assert not four.maps_whole_blocks(rank_layout(four, 2))
    # 2 KV heads over 4 ranks (replicated): rank 2 of the receiver holds head 1, which sender rank 1 holds.
    two = whole_layout(2)
    assert rank_layout(two, 2).head_map(rank_layout(two, 4))[2] == (HeadSlice(2, 1, 0, 0, 1),)
    assert rank_layout(two, 4).head_map(rank_layout(two, 2)) == ((HeadSlice(0, 0, 0, 0, 1),),
                                                                 (HeadSlice(1, 2, 0, 0, 1),))


def test_unmappable_layouts_are_refused_naming_the_field():
    with pytest.raises(KVLayoutMismatch, match="num_kv_heads: sender 4 vs receiver 2"):
        rank_layout(whole_layout(4), 2).head_map(rank_layout(whole_layout(2), 2))
    with pytest.raises(ValueError, match="3 KV heads do not split over 2"):
        rank_layout(whole_layout(3), 2)


@pytest.mark.parametrize("nixl", [False, True], ids=["tcp", "nixl"])
@pytest.mark.parametrize("num_kv_heads,src_size,dst_size", [
    (4, 2, 1), (4, 1, 2), (4, 2, 2), (4, 4, 2), (4, 2, 4), (2, 1, 4), (2, 4, 1), (2, 4, 2)])
def test_each_receiving_rank_gets_exactly_its_heads(num_kv_heads, src_size, dst_size, nixl):
    whole = whole_layout(num_kv_heads)
    whole_caches = random_caches(whole, NUM_BLOCKS, seed=num_kv_heads * 100 + src_size * 10 + dst_size)
    src_layout, dst_layout = rank_layout(whole, src_size), rank_layout(whole, dst_size)
    dst_ranks = zero_rank_caches(dst_layout)
    src_ids, dst_ids = [3, 4, 5, 11, 0], [7, 8, 20, 21, 22]
    stats = move(src_layout, shard_caches(whole_caches, num_kv_heads, src_size), dst_layout, dst_ranks,
                 src_ids, dst_ids, nixl)
    assert stats.data_path == ("nixl" if nixl else "tcp")
    assert_ranks_hold(dst_ranks, dst_layout, dst_ids, whole_caches, src_ids)
    untouched = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
    assert not any(raw_bytes(t[untouched]).any() for caches in dst_ranks for pair in caches for t in pair)


def test_snapshots_and_held_blocks_map_the_same_way():
    whole = whole_layout(4)
    whole_caches = random_caches(whole, NUM_BLOCKS, seed=9)
    src_layout, dst_layout = rank_layout(whole, 2), rank_layout(whole, 2)
    dst_ranks = zero_rank_caches(dst_layout)
    # Equal sizes with snapshots (the prefill server's TCP path); the first block is held: never written.
    stats = move(src_layout, shard_caches(whole_caches, 4, 2), dst_layout, dst_ranks, [1, 2, 3], [5, 6, 9],
                 nixl=False, snapshot=True, held_blocks=1)
    assert stats.blocks == 2
    assert_ranks_hold(dst_ranks, dst_layout, [6, 9], whole_caches, [2, 3])
    assert not any(raw_bytes(pair[half][[5]]).any() for caches in dst_ranks for pair in caches for half in (0, 1))


@pytest.mark.parametrize("dst_size,path", [(2, "nixl"), (1, "tcp"), (4, "tcp")])
def test_where_nixl_is_optional_heads_cut_out_of_blocks_move_over_tcp(dst_size, path):
    whole = whole_layout(4)
    whole_caches = random_caches(whole, NUM_BLOCKS, seed=dst_size)
    dst_layout = rank_layout(whole, dst_size)
    dst_ranks = zero_rank_caches(dst_layout)
    stats = move(rank_layout(whole, 2), shard_caches(whole_caches, 4, 2), dst_layout, dst_ranks, [2, 3], [4, 5],
                 nixl=True, required=False)
    assert stats.data_path == path
    assert_ranks_hold(dst_ranks, dst_layout, [4, 5], whole_caches, [2, 3])


def test_a_sender_that_does_not_state_its_ranks_is_refused_by_a_split_receiver():
    """A HELLO from a release before tensor parallelism (no tensor_parallel_size) would send whole heads a
    split receiver would scatter wrongly: refused, and the reservation stays open for another sender."""
    whole = whole_layout(4)
    dst_layout = rank_layout(whole, 2)
    rx = TCPKVReceiver(zero_rank_caches(dst_layout), dst_layout)
    rx.start()
    try:
        rx.expect("old", [1, 2], 8, Outcomes())
        message = json.loads(wire.Hello(whole, "old", 8).encode()[wire.HEADER.size:])
        del message["layout"]["tensor_parallel_size"]
        with socket.create_connection(parse_endpoint(rx.endpoint)) as sock:
            sock.sendall(wire.encode_json_frame(wire.HELLO, message))
            frame_type, reply = read_control_frame(sock)
        assert frame_type == wire.ERROR and reply["code"] == "layout_mismatch", reply
        assert "upgrade the prefill server" in reply["message"]
        assert not rx.has_sender("old")
    finally:
        rx.stop()
