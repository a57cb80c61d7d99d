"""``qkv status``: one table for the whole cluster.

Every node is pinged at once; its reply carries its state and its numbers
(the ``stats`` extra of the ping reply): keys held, highest tag counter,
requests and errors since start and per second over the last 10 seconds,
and which of its peer links are up.
"""

from __future__ import annotations

import ssl

import attrs
import trio

from net.address import Address
from net.client import open_client
from net.errors import PeerUnavailable, QkvError
from net.messages import NodeStats
from quorum.protocol.decide import majority


@attrs.frozen
class NodeStatus:
    address: Address
    node: str | None
    state: str  # serving, recovering, isolated, stopping or unreachable
    error: str | None = None
    stats: NodeStats | None = None

    @property
    def up(self) -> bool:
        return self.state != "unreachable"

    def as_dict(self) -> dict[str, object]:
        stats = self.stats
        return {
            "address": str(self.address),
            "node": self.node,
            "up": self.up,
            "state": self.state,
            "error": self.error,
            "keys": None if stats is None else stats.keys,
            "max_counter": None if stats is None else stats.max_counter,
            "requests": None if stats is None else stats.requests,
            "errors": None if stats is None else stats.errors,
            "request_rate": None if stats is None else stats.request_rate,
            "error_rate": None if stats is None else stats.error_rate,
            "uptime": None if stats is None else stats.uptime,
            "peers": None if stats is None else dict(stats.peers),
        }


@attrs.frozen
class ClusterStatus:
    nodes: list[NodeStatus]

    @property
    def needed(self) -> int:
        return majority(len(self.nodes))

    @property
    def majority_reachable(self) -> bool:
        """A majority of the nodes answered at all."""
        return sum(1 for n in self.nodes if n.up) >= self.needed

    @property
    def majority_serving(self) -> bool:
        """A majority of the nodes answered ``serving``: the cluster can
        complete requests. ``qkv status`` exits 3 unless this holds."""
        return sum(1 for n in self.nodes if n.state == "serving") >= self.needed

    def as_dict(self) -> dict[str, object]:
        return {
            "nodes": [n.as_dict() for n in self.nodes],
            "reachable": sum(1 for n in self.nodes if n.up),
            "needed": self.needed,
            "majority_reachable": self.majority_reachable,
            "majority_serving": self.majority_serving,
        }

    def table(self) -> str:
        header = ("NODE", "ADDRESS", "UP", "STATE", "KEYS", "MAX_CTR", "REQ/S", "ERR/S", "ERRORS")
        rows: list[tuple[str, ...]] = [header]
        notes: list[str] = []
        for n in self.nodes:
            s = n.stats
            rows.append(
                (
                    n.node or "?",
                    str(n.address),
                    "up" if n.up else "DOWN",
                    n.state,
                    "-" if s is None else str(s.keys),
                    "-" if s is None else str(s.max_counter),
                    "-" if s is None else f"{s.request_rate:.1f}",
                    "-" if s is None else f"{s.error_rate:.1f}",
                    "-" if s is None else str(s.errors),
                )
            )
            if n.error:
                notes.append(f"{n.address}: {n.error}")
            if s is not None:
                down = sorted(peer for peer, link in s.peers.items() if link != "up")
                if down:
                    notes.append(f"{n.node}: links down to {', '.join(down)}")
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        reachable = sum(1 for n in self.nodes if n.up)
        serving = sum(1 for n in self.nodes if n.state == "serving")
        verdict = "yes" if self.majority_serving else "NO"
        lines.append(
            f"majority serving: {verdict} ({serving} serving, {reachable} reachable, "
            f"needs {self.needed} of {len(self.nodes)})"
        )
        lines.extend(notes)
        return "\n".join(lines)


async def ping_all(
    addresses: list[Address], per_node: float, ssl_context: ssl.SSLContext | None = None
) -> list[NodeStatus]:
    """Ping every node at once; each answer or failure within ``per_node`` seconds."""

    async def ask(address: Address, results: dict[Address, NodeStatus]) -> None:
        try:
            with trio.fail_after(per_node + 0.5):
                async with open_client([address], timeout=per_node, ssl_context=ssl_context) as client:
                    reply = await client.ping(address)
            results[address] = NodeStatus(address, reply.node, reply.state, stats=reply.stats)
        except (PeerUnavailable, QkvError, trio.TooSlowError) as exc:
            results[address] = NodeStatus(address, None, "unreachable", str(exc) or "no answer in time")

    results: dict[Address, NodeStatus] = {}
    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(ask, address, results)
    return [results[a] for a in addresses]


def cluster_status(
    addresses: list[Address], timeout: float, ssl_context: ssl.SSLContext | None = None
) -> ClusterStatus:
    async def main() -> ClusterStatus:
        return ClusterStatus(await ping_all(addresses, timeout, ssl_context))

    return trio.run(main)
