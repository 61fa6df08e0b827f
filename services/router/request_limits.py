"""Limits on what a client puts in a Router call that the sampling parameters do not cover (those
are pdserve.models.sampling_params'): the request id and the resume counts. The servicer checks
them first, before tokenizing or touching Redis; a refusal is INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import re

from pdserve.models.sampling_params import MAX_N
from pdserve.runtime.errors import InvalidRequestError

# Room for what the router and workers append: attempt ids "<id>~<8 hex>", reservation ids
# "<id>~<8 hex>/<12 hex>" (the workers' own limit is 243 characters).
MAX_REQUEST_ID_CHARS = 200
# Letters, digits and a few separators: nothing that ends a log line, and neither ':' (Redis
# keys are "<prefix>:req:<id>:tokens:<i>") nor '~' (the attempt ids the router derives).
REQUEST_ID_PUNCTUATION = "-_.+=/@"
_REQUEST_ID = re.compile(r"[A-Za-z0-9" + re.escape(REQUEST_ID_PUNCTUATION) + r"]*")


def check_request_id(request_id: str) -> None:
    """INVALID_ARGUMENT unless request_id is at most MAX_REQUEST_ID_CHARS characters of the
    allowed set (empty passes: a new request then gets an id from the router)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(f"request_id has {len(request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
    if _REQUEST_ID.fullmatch(request_id) is None:
        position, char = next((i, c) for i, c in enumerate(request_id) if _REQUEST_ID.fullmatch(c) is None)
        raise InvalidRequestError(f"request_id may hold only letters, digits and {REQUEST_ID_PUNCTUATION!r}; "
                                  f"it holds {char!r} at position {position}")


def check_received_tokens(count: int) -> None:
    """INVALID_ARGUMENT when a resume names more samples than any request can have (MAX_N)."""
    if count > MAX_N:
        raise InvalidRequestError(f"received_tokens has {count} entries; a request has at most {MAX_N} samples")
