"""SqliteStore: the Store contract on disk, checked against MemoryStore."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import sqlite3
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from register import sqlite_store
from register.model import Key, NodeId, RidRecord, Tag, Versioned
from register.sqlite_store import _CHECKPOINT_PAGES, APPLICATION_ID, DB_NAME, SCHEMA_VERSION, SqliteStore
from register.store import Batch, MemoryStore, Meta, Snapshot, StorageError, Store

NODE = NodeId("n1")


def commit(store: Store, batch: Batch) -> None:
    """A whole commit, as the replica makes one: applied, then synced
    (with a checkpoint when one is due)."""
    store.apply(batch)
    store.sync()
    if store.checkpoint_due():
        store.checkpoint()


def v(counter: int, value: bytes | None, writer: str = "n1") -> Versioned:
    return Versioned(Tag(counter, NodeId(writer)), value)


def rid(name: bytes, key: bytes, counter: int, at: float, result: int | None = None) -> RidRecord:
    return RidRecord(rid=name, request=key, tag=Tag(counter, NODE), at=at, result=result)


def contents(snap: Snapshot) -> tuple[dict[Key, Versioned], dict[bytes, RidRecord], Meta | None]:
    """A snapshot as order-free values (MemoryStore orders rids differently)."""
    return dict(snap.entries), {r.rid: r for r in snap.rids}, snap.meta


def filled_batch(n: int, tag_base: int = 0, size: int = 100) -> Batch:
    return Batch(
        entries=[(Key(b"key-%06d" % i), v(tag_base + i + 1, bytes([i % 256]) * size)) for i in range(n)],
        meta=Meta(node_id=NODE, counter_reserved=tag_base + n),
    )


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "data"


def test_fresh_store_is_empty_and_blocking(data_dir: pathlib.Path) -> None:
    store: Store = SqliteStore.open(data_dir, NODE)
    try:
        assert store.blocking is True
        assert store.load() == Snapshot(meta=None, entries=[], rids=[])
        assert (data_dir / DB_NAME).is_file()
    finally:
        store.close()


def test_round_trip_and_reopen(data_dir: pathlib.Path) -> None:
    store = SqliteStore.open(data_dir, NODE)
    commit(
        store,
        Batch(
            entries=[(Key(b"a"), v(1, b"one")), (Key(b"b"), v(2, b"two")), (Key(b""), v(3, b""))],
            rids=[rid(b"r1", b"a", 1, 10.0), rid(b"r2", b"b", 2, 11.0)],
            meta=Meta(node_id=NODE, ready=False, counter_reserved=100),
        ),
    )
    commit(
        store,
        Batch(
            entries=[(Key(b"a"), v(4, None, "n2")), (Key(b"\x00\xff"), v(5, b"\x00" * 5000))],
            rids=[rid(b"r3", b"a", 4, 12.0)],
            rids_dropped=[b"r1", b"never-stored"],
            meta=Meta(node_id=NODE, ready=True, counter_reserved=200),
        ),
    )
    expected = (
        {
            Key(b"a"): v(4, None, "n2"),  # a tombstone loads back as one
            Key(b"b"): v(2, b"two"),
            Key(b""): v(3, b""),  # an empty value is not a tombstone
            Key(b"\x00\xff"): v(5, b"\x00" * 5000),
        },
        {b"r2": rid(b"r2", b"b", 2, 11.0), b"r3": rid(b"r3", b"a", 4, 12.0)},
        Meta(node_id=NODE, ready=True, counter_reserved=200),
    )
    first = store.load()
    assert contents(first) == expected
    store.close()
    store.close()  # idempotent
    with SqliteStore.open(data_dir, NODE) as again:
        assert again.load() == first


def test_promise_reserved_and_incr_results_round_trip(data_dir: pathlib.Path) -> None:
    """Both are kept like counter_reserved and the rest of a rid record:
    through apply, sync, close and reopen, at the ends of their range."""
    with SqliteStore.open(data_dir, NODE) as store:
        commit(
            store,
            Batch(
                rids=[
                    rid(b"incr", b"k", 1, 1.0, result=-(2**63)),
                    rid(b"zero", b"k", 2, 2.0, result=0),
                    rid(b"set", b"k", 3, 3.0),  # not an incr: no result
                ],
                meta=Meta(node_id=NODE, counter_reserved=7, promise_reserved=2**63 - 1),
            ),
        )
        commit(
            store,
            Batch(
                rids=[rid(b"zero", b"k", 2, 2.0, result=2**63 - 1)],
                meta=Meta(node_id=NODE, ready=True, counter_reserved=8, promise_reserved=5),
            ),
        )
    with SqliteStore.open(data_dir, NODE) as store:
        snap = store.load()
    assert snap.meta == Meta(node_id=NODE, ready=True, counter_reserved=8, promise_reserved=5)
    assert {r.rid: r.result for r in snap.rids} == {b"incr": -(2**63), b"zero": 2**63 - 1, b"set": None}


def test_a_records_past_and_base_round_trip(data_dir: pathlib.Path) -> None:
    """The tags a retried write reads its standing from survive a reopen,
    and "not known" stays not known (NULL), never a tag."""
    past, base = Tag(5, NodeId("n3")), Tag(0, NodeId(""))
    records = [
        attrs.evolve(rid(b"incr", b"k", 6, 1.0, result=1), past=past, base=base),
        attrs.evolve(rid(b"set", b"k", 5, 2.0), past=past),
        rid(b"old", b"k", 4, 3.0),
    ]
    with SqliteStore.open(data_dir, NODE) as store:
        commit(store, Batch(rids=records))
    with SqliteStore.open(data_dir, NODE) as store:
        snap = store.load()
    assert {r.rid: (r.past, r.base) for r in snap.rids} == {
        b"incr": (past, base),
        b"set": (past, None),
        b"old": (None, None),
    }


def test_an_incr_result_beyond_64_bits_is_a_storage_error(data_dir: pathlib.Path) -> None:
    with SqliteStore.open(data_dir, NODE) as store:
        with pytest.raises(StorageError):
            commit(store, Batch(rids=[rid(b"r", b"k", 1, 1.0, result=2**63)]))
        assert store.load().rids == []


def test_memory_store_keeps_promise_reserved_and_incr_results() -> None:
    store = MemoryStore()
    meta = Meta(node_id=NODE, counter_reserved=3, promise_reserved=4)
    commit(store, Batch(rids=[rid(b"r", b"k", 1, 1.0, result=-5)], meta=meta))
    snap = store.load()
    assert snap.meta == meta
    assert [r.result for r in snap.rids] == [-5]


def test_rids_load_oldest_first(data_dir: pathlib.Path) -> None:
    with SqliteStore.open(data_dir, NODE) as store:
        commit(store, Batch(rids=[rid(b"x", b"k", 1, 30.0), rid(b"y", b"k", 2, 10.0)]))
        commit(store, Batch(rids=[rid(b"z", b"k", 3, 20.0), rid(b"x", b"k", 1, 40.0)]))
        assert [(r.rid, r.at) for r in store.load().rids] == [(b"y", 10.0), (b"z", 20.0), (b"x", 40.0)]


def test_new_databases_use_small_pages(data_dir: pathlib.Path) -> None:
    """1 KiB pages: fewer bytes through each commit's WAL fsync."""
    with SqliteStore.open(data_dir, NODE) as store:
        commit(store, filled_batch(10))
    conn = sqlite3.connect(data_dir / DB_NAME)
    try:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 1024
    finally:
        conn.close()


