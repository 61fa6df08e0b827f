"""Exceptions of the KV transfer layer. Each carries a short machine-readable `code` that also
travels on the wire in ERROR frames, so the sender raises the same class the receiver refused with."""

from __future__ import annotations


class KVTransferError(Exception):
    """A transfer failed or was refused. `code` names the reason (see the subclasses)."""

    code = "transfer_failed"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class KVLayoutMismatch(KVTransferError, ValueError):
    """The two sides' KV cache layouts differ (layers, KV heads, head_dim, block size or dtype)."""

    code = "layout_mismatch"


class UnknownReservation(KVTransferError, KeyError):
    """The receiver holds no reservation with that id (never registered, expired or cancelled)."""

    code = "unknown_reservation"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class KVTransferCancelled(KVTransferError):
    """One side cancelled the transfer."""

    code = "cancelled"


class KVProtocolError(KVTransferError):
    """A peer sent a frame that breaks the wire format (bad magic, field out of range, bad length)."""

    code = "protocol_error"


class KVAuthError(KVTransferError):
    """The sender's auth token did not match the receiver's."""

    code = "auth_failed"


_BY_CODE = {cls.code: cls for cls in (KVTransferError, KVLayoutMismatch, UnknownReservation,
                                      KVTransferCancelled, KVProtocolError, KVAuthError)}


def error_from_code(code: str, message: str) -> KVTransferError:
    """Rebuild the exception a peer reported in an ERROR frame (unknown codes -> KVTransferError)."""
    cls = _BY_CODE.get(code, KVTransferError)
    return cls(message, code=code) if cls is KVTransferError else cls(message)
