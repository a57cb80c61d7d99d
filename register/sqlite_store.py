"""The durable storage engine: one SQLite database per node.

On-disk format
--------------
A data dir holds ``qkv.sqlite3`` (plus ``qkv.sqlite3-wal`` while open, or
after a crash). The SQLite header marks the file as ours:
``PRAGMA application_id`` is ``APPLICATION_ID`` (``b"qkv\\0"``) and
``PRAGMA user_version`` is the schema version, so both are readable before
any row exists. All tables are ``STRICT``: a value of the wrong type (say a
``str`` where bytes belong) fails the write instead of being stored and read
back as something else.

* ``meta``: at most one row (``id = 1``): ``schema_version``, ``node_id``,
  ``ready``, ``counter_reserved``, ``created_at`` (wall clock of the first
  meta write), ``promise_reserved``. A new database has no row until the
  first batch carrying a ``Meta`` (``load`` then returns ``meta=None``, as
  ``MemoryStore`` does).
Pages are 1 KiB (databases created since; an older file keeps its size).

* ``registers(key BLOB PRIMARY KEY, counter, writer, value) WITHOUT ROWID``:
  one row per key, the tag split in two columns; ``value`` NULL is a
  tombstone. ``WITHOUT ROWID`` keeps a row in the key's b-tree, one b-tree
  per upsert instead of two.
* ``rids(rid BLOB PRIMARY KEY, request, counter, writer, at, result,
  past_counter, past_writer, base_counter, base_writer) WITHOUT ROWID``:
  the remembered request ids; ``result`` is an incr's result (NULL for any
  other write); the ``past`` and ``base`` tags are ``RidNote``'s (NULL:
  none, or not known). ``load`` returns them oldest ``at`` first, the order
  ``rids.RidTable`` expects. No index on ``at``: it is only sorted once, at
  start, and an index would cost on every write.

Schema versions: 1 had neither ``meta.promise_reserved`` nor
``rids.result`` and the ``past`` and ``base`` columns; 2 adds them as the
last columns. A version-1 database is migrated when opened
(``_MIGRATE_1_TO_2``: one transaction, then an fsync of the WAL), so a
migrated file has the same columns, in the same order, as a new one; the
added ``promise_reserved`` has ``DEFAULT 0`` (SQLite adds a ``NOT NULL``
column only with a default), which no write relies on: the statements that
write ``meta`` and ``rids`` name every column. A newer
version is refused.

What is fsynced when
--------------------
``journal_mode=WAL``: each ``apply`` is one transaction whose pages are
appended to the WAL (into the page cache; SQLite's ``synchronous=NORMAL``
does not fsync at commit), and ``sync`` is an ``fdatasync`` of the WAL,
which makes every transaction appended before it durable. That is exactly
what ``synchronous=FULL`` does inside each ``COMMIT``, split in two so that
the fsync can run in another thread while the next batch is applied (group
commit that overlaps the disk with the work). Everything else SQLite syncs
itself under NORMAL: the WAL before a checkpoint copies it, the database
file after, and the WAL header when the log starts over. A crash during an
append can leave a partial tail of frames; recovery stops at the first
frame whose checksum fails and replays only whole transactions (up to their
commit frame), so a batch is durable whole or not at all. SQLite fsyncs the
directory when it creates the WAL file; this module fsyncs the data dir
(and the parents it created) when it creates the database.

Checkpoints copy WAL pages into the main file and fsync it before the WAL
is reused. SQLite's automatic checkpoint would run inside a commit, in the
event loop, so it is off; ``checkpoint_due`` says when about
``_CHECKPOINT_PAGES`` pages have gone to the WAL, and the replica runs
``checkpoint`` in its disk thread between two applies (``close``
checkpoints too). The WAL is preallocated with zeros at open
(``_preallocate_wal``), so commits overwrite blocks from the start.

Why WAL: a rollback journal needs at least two fsyncs per commit (journal,
then database), where WAL needs one sequential append + fsync. Skipping the
per-commit sync, as plain NORMAL does, could lose acknowledged writes in a
power loss, and a ``counter_reserved`` the node already issued tags under,
after which it could reissue a tag (two values under one tag breaks
``model.merge``).

A failed ``fdatasync`` leaves the fate of the unsynced pages unknown: Linux
may have dropped them and a later fsync would report success without them.
So the store refuses every later call (``StorageError``) until the node is
restarted and reloads what is really on disk.

``locking_mode=EXCLUSIVE`` holds the file lock for the connection's life:
a second process (or a second store in this process) opened on the same data
dir fails with ``StorageError`` instead of two nodes sharing one disk; and
the WAL index lives in heap memory (no ``-shm`` file, no shared-memory
locking per transaction).

Limits: SQLite pages carry no checksum. ``PRAGMA quick_check`` at open
(O(database size)) refuses structural damage (bad pages, truncation, broken
b-trees), not a flipped bit inside a stored value. If an fsync fails the
batch is reported failed, yet its frames may still reach the disk and be
recovered after a crash: a failed write may turn out to have happened, which
callers must allow for any unacknowledged write anyway.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sqlite3
import time
from typing import TYPE_CHECKING

from register.model import Key, NodeId, RidRecord, Tag, Versioned
from register.store import Batch, Meta, Snapshot, StorageError

if TYPE_CHECKING:
    from register.store import Store

log = logging.getLogger("qkv.storage")

DB_NAME = "qkv.sqlite3"
APPLICATION_ID = 0x716B7600  # b"qkv\0" as a big-endian int32
SCHEMA_VERSION = 2
_CHECKPOINT_PAGES = 4000
_PAGE_SIZE = 1024
#: frames preallocated in the WAL beyond the checkpoint threshold (the
#: checkpoint runs between the commits, once the count has crossed it)
_WAL_SPARE_FRAMES = 256

_SCHEMA = (
    """CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        schema_version INTEGER NOT NULL,
        node_id TEXT NOT NULL,
        ready INTEGER NOT NULL,
        counter_reserved INTEGER NOT NULL,
        created_at REAL NOT NULL,
        promise_reserved INTEGER NOT NULL
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
        at REAL NOT NULL,
        result INTEGER,
        past_counter INTEGER,
        past_writer TEXT,
        base_counter INTEGER,
        base_writer TEXT
    ) WITHOUT ROWID, STRICT""",
    # Written last, in the same transaction: a database that has these has
    # the whole schema.
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

# Version 1 to 2, in one transaction (ALTER TABLE and user_version both roll
# back with it). New columns go last, where the version-2 schema has them.
# ``meta.schema_version`` is raised too: ``_setup`` checks it, and the meta
# upsert never rewrites it.
_MIGRATE_1_TO_2 = (
    "ALTER TABLE meta ADD COLUMN promise_reserved INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE rids ADD COLUMN result INTEGER",
    "ALTER TABLE rids ADD COLUMN past_counter INTEGER",
    "ALTER TABLE rids ADD COLUMN past_writer TEXT",
    "ALTER TABLE rids ADD COLUMN base_counter INTEGER",
    "ALTER TABLE rids ADD COLUMN base_writer TEXT",
    "UPDATE meta SET schema_version = 2",
    "PRAGMA user_version = 2",
)

# An upsert updates the row in place where REPLACE deletes it and inserts it
# again: measured on 30-row batches of 5000 keys, 15-25% less time in the
# statement and its COMMIT (which is the event loop's time).
_PUT_REGISTER = """INSERT INTO registers VALUES (?, ?, ?, ?)
    ON CONFLICT (key) DO UPDATE SET
        counter = excluded.counter, writer = excluded.writer, value = excluded.value"""
_PUT_RID = """INSERT OR REPLACE INTO rids
        (rid, request, counter, writer, at, result, past_counter, past_writer, base_counter, base_writer)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_DROP_RID = "DELETE FROM rids WHERE rid = ?"
