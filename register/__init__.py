"""The data model of qkv and its storage.

Every key is a register holding one ``Versioned`` value: bytes or a tombstone,
stamped with a ``Tag``. The only state change a replica ever makes is
``merge``: keep whichever of two versions has the greater tag. Because that
rule is idempotent, commutative and associative, replication messages may be
duplicated, reordered and retried without harm.

Nothing in this package imports trio or msgpack: it is pure logic plus the
blocking storage engines, driven from the trio side in ``quorum``.
"""

from register.model import (
    Key,
    NodeId,
    RidRecord,
    Tag,
    Versioned,
    merge,
    newer,
    request_fingerprint,
)
from register.state import RegisterState, apply_updates
from register.store import (
    Batch,
    MemoryStore,
    Meta,
    Snapshot,
    StorageError,
    Store,
)

__all__ = [
    "Batch",
    "Key",
    "MemoryStore",
    "Meta",
    "NodeId",
    "RegisterState",
    "RidRecord",
    "Snapshot",
    "StorageError",
    "Store",
    "Tag",
    "Versioned",
    "apply_updates",
    "merge",
    "newer",
    "request_fingerprint",
]
