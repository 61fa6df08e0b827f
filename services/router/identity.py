"""Who is calling the Router: the identity a request is bound to, so that only its creator can
abort or resume it.

- With API keys (--api-key): the key the call was accepted with, as "key:<hash>" (different
  keys are different callers, whatever certificate they present).
- Else, under mutual TLS: the verified client certificate's subject and subject alternative
  names, as "cert:<hash>" (a renewed certificate for the same names is the same caller).
- Else (an open deployment): "", one identity everyone shares.

Only hashes are stored (request records in Redis, the router's table), never a key.
"""

from __future__ import annotations

import hashlib

import grpc

from pdserve.runtime.api_keys import authenticated_key_identity


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """The identity of the running call's client (see the module docstring)."""
    key = authenticated_key_identity()
    if key is not None:
        return key
    auth = context.auth_context()  # x509 entries only for a client certificate the server verified
    subject = auth.get("x509_subject", [])
    names = sorted(auth.get("x509_subject_alternative_name", []))
    if not subject and not names:
        return ""
    return "cert:" + hashlib.sha256(b"\0".join([*subject, b"", *names])).hexdigest()[:32]
