"""``qkv status``: each node's view, and whether a majority serves."""

from __future__ import annotations

import attrs
import trio

from net.address import Address
from net.client import open_client
from net.errors import PeerUnavailable, QkvError
from quorum.decide import majority


@attrs.frozen
class NodeStatus:
    address: Address
    node: str | None
    state: str  # serving, recovering, stopping or unreachable
    error: str | None = None


@attrs.frozen
class ClusterStatus:
    nodes: list[NodeStatus]

    @property
    def majority_serving(self) -> bool:
        serving = sum(1 for n in self.nodes if n.state == "serving")
        return serving >= majority(len(self.nodes))

    def as_dict(self) -> dict[str, object]:
        return {
            "nodes": [
                {"address": str(n.address), "node": n.node, "state": n.state, "error": n.error}
                for n in self.nodes
            ],
            "majority_serving": self.majority_serving,
        }

    def table(self) -> str:
        lines = [f"{'NODE':<8} {'ADDRESS':<22} STATE"]
        for n in self.nodes:
            detail = f" ({n.error})" if n.error else ""
            lines.append(f"{n.node or '?':<8} {n.address!s:<22} {n.state}{detail}")
        verdict = "yes" if self.majority_serving else "NO"
        lines.append(f"majority serving: {verdict} (needs {majority(len(self.nodes))} of {len(self.nodes)})")
        return "\n".join(lines)


async def ping_all(addresses: list[Address], per_node: float) -> list[NodeStatus]:
    """Ping every node at once; each answer or failure within ``per_node`` seconds."""

    async def ask(address: Address, results: dict[Address, NodeStatus]) -> None:
        try:
            async with open_client([address], timeout=per_node) as client:
                reply = await client.ping(address)
            results[address] = NodeStatus(address, reply.node, reply.state)
        except (PeerUnavailable, QkvError, trio.TooSlowError) as exc:
            results[address] = NodeStatus(address, None, "unreachable", str(exc) or "no answer in time")

    results: dict[Address, NodeStatus] = {}
    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(ask, address, results)
    return [results[a] for a in addresses]


def cluster_status(addresses: list[Address], timeout: float) -> ClusterStatus:
    async def main() -> ClusterStatus:
        return ClusterStatus(await ping_all(addresses, timeout))

    return trio.run(main)
