"""Moving KV cache blocks between processes: layout, wire format, backends (TCP first).

    receiver = TCPKVReceiver(kv_caches)            # decode side
    endpoint = receiver.start()
    receiver.expect("req-1", dst_block_ids, num_tokens, on_complete)
    transfer = TCPKVSender(layout).open(endpoint, "req-1", num_tokens)   # prefill side
    transfer.send_layer(i, key_cache_i, value_cache_i, src_block_ids)    # per layer, from layer_done
    transfer.finish(timeout=30)
"""

from kvtransfer.backend import (KVReceiverBackend, KVSenderBackend, KVTransfer, ReceivedTransfer,
                                TransferObserver, TransferStats)
from kvtransfer.errors import (KVAuthError, KVLayoutMismatch, KVProtocolError, KVTransferCancelled,
                               KVTransferError, UnknownReservation)
from kvtransfer.layout import KVLayout
from kvtransfer.tcp_receiver import TCPKVReceiver
from kvtransfer.tcp_sender import TCPKVSender, TCPKVTransfer

__all__ = [
    "KVAuthError", "KVLayout", "KVLayoutMismatch", "KVProtocolError", "KVReceiverBackend",
    "KVSenderBackend", "KVTransfer", "KVTransferCancelled", "KVTransferError", "ReceivedTransfer",
    "TCPKVReceiver", "TCPKVSender", "TCPKVTransfer", "TransferObserver", "TransferStats", "UnknownReservation",
]