def test_the_wal_is_preallocated_with_zeros(data_dir: pathlib.Path) -> None:
    """A new node's commits overwrite WAL blocks instead of growing the file
    (a cheaper fdatasync); SQLite still reads the zeros as no frames."""
    with SqliteStore.open(data_dir, NODE) as store:
        wal = data_dir / (DB_NAME + "-wal")
        size = wal.stat().st_size
        assert size >= (_CHECKPOINT_PAGES * (1024 + 24))
        commit(store, filled_batch(50))
        assert wal.stat().st_size == size  # overwritten in place
        assert set(wal.read_bytes()[-(1 << 16) :]) == {0}
    with SqliteStore.open(data_dir, NODE) as store:
        assert len(store.load().entries) == 50


def test_preallocation_keeps_the_wal_a_crash_left(data_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The files as a crash leaves them (frames only in the WAL): reopening
    recovers every committed batch; the zeros go after the frames."""
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    store = SqliteStore.open(data_dir, NODE)
    try:
        commit(store, filled_batch(30))
        commit(store, Batch(entries=[(Key(b"last"), v(99, b"kept"))]))
        for name in (DB_NAME, DB_NAME + "-wal"):
            (crashed / name).write_bytes((data_dir / name).read_bytes())
    finally:
        store.close()
    with SqliteStore.open(crashed, NODE) as recovered:
        entries = dict(recovered.load().entries)
    assert len(entries) == 31
    assert entries[Key(b"last")] == v(99, b"kept")


def test_batch_of_many_rows_and_dropped_rids(data_dir: pathlib.Path) -> None:
    store = SqliteStore.open(data_dir, NODE)
    batch = filled_batch(2000)
    batch.rids.extend(rid(b"rid-%05d" % i, b"k", i + 1, float(i)) for i in range(2000))
    commit(store, batch)
    commit(store, Batch(rids_dropped=[b"rid-%05d" % i for i in range(0, 2000, 2)]))
    store.close()
    reopened = SqliteStore.open(data_dir, NODE)
    entries, rids, _ = contents(reopened.load())
    reopened.close()
    assert entries == dict(batch.entries)
    assert sorted(rids) == [b"rid-%05d" % i for i in range(1, 2000, 2)]


def test_a_counter_beyond_64_bits_is_a_storage_error(data_dir: pathlib.Path) -> None:
    """Never a crash of the commit task: the batch fails and the store goes on."""
    with SqliteStore.open(data_dir, NODE) as store:
        with pytest.raises(StorageError):
            commit(store, Batch(entries=[(Key(b"k"), v(2**63, b"x"))]))
        commit(store, Batch(entries=[(Key(b"k"), v(2**63 - 1, b"x"))]))
        assert dict(store.load().entries) == {Key(b"k"): v(2**63 - 1, b"x")}


def test_empty_batch_changes_nothing(data_dir: pathlib.Path) -> None:
    with SqliteStore.open(data_dir, NODE) as store:
        commit(store, Batch())
        assert store.load() == Snapshot(meta=None, entries=[], rids=[])


def test_batch_is_atomic_when_a_value_is_bad(data_dir: pathlib.Path) -> None:
    store = SqliteStore.open(data_dir, NODE)
    commit(store, filled_batch(10))
    before = store.load()
    bad: Any = "a str, not bytes"  # refused by the STRICT table, after 499 good rows
    batch = filled_batch(500, tag_base=1000)
    batch.entries.append((Key(b"bad"), v(9999, bad)))
    batch.rids.append(rid(b"r", b"key-000001", 1001, 1.0))
    with pytest.raises(StorageError, match="cannot store TEXT value in BLOB column"):
        commit(store, batch)
    assert store.load() == before
    store.close()
    with SqliteStore.open(data_dir, NODE) as store:
        assert store.load() == before
        commit(store, filled_batch(3, tag_base=2000))  # still usable
        assert store.load().meta == Meta(node_id=NODE, counter_reserved=2003)


class _FailingCommit:
    """A connection whose COMMIT fails, as a failing fsync would."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_batch_is_atomic_when_commit_fails(data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStore.open(data_dir, NODE)
    commit(store, filled_batch(10))
    before = store.load()
    monkeypatch.setattr(store, "_conn", _FailingCommit(store._conn))
    batch = filled_batch(300, tag_base=1000)
    with pytest.raises(StorageError, match="injected"):
        commit(store, batch)
    monkeypatch.undo()
    assert store.load() == before
    store.close()
    with SqliteStore.open(data_dir, NODE) as store:
        assert store.load() == before
        commit(store, batch)
        assert contents(store.load())[0] == dict(batch.entries)


def test_fail_writes_then_recovers(data_dir: pathlib.Path) -> None:
    with SqliteStore.open(data_dir, NODE, fail_writes=True) as store:
        with pytest.raises(StorageError, match="injected"):
            commit(store, filled_batch(5))
        assert store.load().entries == []
        store.fail_writes = False
        commit(store, filled_batch(5))
        assert len(store.load().entries) == 5


def test_meta_of_another_node_is_a_caller_bug(data_dir: pathlib.Path) -> None:
    with SqliteStore.open(data_dir, NODE) as store:
        with pytest.raises(ValueError):
            commit(store, Batch(meta=Meta(node_id=NodeId("n2"))))
        assert store.load().meta is None


def test_write_after_close_raises_storage_error(data_dir: pathlib.Path) -> None:
    store = SqliteStore.open(data_dir, NODE)
    store.close()
    with pytest.raises(StorageError):
        commit(store, filled_batch(1))


def test_writes_from_different_threads(data_dir: pathlib.Path) -> None:
    with SqliteStore.open(data_dir, NODE) as store, ThreadPoolExecutor(4) as pool:
        for i in range(20):  # one at a time, each on whichever worker is free
            pool.submit(commit, store, filled_batch(5, tag_base=i * 5)).result()
        assert len(store.load().entries) == 5


def test_corrupt_database_is_refused(data_dir: pathlib.Path) -> None:
    with SqliteStore.open(data_dir, NODE) as store:
        commit(store, filled_batch(3000))  # ~100 pages
    path = data_dir / DB_NAME  # close checkpointed everything into it
    size = path.stat().st_size
    assert size > 20 * 4096
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(b"\xde\xad\xbe\xef" * 2048)  # 8 KiB: at least one whole page
    with pytest.raises(StorageError, match="corrupt, refusing to serve it") as info:
        SqliteStore.open(data_dir, NODE)
    assert "\n" not in str(info.value)


def test_truncated_database_is_refused(data_dir: pathlib.Path) -> None:
    with SqliteStore.open(data_dir, NODE) as store:
        commit(store, filled_batch(3000))
    path = data_dir / DB_NAME
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(StorageError, match="corrupt"):
        SqliteStore.open(data_dir, NODE)


def test_garbage_file_is_refused(data_dir: pathlib.Path) -> None:
    data_dir.mkdir()
    (data_dir / DB_NAME).write_bytes(b"this is no database\n" * 500)
    with pytest.raises(StorageError, match="not a qkv database"):
        SqliteStore.open(data_dir, NODE)


def test_other_sqlite_database_is_refused(data_dir: pathlib.Path) -> None:
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / DB_NAME)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="is not a qkv database"):
        SqliteStore.open(data_dir, NODE)


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 99])
def test_unknown_schema_version_is_refused(data_dir: pathlib.Path, version: int) -> None:
    SqliteStore.open(data_dir, NODE).close()
    conn = sqlite3.connect(data_dir / DB_NAME)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    with pytest.raises(StorageError, match=f"unknown schema version {version}"):
        SqliteStore.open(data_dir, NODE)


