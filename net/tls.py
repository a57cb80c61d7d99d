"""TLS for client and peer connections (trio's ``SSLStream``).

A node with TLS serves TLS only, on its one port. Its server context asks
every connection for a certificate but requires none (``CERT_OPTIONAL``):
a client may come without one, while a peer session (``peer_hello``) is
accepted only on a connection whose certificate was presented and verified
against the cluster's CA: mutual TLS between peers. A node dials its peers
with its own certificate and checks theirs against the CA, and their
address (IP or name) against the certificate's subject alternative names.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs
import trio

__all__ = ["HANDSHAKE_TIMEOUT", "TlsFiles", "client_context", "server_context", "wrap_client"]

#: seconds a TLS handshake may take, either side
HANDSHAKE_TIMEOUT = 5.0


@attrs.frozen
class TlsFiles:
    """A node's certificate chain and key (PEM), and the CA (PEM) that
    signs the certificates of every node (and of clients that have one)."""

    cert: Path
    key: Path
    ca: Path


def server_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca))
    context.load_cert_chain(str(files.cert), str(files.key))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """For clients (``cert`` optional) and for a node's peer links (its own
    certificate): verifies the node's certificate against ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(str(cert), None if key is None else str(key))
    return context


async def wrap_client(
    stream: trio.SocketStream, context: ssl.SSLContext, host: str
) -> trio.SSLStream[trio.SocketStream]:
    """TLS over a connected stream, handshake done (within the deadline)."""
    tls = trio.SSLStream(stream, context, server_hostname=host, https_compatible=False)
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        await tls.do_handshake()
    return tls
