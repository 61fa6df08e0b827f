"""KV transfer faults: cancels on either side, a sender dying mid-frame, malformed and random input to
the port. The receiver must report the reservation failed, never crash, and keep serving."""

from __future__ import annotations

import json
import logging
import random
import shutil
import socket
import ssl
import subprocess

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
from pdserve.kvtransfer.tcp_sender import parse_endpoint


@pytest.fixture
def dst_caches():
    return zero_caches(LAYOUT, NUM_BLOCKS)


@pytest.fixture
def receiver(dst_caches, caplog):
    rx = TCPKVReceiver(dst_caches, handshake_timeout_s=5.0)
    rx.start()
    yield rx
    rx.stop()
    bugs = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bugs, f"receiver logged errors: {[r.getMessage() for r in bugs]}"


def connect(endpoint: str) -> socket.socket:
    sock = socket.create_connection(parse_endpoint(endpoint), timeout=10)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the receiver sends until it closes the connection (a hang fails by timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def handshake(endpoint: str, rid: str, num_tokens: int) -> socket.socket:
    """A raw connection that completed a valid HELLO."""
    sock = connect(endpoint)
    sock.sendall(wire.Hello(LAYOUT, rid, num_tokens).encode())
    frame_type, size = wire.decode_header(sock.recv(wire.HEADER.size, socket.MSG_WAITALL))
    assert frame_type == wire.HELLO_OK, sock.recv(size)
    sock.recv(size, socket.MSG_WAITALL)
    return sock


def assert_still_serves(receiver, dst_caches, rid="after"):
    src, outcomes = random_caches(LAYOUT, NUM_BLOCKS, seed=7), Outcomes()
    receiver.expect(rid, [31, 30], 8, outcomes)
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, rid, 8)
    send_all(transfer, src, [1, 2])
    transfer.finish(timeout=10)
    assert outcomes.wait(rid) is None
    assert_blocks_equal(dst_caches, [31, 30], src, [1, 2])


def test_sender_cancel_mid_transfer_fails_the_reservation(receiver, dst_caches):
    outcomes = Outcomes()
    receiver.expect("c", [3, 4], 8, outcomes)
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, "c", 8)
    key, value = random_caches(LAYOUT, NUM_BLOCKS)[0]
    transfer.send_layer(0, key, value, [0, 1])
    transfer.cancel()
    assert isinstance(outcomes.wait("c"), KVTransferCancelled)
    with pytest.raises(KVTransferError):
        transfer.send_layer(1, key, value, [0, 1])
    with pytest.raises(KVTransferCancelled):
        transfer.finish(timeout=5)
    assert_still_serves(receiver, dst_caches)


def test_receiver_cancel_stops_writes_and_tells_the_sender(receiver, dst_caches):
    outcomes = Outcomes()
    receiver.expect("rc", [3, 4], 8, outcomes)
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, "rc", 8)
    assert receiver.cancel("rc")
    send_all(transfer, random_caches(LAYOUT, NUM_BLOCKS), [0, 1])
    with pytest.raises(KVTransferCancelled, match="cancelled by the receiver"):
        transfer.finish(timeout=10)
    assert_blocks_zero(dst_caches, [3, 4])
    assert "rc" not in outcomes.calls  # the decode side cancelled: no callback
    assert_still_serves(receiver, dst_caches)


def test_receiver_cancel_mid_stream_leaves_later_layers_untouched(receiver, dst_caches):
    outcomes = Outcomes()
    receiver.expect("mid", [3, 4], 8, outcomes)
    transfer = TCPKVSender(LAYOUT).open(receiver.endpoint, "mid", 8)
    src = random_caches(LAYOUT, NUM_BLOCKS)
    transfer.send_layer(0, *src[0], [0, 1])
    assert receiver.cancel("mid")  # whether layer 0 landed is a race; nothing lands afterwards
    for layer in (1, 2):
        try:
            transfer.send_layer(layer, *src[layer], [0, 1])
        except KVTransferError:
            pass
    with pytest.raises(KVTransferError):
        transfer.finish(timeout=10)
    assert_blocks_zero(dst_caches, [3, 4], layers=[1, 2])
    assert "mid" not in outcomes.calls