# --- schema version 1 (the previous release), migrated in place -----------------

# The schema of version 1 exactly as that release created it: a copy, not
# derived from the module, so that a change there cannot change the test.
_V1_SCHEMA = (
    """CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        schema_version INTEGER NOT NULL,
        node_id TEXT NOT NULL,
        ready INTEGER NOT NULL,
        counter_reserved INTEGER NOT NULL,
        created_at REAL NOT NULL
    ) STRICT""",
    """CREATE TABLE registers (
        key BLOB PRIMARY KEY,
        counter INTEGER NOT NULL,
        writer TEXT NOT NULL,
        value BLOB
    ) WITHOUT ROWID, STRICT""",
    """CREATE TABLE rids (
        rid BLOB PRIMARY KEY,
        request BLOB NOT NULL,
        counter INTEGER NOT NULL,
        writer TEXT NOT NULL,
        at REAL NOT NULL
    ) WITHOUT ROWID, STRICT""",
    "PRAGMA application_id = 1902867968",
    "PRAGMA user_version = 1",
)


def make_v1_database(data_dir: pathlib.Path) -> None:
    """A data dir as the previous release leaves it: one row in each table."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    try:
        conn.execute("PRAGMA page_size = 1024")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN")
        for statement in _V1_SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES (1, 1, 'n1', 1, 100000, 1700000000.5)")
        conn.execute("INSERT INTO registers VALUES (x'6b', 5, 'n2', x'7631')")
        conn.execute("INSERT INTO registers VALUES (x'64', 6, 'n1', NULL)")
        conn.execute("INSERT INTO rids VALUES (x'72', x'00112233445566778899aabbccddeeff', 5, 'n2', 12.5)")
        conn.execute("COMMIT")
    finally:
        conn.close()


V1_CONTENTS = (
    {Key(b"k"): v(5, b"v1", "n2"), Key(b"d"): v(6, None)},
    {
        b"r": RidRecord(
            rid=b"r",
            request=bytes.fromhex("00112233445566778899aabbccddeeff"),
            tag=Tag(5, NodeId("n2")),
            at=12.5,
        )
    },
    Meta(node_id=NODE, ready=True, counter_reserved=100000, promise_reserved=0),
)


def header(path: pathlib.Path) -> tuple[int, int, list[str], list[str]]:
    """application_id, user_version and the column names of meta and rids."""
    conn = sqlite3.connect(path)
    try:
        return (
            conn.execute("PRAGMA application_id").fetchone()[0],
            conn.execute("PRAGMA user_version").fetchone()[0],
            [row[1] for row in conn.execute("PRAGMA table_info(meta)")],
            [row[1] for row in conn.execute("PRAGMA table_info(rids)")],
        )
    finally:
        conn.close()


def test_a_version_1_database_is_migrated_in_place(
    data_dir: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_v1_database(data_dir)
    assert APPLICATION_ID == 1902867968 and header(data_dir / DB_NAME)[1] == 1
    with caplog.at_level(logging.INFO, logger="qkv.storage"), SqliteStore.open(data_dir, NODE) as store:
        snap = store.load()
        assert contents(snap) == V1_CONTENTS
        assert [r.result for r in snap.rids] == [None]
    assert [r.getMessage() for r in caplog.records if r.name == "qkv.storage"] == [
        f"migrated {data_dir / DB_NAME} from schema version 1 to 2"
    ]
    # Same columns, same order, as a database created at version 2.
    SqliteStore.open(tmp_path / "new", NODE).close()
    assert header(data_dir / DB_NAME) == header(tmp_path / "new" / DB_NAME)
    assert header(data_dir / DB_NAME)[:2] == (APPLICATION_ID, SCHEMA_VERSION)
    conn = sqlite3.connect(data_dir / DB_NAME)
    try:
        assert conn.execute("SELECT schema_version FROM meta").fetchone()[0] == 2
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_a_migrated_database_takes_the_new_fields_and_reopens_as_is(
    data_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_v1_database(data_dir)
    with SqliteStore.open(data_dir, NODE) as store:
        commit(
            store,
            Batch(
                rids=[rid(b"i", b"k", 7, 13.0, result=42)],
                meta=Meta(node_id=NODE, ready=True, counter_reserved=200000, promise_reserved=9),
            ),
        )
        migrated = store.load()
    schema = sqlite3.connect(data_dir / DB_NAME)
    try:
        sql = schema.execute("SELECT sql FROM sqlite_schema ORDER BY name").fetchall()
    finally:
        schema.close()
    with caplog.at_level(logging.INFO, logger="qkv.storage"), SqliteStore.open(data_dir, NODE) as store:
        assert store.load() == migrated  # nothing migrated twice, nothing lost
    assert not [r for r in caplog.records if r.name == "qkv.storage"]
    schema = sqlite3.connect(data_dir / DB_NAME)
    try:
        assert schema.execute("SELECT sql FROM sqlite_schema ORDER BY name").fetchall() == sql
    finally:
        schema.close()
    assert migrated.meta == Meta(node_id=NODE, ready=True, counter_reserved=200000, promise_reserved=9)
    assert {r.rid: r.result for r in migrated.rids} == {b"r": None, b"i": 42}


def test_the_migration_is_durable_before_open_returns(
    data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_v1_database(data_dir)
    synced: list[str] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    SqliteStore.open(data_dir, NODE).close()
    assert synced == [str(data_dir / (DB_NAME + "-wal"))]
    synced.clear()
    SqliteStore.open(data_dir, NODE).close()
    assert synced == []  # a reopen migrates nothing


def test_a_failed_migration_leaves_version_1_whole(
    data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transaction: a failure after the first ALTER TABLE undoes it."""
    make_v1_database(data_dir)
    before = header(data_dir / DB_NAME)
    steps = sqlite_store._MIGRATE_1_TO_2
    monkeypatch.setattr(
        sqlite_store, "_MIGRATE_1_TO_2", (*steps[:2], "SELECT no_such_function()", *steps[2:])
    )
    with pytest.raises(StorageError, match="no such function"):
        SqliteStore.open(data_dir, NODE)
    assert header(data_dir / DB_NAME) == before
    monkeypatch.undo()
    with SqliteStore.open(data_dir, NODE) as store:
        assert contents(store.load()) == V1_CONTENTS


