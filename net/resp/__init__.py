"""The Redis protocol (RESP2, and RESP3 after ``HELLO 3``) beside the
native one: ``serve_resp``.

Every command on a key becomes native requests run through ``node.handle``,
the very path of the native protocol: the same draining and recovering
checks, the same deadline, the same quorum reads and writes. So a RESP
client gets linearizable registers too. docs/resp.md lists the commands and
how they differ from Redis.

The modules, one concept each, in the order a command meets them:

- ``parser``: bytes to commands, with every limit checked on the headers;
- ``listener``: ``serve_resp``, the connection cap, and the session of each
  connection (reader, one task per command with quorum work, per-key order);
- ``table``: the command table, dispatch, and ``COMMAND``;
- ``strings``, ``counters``, ``keys``, ``connection``, ``server_info``: the
  commands, by family;
- ``native``: the native requests the commands are made of (``get``,
  ``set``, ``delete``, ``cas``, ``incr``, and the atomic read-then-cas loop
  ``swap``), and the RESP error each native error becomes;
- ``context``: what a command works with (the node, the connection's state,
  ``Job``);
- ``replies`` and ``reply_queue``: reply encoding, and the queue that sends
  replies in command order.
"""

from __future__ import annotations

from net.resp.context import RespNode
from net.resp.listener import serve_resp
from net.resp.parser import MAX_ARGS, MAX_INLINE, ProtocolError, RespParser, split_inline
from net.resp.replies import encode_array, encode_bulk, encode_error, encode_integer

__all__ = [
    "MAX_ARGS",
    "MAX_INLINE",
    "ProtocolError",
    "RespNode",
    "RespParser",
    "encode_array",
    "encode_bulk",
    "encode_error",
    "encode_integer",
    "serve_resp",
    "split_inline",
]
