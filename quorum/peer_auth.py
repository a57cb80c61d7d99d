"""Peer authentication with a shared cluster secret, pure (no I/O).

Both ends of a peer connection prove that they hold the cluster secret,
each over a fresh random nonce chosen by the other end, so that no proof
can be replayed on another connection or reflected back:

1. the dialer sends ``peer_hello`` with its nonce ``Nd``;
2. the acceptor answers with its nonce ``Na`` and
   ``proof = HMAC-SHA256(secret, "qkv-peer-acceptor" | Nd | Na | dialer | acceptor)``;
3. the dialer checks it, then sends ``peer_auth`` with
   ``proof = HMAC-SHA256(secret, "qkv-peer-dialer" | Na | Nd | dialer | acceptor)``;
4. the acceptor checks that before it reads any peer message.

``|`` is concatenation of length-prefixed fields (2-byte big-endian
length, then the bytes), so that no two different field lists give the
same message.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["NONCE_SIZE", "acceptor_proof", "dialer_proof", "new_nonce", "proof_ok", "read_secret"]

NONCE_SIZE = 16
MIN_SECRET = 16


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def _mac(secret: bytes, label: bytes, *fields: bytes) -> bytes:
    message = bytearray(label)
    for field in fields:
        message += len(field).to_bytes(2, "big") + field
    return hmac.new(secret, bytes(message), hashlib.sha256).digest()


def acceptor_proof(
    secret: bytes, dialer_nonce: bytes, acceptor_nonce: bytes, dialer: str, acceptor: str
) -> bytes:
    return _mac(
        secret, b"qkv-peer-acceptor", dialer_nonce, acceptor_nonce, dialer.encode(), acceptor.encode()
    )


def dialer_proof(
    secret: bytes, dialer_nonce: bytes, acceptor_nonce: bytes, dialer: str, acceptor: str
) -> bytes:
    return _mac(secret, b"qkv-peer-dialer", acceptor_nonce, dialer_nonce, dialer.encode(), acceptor.encode())


def proof_ok(expected: bytes, received: bytes | None) -> bool:
    """Constant-time comparison (``None``: no proof sent)."""
    return received is not None and hmac.compare_digest(expected, received)


def read_secret(text: bytes) -> bytes:
    """The secret in a secret file: its bytes without surrounding
    whitespace; ``ValueError`` if shorter than ``MIN_SECRET`` bytes."""
    secret = text.strip()
    if len(secret) < MIN_SECRET:
        raise ValueError(f"the cluster secret must be at least {MIN_SECRET} bytes (it has {len(secret)})")
    return secret
