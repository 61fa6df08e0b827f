"""Moving KV cache blocks between processes: layout, wire format, backends (TCP first).

    receiver = TCPKVReceiver(kv_caches)            # decode side
    endpoint = receiver.start()
    receiver.expect("req-1", dst_block_ids, num_tokens, on_complete)
    transfer = TCPKVSender(layout).open(endpoint, "req-1", num_tokens)   # prefill side
    transfer.send_layer(i, key_cache_i, value_cache_i, src_block_ids)    # per layer, from layer_done
    transfer.finish(timeout=30)
"""

from pdserve.kvtransfer.backend import (
                                KVReceiverBackend,
                                KVSenderBackend,
                                KVTransfer,
                                ReceivedTransfer,
                                TransferObserver,
                                TransferStats,
)
from pdserve.kvtransfer.errors import (
                                KVAuthError,
                                KVLayoutMismatch,
                                KVProtocolError,
                                KVTransferCancelled,
                                KVTransferError,
                                UnknownReservation,
)
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.tcp_receiver import TCPKVReceiver
from pdserve.kvtransfer.tcp_sender import TCPKVSender, TCPKVTransfer

__all__ = [
    "KVAuthError", "KVLayout", "KVLayoutMismatch", "KVProtocolError", "KVReceiverBackend",
    "KVSenderBackend", "KVTransfer", "KVTransferCancelled", "KVTransferError", "ReceivedTransfer",
    "TCPKVReceiver", "TCPKVSender", "TCPKVTransfer", "TransferObserver", "TransferStats", "UnknownReservation",
]