# created_at keeps the first write's time.
_PUT_META = """INSERT INTO meta
        (id, schema_version, node_id, ready, counter_reserved, created_at, promise_reserved)
    VALUES (1, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        ready = excluded.ready,
        counter_reserved = excluded.counter_reserved,
        promise_reserved = excluded.promise_reserved"""


def _rid_row(r: RidRecord) -> tuple[object, ...]:
    past, base = r.past, r.base
    return (
        r.rid,
        r.request,
        r.tag.counter,
        r.tag.writer,
        r.at,
        r.result,
        None if past is None else past.counter,
        None if past is None else past.writer,
        None if base is None else base.counter,
        None if base is None else base.writer,
    )


def _optional_tag(counter: int | None, writer: str | None) -> Tag | None:
    return None if counter is None or writer is None else Tag(counter, NodeId(writer))


class SqliteStore:
    """A ``Store`` in ``data_dir / "qkv.sqlite3"``.

    ``fail_writes`` is the same test fault switch as ``MemoryStore``'s: while
    set, ``apply`` raises ``StorageError`` without touching the database.
    Calls come from one writer at a time (``load`` at start), from any
    thread, except that ``sync`` (which only fsyncs the WAL file, never
    touching the connection) may run in another thread during an ``apply``.
    """

    blocking: bool = True

    def __init__(self, data_dir: pathlib.Path, node_id: NodeId, *, fail_writes: bool = False) -> None:
        self.node_id = node_id
        self.fail_writes = fail_writes
        self.data_dir = data_dir
        self.path = data_dir / DB_NAME
        self._wal = data_dir / (DB_NAME + "-wal")
        self._wal_fd = -1
        self._page_size = _PAGE_SIZE
        #: pages applied since the last checkpoint (an estimate: one per row,
        #: plus the pages of long values)
        self._wal_pages = 0
        #: a failed fdatasync: every later call fails (see the module docstring)
        self._sync_failed: StorageError | None = None
        try:
            missing = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
            data_dir.mkdir(parents=True, exist_ok=True)
            for created in missing:
                _fsync_dir(created.parent)
        except OSError as e:
            raise StorageError(f"cannot create data dir {data_dir}: {e.strerror or e}") from e
        # os.access: a clear message here rather than SQLite's "unable to open".
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise StorageError(f"data dir {data_dir} is not writable")
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            # timeout: only matters when another process holds the lock.
            self._conn = sqlite3.connect(
                self.path, timeout=1.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise StorageError(f"cannot open {self.path}: {e}") from e
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open(cls, data_dir: pathlib.Path, node_id: NodeId, *, fail_writes: bool = False) -> SqliteStore:
        return cls(data_dir, node_id, fail_writes=fail_writes)

    def _setup(self) -> None:
        conn, path = self._conn, self.path
        try:
            # Before the first read, or SQLite would set up a shared-memory
            # WAL index and release the lock between transactions.
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
            fresh = app_id == 0 and version == 0 and tables == 0
            if not fresh:
                if app_id != APPLICATION_ID:
                    raise StorageError(f"{path} is not a qkv database")
                if version not in (1, SCHEMA_VERSION):
                    raise StorageError(
                        f"{path} has unknown schema version {version}"
                        f" (this qkv reads version {SCHEMA_VERSION})"
                    )
                report = [row[0] for row in conn.execute("PRAGMA quick_check")]
                if report != ["ok"]:
                    # One line for the operator: the first problem and a count.
                    problems = [
                        line
                        for text in report
                        for line in str(text).splitlines()
                        if not line.startswith("***")
                    ] or ["unknown damage"]
                    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
                    raise StorageError(f"{path} is corrupt, refusing to serve it: {problems[0]}{more}")
            if fresh:
                # Small pages: a batch of random keys dirties about one leaf
                # page per entry, and every dirty page goes to the WAL and
                # through its fsync. 1 KiB instead of 4 KiB took the store
                # phase of a loaded cluster's sets from 18 to 12 ms (lab).
                # Fixed at creation; WAL mode cannot change it later.
                conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StorageError(f"{path}: cannot use WAL journal mode (got {mode})")
            # Per connection, not stored in the file: set on every open.
            # NORMAL: no fsync inside COMMIT; ``sync`` does it (see above).
            conn.execute("PRAGMA synchronous = NORMAL")
            # Batches of random keys dirty about a page per entry. A
            # checkpoint every 4000 pages instead of 1000 copies a page
            # rewritten by several batches once, and runs (with its fsyncs)
            # 4x less often: measured ~30% more entries/s. ``checkpoint``
            # runs them (see above), not SQLite. 64 MiB of page cache keeps
            # the b-trees' inner pages in memory.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA cache_size = -65536")
            # A huge batch must not leave a huge WAL behind for good.
            conn.execute("PRAGMA journal_size_limit = 67108864")
            if fresh:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("COMMIT")
                _fsync_dir(self.data_dir)
            migrated = version == 1
            if migrated:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _MIGRATE_1_TO_2:
                        conn.execute(statement)
                    conn.execute("COMMIT")  # into the WAL; fsynced below
                except BaseException:
                    self._rollback()
                    raise
            row = conn.execute("SELECT schema_version, node_id FROM meta").fetchone()
            self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            _preallocate_wal(self._wal, self._page_size)
            self._wal_fd = os.open(self._wal, os.O_RDONLY)
            if migrated:
                # Durable before the node writes (and acknowledges) anything
                # under the new schema, like every other commit.
                os.fdatasync(self._wal_fd)
                log.info(
                    "migrated %s from schema version 1 to %d",
                    path,
                    SCHEMA_VERSION,
                    extra={"event": "storage_schema_migrated"},
                )
        except sqlite3.Error as e:
            code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF  # primary code
            if code == sqlite3.SQLITE_BUSY:
                msg = f"data dir {self.data_dir} is in use by another process"
            elif code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
                msg = f"{path} is not a qkv database or is corrupt, refusing to serve it: {e}"
            else:
                msg = f"cannot open {path}: {e}"
            raise StorageError(msg) from e
        except OSError as e:
            raise StorageError(f"cannot set up data dir {self.data_dir}: {e.strerror or e}") from e
        if row is not None:
            if row[0] != SCHEMA_VERSION:
                raise StorageError(f"{path} has unknown schema version {row[0]}")
            if row[1] != self.node_id:
                raise StorageError(f"data dir {self.data_dir} belongs to node {row[1]}, not {self.node_id}")

    def load(self) -> Snapshot:
        conn = self._conn
        try:
            row = conn.execute(
                "SELECT node_id, ready, counter_reserved, promise_reserved FROM meta"
            ).fetchone()
            entries = [
                (Key(key), Versioned(Tag(counter, NodeId(writer)), value))
                for key, counter, writer, value in conn.execute(
                    "SELECT key, counter, writer, value FROM registers"
                )
            ]
            rids = [
                RidRecord(
                    rid=rid,
                    request=request,
                    tag=Tag(counter, NodeId(writer)),
                    at=at,
                    result=result,
                    past=_optional_tag(past_counter, past_writer),
                    base=_optional_tag(base_counter, base_writer),
                )
                for (
                    rid,
                    request,
                    counter,
                    writer,
                    at,
                    result,
                    past_counter,
                    past_writer,
                    base_counter,
                    base_writer,
                ) in conn.execute(
                    "SELECT rid, request, counter, writer, at, result,"
                    " past_counter, past_writer, base_counter, base_writer FROM rids ORDER BY at, rid"
                )
            ]
        except sqlite3.Error as e:
            raise StorageError(f"cannot read {self.path}: {e}") from e
        meta = None
        if row is not None:
            meta = Meta(
                node_id=NodeId(row[0]), ready=bool(row[1]), counter_reserved=row[2], promise_reserved=row[3]
            )
        return Snapshot(meta=meta, entries=entries, rids=rids)

    def apply(self, batch: Batch) -> None:
        if self._sync_failed is not None:
            raise self._sync_failed
        if self.fail_writes:
            raise StorageError("injected write failure")
        if not batch:
            return  # nothing to make durable; skip BEGIN/COMMIT
        meta = batch.meta
        if meta is not None and meta.node_id != self.node_id:
            # A caller bug, not a disk fault: would make the dir unopenable.
            raise ValueError(f"meta for node {meta.node_id} written to {self.node_id}'s store")
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if batch.entries:
                    conn.executemany(
                        _PUT_REGISTER,
                        [(k, v.tag.counter, v.tag.writer, v.value) for k, v in batch.entries],
                    )
                if batch.rids:
                    conn.executemany(
                        _PUT_RID,
                        [_rid_row(r) for r in batch.rids],
                    )
                if batch.rids_dropped:
                    conn.executemany(_DROP_RID, [(rid,) for rid in batch.rids_dropped])
                if meta is not None:
                    conn.execute(
                        _PUT_META,
                        (
                            SCHEMA_VERSION,
                            meta.node_id,
                            meta.ready,
                            meta.counter_reserved,
                            time.time(),
                            meta.promise_reserved,
                        ),
                    )
                conn.execute("COMMIT")  # into the WAL, not yet fsynced
            except BaseException:
                self._rollback()
                raise
        except (sqlite3.Error, OverflowError) as e:
            # OverflowError: an integer beyond SQLite's signed 64 bits.
            raise StorageError(f"write to {self.path} failed: {e}") from e
        value_bytes = sum(len(v.value or b"") for _, v in batch.entries)
        rows = len(batch.entries) + len(batch.rids) + len(batch.rids_dropped) + (meta is not None)
        self._wal_pages += rows + value_bytes // self._page_size

    def sync(self) -> None:
        if self._sync_failed is not None:
            raise self._sync_failed
        try:
            os.fdatasync(self._wal_fd)
        except OSError as e:
            self._sync_failed = StorageError(
                f"fsync of {self._wal} failed ({e.strerror or e}): what it held may be lost,"
                " so this store takes no more writes; restart the node to reload what is on disk"
            )
            raise self._sync_failed from e

    def checkpoint_due(self) -> bool:
        return self._wal_pages >= _CHECKPOINT_PAGES and self._sync_failed is None

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (SQLite fsyncs both), so that
        the next transaction starts the WAL over."""
        if self._sync_failed is not None:
            raise self._sync_failed
        # Counted afresh either way: after a failure (a full disk, say) the
        # next attempt comes once as many pages again have been written.
        self._wal_pages = 0
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as e:
            raise StorageError(f"checkpoint of {self.path} failed: {e}") from e
        # SQLite keeps its WAL file (one connection, exclusive lock) and
        # only rewrites it; should it ever replace the file, ``sync`` must
        # follow the new one.
        try:
            if os.stat(self._wal).st_ino != os.fstat(self._wal_fd).st_ino:
                os.close(self._wal_fd)
                self._wal_fd = os.open(self._wal, os.O_RDONLY)
        except OSError as e:
            raise StorageError(f"cannot reopen {self._wal}: {e.strerror or e}") from e

    def _rollback(self) -> None:
        # SQLite already rolls back after some errors (e.g. SQLITE_FULL at
        # COMMIT); a ROLLBACK with no transaction open would itself fail.
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one to report

    def close(self) -> None:
        """Checkpoint and close (idempotent). Nothing is lost if this fails:
        every acknowledged batch is already in the fsynced WAL."""
        try:
            self._conn.close()
        except sqlite3.Error as e:
            raise StorageError(f"closing {self.path} failed: {e}") from e
        finally:
            if self._wal_fd >= 0:
                os.close(self._wal_fd)
                self._wal_fd = -1

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _preallocate_wal(wal: pathlib.Path, page_size: int) -> None:
    """Give the WAL its working size in zero-filled blocks up front.

    An fdatasync after appending to a file must also commit the file's new
    size (an ext4 journal commit); one after overwriting allocated blocks
    flushes only the data. SQLite reuses the WAL from its start after each
    checkpoint, so a node in steady state only overwrites; but a new or
    restarted node grows the file for its first ``_CHECKPOINT_PAGES``
    frames, and measured here those commits took twice as long (0.57 vs
    0.30 ms median). Zeros are never mistaken for frames: a frame counts
    only when its salt matches the WAL header's and its checksum chains,
    so recovery stops at the first zero frame, as it stops at the stale
    frames a reused WAL holds anyway. Existing content (the WAL of a crash,
    not yet recovered) is left alone: only the missing tail is written.
    Blocks from ``fallocate`` would not do: ext4 marks them unwritten, and
    the first write to each is a metadata change again.

    Only a speed-up: on a disk without the room (or after any other error)
    the file is cut back to what it was and the node runs as before."""
    target = 32 + (_CHECKPOINT_PAGES + _WAL_SPARE_FRAMES) * (24 + page_size)
    fd = os.open(wal, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        start = size = os.fstat(fd).st_size
        if size >= target:
            return
        zeros = bytes(min(target - size, 1 << 20))
        try:
            while size < target:
                size += os.pwrite(fd, zeros[: target - size], size)
            os.fsync(fd)
        except OSError as e:
            log.warning(
                "cannot preallocate %s (%s); commits are slower until the file has grown",
                wal,
                e.strerror or e,
                extra={"event": "wal_preallocation_failed"},
            )
            os.ftruncate(fd, start)
    finally:
        os.close(fd)


def _fsync_dir(path: pathlib.Path) -> None:
    """Make the directory entries in ``path`` durable (new files, subdirs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if TYPE_CHECKING:
    _conforms: type[Store] = SqliteStore  # mypy checks the protocol here