def test_cancel_during_a_write_stops_it_before_returning(receiver, dst_caches):
    """cancel() returns only once nothing more lands in the blocks, even mid-frame."""
    outcomes = Outcomes()
    receiver.expect("w", [12, 13], 8, outcomes)
    sock = handshake(receiver.endpoint, "w", 8)
    payload = 4 * LAYOUT.block_bytes  # K and V of 2 blocks
    sock.sendall(wire.encode_layer_header(0, 0, 2, LAYOUT.block_bytes) + b"\xab" * (payload // 2))
    assert receiver.cancel("w")
    try:
        sock.sendall(b"\xcd" * (payload // 2))
        sock.shutdown(socket.SHUT_WR)
        read_until_closed(sock)  # the receiver is done with this connection
    except OSError:
        pass
    sock.close()
    for key, value in dst_caches:
        for cache in (key, value):
            assert not (cache[[12, 13]].contiguous().view(torch.uint8) == 0xCD).any()
    assert "w" not in outcomes.calls
    assert_still_serves(receiver, dst_caches)


def test_sender_dying_mid_frame_fails_the_reservation(receiver, dst_caches):
    outcomes = Outcomes()
    receiver.expect("dies", [5, 6], 8, outcomes)
    sock = handshake(receiver.endpoint, "dies", 8)
    header = wire.encode_layer_header(0, 0, 2, LAYOUT.block_bytes)
    sock.sendall(header + bytes(LAYOUT.block_bytes))  # a quarter of the payload, then the process dies
    sock.close()
    error = outcomes.wait("dies")
    assert isinstance(error, KVTransferError) and error.code == "connection_lost"
    assert "dies" not in receiver.reservations
    assert_still_serves(receiver, dst_caches)


def test_idle_connection_is_closed_after_the_handshake_timeout(dst_caches):
    rx = TCPKVReceiver(dst_caches, handshake_timeout_s=0.2)
    rx.start()
    try:
        with connect(rx.endpoint) as sock:
            assert read_until_closed(sock) == b""
    finally:
        rx.stop()


def test_a_queued_sender_keeps_its_connection_past_the_idle_timeout_with_keepalives(dst_caches):
    """A sender whose prompt waits to be computed sends KEEPALIVE frames: the receiver's idle
    timeout drops silent senders, not waiting ones; the KV sent afterwards lands whole."""
    rx = TCPKVReceiver(dst_caches, idle_timeout_s=1.0)  # 20 keepalive intervals: margin for a busy machine
    rx.start()
    try:
        src, outcomes = random_caches(LAYOUT, NUM_BLOCKS, seed=3), Outcomes()
        rx.expect("queued", [5, 6], 8, outcomes)
        rx.expect("silent", [7, 8], 8, outcomes)
        transfer = TCPKVSender(LAYOUT, keepalive_s=0.05).open(rx.endpoint, "queued", 8)
        silent = TCPKVSender(LAYOUT, keepalive_s=60).open(rx.endpoint, "silent", 8)
        # The silent one is dropped by the idle timeout while the queued one stays bound.
        assert isinstance(outcomes.wait("silent"), KVTransferError)
        assert rx.has_sender("queued") and not rx.has_sender("silent")
        send_all(transfer, src, [1, 2])
        transfer.finish(timeout=10)
        assert outcomes.wait("queued") is None
        assert_blocks_equal(dst_caches, [5, 6], src, [1, 2])
        silent.cancel()
    finally:
        rx.stop()


def test_stop_fails_pending_reservations(dst_caches):
    rx = TCPKVReceiver(dst_caches)
    rx.start()
    outcomes = Outcomes()
    rx.expect("p", [1], 2, outcomes)
    transfer = TCPKVSender(LAYOUT).open(rx.endpoint, "p", 2)
    rx.stop()
    assert isinstance(outcomes.wait("p"), KVTransferCancelled)
    with pytest.raises(KVTransferError):
        transfer.finish(timeout=10)


def _malformed_inputs(rng: random.Random, rid: str) -> list[tuple[bool, bytes]]:
    """(needs a handshake first, bytes) pairs covering each header field and random noise."""
    bb, hdr, layer = LAYOUT.block_bytes, wire.encode_header, wire.LAYER_HEADER.pack
    hello_dict = json.loads(wire.Hello(LAYOUT, rid, 8).encode()[wire.HEADER.size:])
    bad_hellos = [{**hello_dict, "layout": "x"}, {**hello_dict, "num_tokens": -1}, {**hello_dict, "metadata": [1]},
                  {**hello_dict, "dst_block_ids": ["a"]}, {**hello_dict, "reservation_id": ""}, [1, 2]]
    return [
        (False, rng.randbytes(rng.randint(1, 300))),
        (False, wire.MAGIC + rng.randbytes(rng.randint(0, 40))),
        (False, hdr(rng.randint(0, 255), rng.getrandbits(64))[:rng.randint(4, 16)]),
        (False, hdr(wire.HELLO, 1 << 62)),
        (False, hdr(wire.HELLO, 50) + b"{" * 10),
        (False, wire.encode_json_frame(wire.HELLO, rng.choice(bad_hellos))),
        (False, hdr(wire.LAYER, 12 + 2 * bb) + layer(0, 0, 1)),
        (True, hdr(wire.LAYER, rng.getrandbits(64)) + layer(0, 0, 1)),
        (True, hdr(wire.LAYER, 12 + 2 * bb) + layer(rng.randint(3, 1 << 32 - 1), 0, 1)),
        (True, hdr(wire.LAYER, 12 + 2 * bb) + layer(0, rng.randint(2, 1 << 31), 1)),
        (True, hdr(wire.LAYER, 12) + layer(0, 0, 0)),
        (True, hdr(wire.LAYER, 12 + 2 * bb + 1) + layer(0, 0, 1)),
        (True, hdr(wire.LAYER, 8) + b"12345678"),
        (True, hdr(wire.FINISH, 3) + b"abc"),
        (True, hdr(wire.HELLO_OK, 0)),
        (True, hdr(wire.LAYER, 12 + 4 * bb) + layer(1, 0, 2) + rng.randbytes(rng.randint(0, 4 * bb - 1))),
        (True, rng.randbytes(rng.randint(1, 200))),
    ]


def test_fuzzed_and_truncated_frames_never_take_the_receiver_down(receiver, dst_caches):
    rng = random.Random(1234)
    outcomes = Outcomes()
    cases = 0
    for round_ in range(14):
        for i, (needs_hello, data) in enumerate(_malformed_inputs(rng, f"fz{round_}")):
            rid = f"fz{round_}-{i}"
            receiver.expect(rid, [10, 11], 8, outcomes)
            sock = handshake(receiver.endpoint, rid, 8) if needs_hello else connect(receiver.endpoint)
            with sock:
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)  # a truncated frame ends in EOF
                except OSError:  # the receiver may refuse before reading it all
                    pass
                try:
                    reply = read_until_closed(sock)
                except ConnectionResetError:
                    reply = None
            if reply:
                frame_type, _ = wire.decode_header(reply[:wire.HEADER.size])
                assert frame_type == wire.ERROR
            if needs_hello:
                assert isinstance(outcomes.wait(rid), KVTransferError)
            else:
                assert receiver.cancel(rid)  # the garbage never bound it
            cases += 1
    assert cases >= 200
    assert_blocks_zero(dst_caches, [b for b in range(NUM_BLOCKS) if b not in (10, 11)])  # only reserved blocks written
    assert_still_serves(receiver, dst_caches)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_transfer_with_auth_token(tmp_path, dst_caches):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    rx = TCPKVReceiver(dst_caches, ssl_context=server_ctx, auth_token="t0k")
    rx.start()
    try:
        src, outcomes = random_caches(LAYOUT, NUM_BLOCKS, seed=5), Outcomes()
        rx.expect("tls", [7, 8, 9], 12, outcomes)
        transfer = TCPKVSender(LAYOUT, ssl_context=client_ctx, auth_token="t0k").open(rx.endpoint, "tls", 12)
        send_all(transfer, src, [0, 13, 14])
        transfer.finish(timeout=10)
        assert outcomes.wait("tls") is None
        assert_blocks_equal(dst_caches, [7, 8, 9], src, [0, 13, 14])
        with pytest.raises((OSError, KVTransferError)):  # plain TCP to a TLS port is refused
            TCPKVSender(LAYOUT, auth_token="t0k").open(rx.endpoint, "tls2", 4, timeout=5)
    finally:
        rx.stop()


def test_parse_endpoint():
    assert parse_endpoint("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert parse_endpoint("[::1]:7000") == ("::1", 7000)
    with pytest.raises(ValueError, match="host:port"):
        parse_endpoint("nohost")
    assert KVLayout.from_dict(LAYOUT.to_dict()) == LAYOUT
