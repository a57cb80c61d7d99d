"""Raw byte-level access to a node, for tests that must not go through
the project's own client (wire vectors, bad input, abuse)."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import trio

from net.address import Address


class RawConnection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = bytearray()

    @classmethod
    async def open(cls, address: Address) -> RawConnection:
        return cls(await trio.open_tcp_stream(address.host, address.port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, body: dict[str, Any]) -> dict[str, Any]:
        packed = msgpack.packb(body, use_bin_type=True)
        await self.send(struct.pack(">I", len(packed)) + packed)
        reply = await self.receive()
        assert reply is not None, "connection closed instead of answering"
        return reply

    async def receive(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next reply map, or None if the node closed the connection."""
        with trio.fail_after(timeout):
            while True:
                if len(self._buf) >= 4:
                    (length,) = struct.unpack_from(">I", self._buf)
                    if len(self._buf) >= 4 + length:
                        body = bytes(self._buf[4 : 4 + length])
                        del self._buf[: 4 + length]
                        decoded: dict[str, Any] = msgpack.unpackb(body, raw=False)
                        return decoded
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self._buf += data

    async def closed_by_node(self, timeout: float = 5.0) -> bool:
        """Whether the node closes the connection (after any replies)."""
        try:
            return await self.receive(timeout) is None
        except (trio.BrokenResourceError, ConnectionResetError):
            return True

    async def aclose(self) -> None:
        await self.stream.aclose()
