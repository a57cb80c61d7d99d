"""Test-only switches that break the protocol on purpose.

The fault-injection suite must show that it catches real bugs: each switch
below disables one safety rule, and a test shows that the linearizability
checker then reports a violation. They are plain attributes of a node, off
by default, set only by tests; no flag or config file reaches them.
"""

from __future__ import annotations

import attrs


@attrs.define
class FaultSwitches:
    #: a read answers with the newest version even when fewer than a
    #: majority hold it (no write-back)
    skip_read_write_back: bool = False
    #: a write is acknowledged once this many nodes stored it (None: a majority)
    write_quorum: int | None = None
    #: a recovering node answers quorum queries before catching up
    serve_before_catch_up: bool = False
    #: this node silently drops the store messages it receives (holds back
    #: its updates, as a slow or partitioned replica would)
    drop_stores: bool = False