def test_data_dir_of_another_node_is_refused(data_dir: pathlib.Path) -> None:
    with SqliteStore.open(data_dir, NodeId("node-a")) as store:
        commit(store, Batch(meta=Meta(node_id=NodeId("node-a"))))
    with pytest.raises(StorageError, match="belongs to node node-a, not node-b"):
        SqliteStore.open(data_dir, NodeId("node-b"))
    SqliteStore.open(data_dir, NodeId("node-a")).close()


def test_data_dir_that_cannot_be_created_is_refused(tmp_path: pathlib.Path) -> None:
    # Tests run as root, where permission bits do not stop writes; a regular
    # file in the path stops anyone.
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot create data dir"):
        SqliteStore.open(tmp_path / "file" / "data", NODE)
    with pytest.raises(StorageError, match="cannot create data dir"):
        SqliteStore.open(tmp_path / "file", NODE)


def test_data_dir_in_use_is_refused(data_dir: pathlib.Path) -> None:
    refused = pytest.raises(StorageError, match="in use by another process")
    with SqliteStore.open(data_dir, NODE), refused:
        SqliteStore.open(data_dir, NODE)
    SqliteStore.open(data_dir, NODE).close()


# --- equivalence with the reference engine -----------------------------------

keys = st.sampled_from([b"a", b"b", b"c", b"", b"\x00\xff"]).map(Key)
tags = st.builds(Tag, st.integers(0, 2**63 - 1), st.sampled_from(["n1", "n2", "n3"]).map(NodeId))
versioneds = st.builds(Versioned, tags, st.none() | st.binary(max_size=40))
rid_names = st.binary(max_size=2)
rid_records = st.builds(
    RidRecord,
    rid=rid_names,
    request=st.binary(min_size=16, max_size=16),
    tag=tags,
    at=st.floats(0, 2e9, allow_nan=False, allow_infinity=False),
    result=st.none() | st.integers(-(2**63), 2**63 - 1),
)
metas = st.none() | st.builds(
    Meta,
    node_id=st.just(NODE),
    ready=st.booleans(),
    counter_reserved=st.integers(0, 2**63 - 1),
    promise_reserved=st.integers(0, 2**63 - 1),
)
batches = st.builds(
    Batch,
    entries=st.lists(st.tuples(keys, versioneds), max_size=6),
    rids=st.lists(rid_records, max_size=4),
    rids_dropped=st.lists(rid_names, max_size=3),
    meta=metas,
)


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batches, max_size=8))
def test_same_snapshots_as_memory_store(
    tmp_path_factory: pytest.TempPathFactory, sequence: list[Batch]
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as tmp:
        model = MemoryStore()
        store = SqliteStore.open(pathlib.Path(tmp), NODE)
        try:
            for batch in sequence:
                commit(model, batch)
                commit(store, batch)
            assert contents(store.load()) == contents(model.load())
        finally:
            store.close()
        with SqliteStore.open(pathlib.Path(tmp), NODE) as store:
            snap = store.load()
        assert contents(snap) == contents(model.load())
        assert [r.at for r in snap.rids] == sorted(r.at for r in snap.rids)


# --- a real full disk ---------------------------------------------------------


def test_full_disk_fails_writes_cleanly_then_recovers(tmp_path: pathlib.Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
    except OSError as e:
        pytest.skip(f"cannot run mount to get a small filesystem: {e}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root): {mounted.stderr.strip()}")
    store: SqliteStore | None = None
    try:
        filler = mnt / "filler"  # freed later, as an operator would free space
        filler.write_bytes(b"\0" * 256 * 1024)
        store = SqliteStore.open(mnt / "data", NODE)
        model = MemoryStore()  # gets exactly the acknowledged batches
        for i in range(1000):
            batch = filled_batch(20, tag_base=i * 20, size=1000)
            batch = Batch(entries=[(Key(b"%04d-" % i + k), x) for k, x in batch.entries], meta=batch.meta)
            try:
                commit(store, batch)
            except StorageError:
                break
            commit(model, batch)
        else:
            pytest.fail("1 MiB tmpfs never filled up")
        assert model.load().entries, "nothing fitted before the disk was full"
        with pytest.raises(StorageError):
            commit(store, batch)  # still full: fails again, cleanly
        assert contents(store.load()) == contents(model.load())

        filler.unlink()
        commit(store, batch)
        commit(model, batch)
        assert contents(store.load()) == contents(model.load())
        store.close()
        store = SqliteStore.open(mnt / "data", NODE)
        assert contents(store.load()) == contents(model.load())
    finally:
        if store is not None:
            store.close()
        subprocess.run(["umount", str(mnt)], check=False)


# --- apply, sync, checkpoint ----------------------------------------------------


def test_sync_fsyncs_the_wal_that_apply_wrote(
    data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``apply`` leaves the fsync out (synchronous=NORMAL); ``sync`` is an
    fdatasync of the WAL file itself, which is what makes it durable."""
    synced: list[str] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    with SqliteStore.open(data_dir, NODE) as store:
        monkeypatch.setattr(os, "fdatasync", recording)
        monkeypatch.setattr(os, "fsync", recording)
        store.apply(filled_batch(5))
        assert synced == []  # nothing fsynced by the commit itself
        store.sync()
        assert synced == [str(data_dir / (DB_NAME + "-wal"))]


def test_a_failed_fsync_makes_the_store_refuse_every_later_write(
    data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SqliteStore.open(data_dir, NODE) as store:
        commit(store, filled_batch(5))

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", failing)
        store.apply(filled_batch(5, tag_base=100))
        with pytest.raises(StorageError, match="restart the node"):
            store.sync()
        monkeypatch.undo()  # the disk "recovers": the store does not trust it
        with pytest.raises(StorageError, match="restart the node"):
            store.apply(filled_batch(1, tag_base=200))
        with pytest.raises(StorageError, match="restart the node"):
            store.sync()
        assert not store.checkpoint_due()


def test_a_checkpoint_falls_due_after_enough_pages_and_fills_the_database(data_dir: pathlib.Path) -> None:
    """SQLite's own checkpoint is off; ``checkpoint_due`` asks for one after
    about ``_CHECKPOINT_PAGES`` pages, and ``checkpoint`` copies the WAL
    into the database file."""
    with SqliteStore.open(data_dir, NODE) as store:
        rows = 0
        while not store.checkpoint_due():
            store.apply(filled_batch(100, tag_base=rows))
            rows += 100
        store.sync()
        assert rows >= _CHECKPOINT_PAGES // 2  # about a page per row
        before = (data_dir / DB_NAME).stat().st_size
        store.checkpoint()
        assert not store.checkpoint_due()
        assert (data_dir / DB_NAME).stat().st_size > before
        commit(store, Batch(entries=[(Key(b"after"), v(10**6, b"x"))]))
        assert len(store.load().entries) == 101  # filled_batch's 100 keys, and this one
