"""The durable record of a job's shards and batches: ``batch.sqlite`` in the checkpoint folder.

What makes "never pay twice" hold at every instant of a kill: a shard and its lines' units
are committed (``synchronous=FULL``) before its file is uploaded; the uploaded file's id
before ``batches.create``; the batch's id right after. A shard with no batch id is looked up
by its ``ds_name`` before anything is created for it, so a kill between create and saving the
id is recovered, not repaid. A unit's ``batches`` counts the batches it was put in (the
outcome's ``attempts``); ``first_sent`` is when the first of them was submitted.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .shards import Shard, UnitLine

STATE_NAME = "batch.sqlite"
SHARD_FOLDER = "batch"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY, path TEXT NOT NULL, model TEXT NOT NULL, lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL, ds_name TEXT NOT NULL, file_id TEXT, batch_id TEXT,
    status TEXT NOT NULL, total INTEGER, completed INTEGER, failed INTEGER,
    created_at REAL, window_s REAL NOT NULL, collected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS units (
    idx INTEGER PRIMARY KEY, shard TEXT NOT NULL, fingerprint TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, model TEXT NOT NULL, seed INTEGER,
    batches INTEGER NOT NULL, first_sent REAL
);
CREATE INDEX IF NOT EXISTS units_by_shard ON units (shard);
CREATE TABLE IF NOT EXISTS staged (
    shard TEXT NOT NULL, idx INTEGER NOT NULL, fingerprint TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, model TEXT NOT NULL, seed INTEGER
);
"""
_QUERY_CHUNK = 900  # below SQLite's default limit of host parameters in one statement


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """One shard as recorded: its file, its batch (once created) and the batch's last known state."""

    name: str
    path: Path
    model: str
    lines: int
    bytes: int
    ds_name: str
    file_id: str | None
    batch_id: str | None
    status: str
    total: int | None
    completed: int | None
    failed: int | None
    created_at: float | None
    window_s: float
    collected: bool

    @property
    def deadline(self) -> float | None:
        """When the window ends: ``created_at`` + ``completion_window``, computed here because
        the service's ``expires_at`` is null (research-wave2.md E.2)."""
        return None if self.created_at is None else self.created_at + self.window_s


@dataclass(frozen=True, slots=True)
class UnitRecord:
    index: int
    shard: str
    fingerprint: str
    input_tokens: int
    model: str
    seed: int | None
    batches: int
    first_sent: float | None


class BatchState:
    """The open ``batch.sqlite`` of one checkpoint; every method commits before it returns."""

    def __init__(self, connection: sqlite3.Connection, folder: Path) -> None:
        self._db = connection
        self.folder = folder

    @classmethod
    def open(cls, checkpoint_dir: Path) -> BatchState:
        """Open (or create) the state of the checkpoint at ``checkpoint_dir``."""
        # One connection, used by one task at a time (the event loop or the one thread it waits on).
        db = sqlite3.connect(checkpoint_dir / STATE_NAME, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('job_id', ?)", (uuid.uuid4().hex[:16],))
        db.execute("DELETE FROM staged")  # lines of a shard a killed run never sealed: it is written again
        return cls(db, checkpoint_dir / SHARD_FOLDER)

    @classmethod
    def open_readonly(cls, checkpoint_dir: Path) -> BatchState | None:
        """The state to read (``status``), or None when the job never ran in batch mode."""
        path = checkpoint_dir / STATE_NAME
        if not path.exists():
            return None
        return cls(sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None), checkpoint_dir / SHARD_FOLDER)

    def close(self) -> None:
        self._db.close()

    def shrink(self) -> None:
        """Hand SQLite's page cache back before a memory-heavy step."""
        self._db.execute("PRAGMA shrink_memory")

    @property
    def job_id(self) -> str:
        """A random id made with the state: batch names of two jobs (or of a --fresh start) never meet."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'job_id'").fetchone()
        return str(row[0])

    def next_shard_name(self) -> str:
        count = self._db.execute("SELECT value FROM meta WHERE key = 'shards_named'").fetchone()
        number = int(count[0]) + 1 if count else 1
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('shards_named', ?)", (str(number),))
        return f"s{number:05d}"

    # -- writing -----------------------------------------------------------------------

    def stage(self, shard: Shard) -> None:
        """Keep the shard's units so far here, not in memory: a 50,000-line file's are 10 MB."""
        self._db.executemany(
            "INSERT INTO staged VALUES (?, ?, ?, ?, ?, ?)",
            [(shard.name, u.index, u.fingerprint, u.input_tokens, u.model, u.seed) for u in shard.units],
        )
        shard.units.clear()

    def record_shard(self, shard: Shard, ds_name: str, window_s: float) -> None:
        """Record a sealed shard and its units, in one transaction, before anything is uploaded."""
        with self._transaction():
            self.stage(shard)
            self._db.execute(
                "INSERT INTO shards (name, path, model, lines, bytes, ds_name, status, window_s) "
                "VALUES (?, ?, ?, ?, ?, ?, 'written', ?)",
                (shard.name, str(shard.path), shard.model, shard.lines, shard.bytes, ds_name, window_s),
            )
            self._db.execute(
                "INSERT INTO units (idx, shard, fingerprint, input_tokens, model, seed, batches) "
                "SELECT idx, shard, fingerprint, input_tokens, model, seed, 1 FROM staged WHERE shard = ? "
                "ORDER BY idx ON CONFLICT (idx) DO UPDATE SET shard = excluded.shard, "
                "fingerprint = excluded.fingerprint, batches = units.batches + 1",
                (shard.name,),
            )
            self._db.execute("DELETE FROM staged WHERE shard = ?", (shard.name,))

    def set_file(self, shard: str, file_id: str) -> None:
        self._db.execute("UPDATE shards SET file_id = ?, status = 'uploaded' WHERE name = ?", (file_id, shard))

    def set_batch(self, shard: str, batch_id: str, status: str, created_at: float | None) -> None:
        """Record the shard's batch; its units' first submission is now (if not already)."""
        with self._transaction():
            self._db.execute(
                "UPDATE shards SET batch_id = ?, status = ?, created_at = ? WHERE name = ?",
                (batch_id, status, created_at, shard),
            )
            self._db.execute(
                "UPDATE units SET first_sent = coalesce(first_sent, ?) WHERE shard = ?", (created_at or time.time(), shard)
            )

    def set_status(self, shard: str, status: str, counts: tuple[int | None, int | None, int | None]) -> None:
        self._db.execute(
            "UPDATE shards SET status = ?, total = ?, completed = ?, failed = ? WHERE name = ?", (status, *counts, shard)
        )

    def set_collected(self, shard: str) -> None:
        self._db.execute("UPDATE shards SET collected = 1 WHERE name = ?", (shard,))

    def abandon(self, shard: str) -> None:
        """A shard never created as a batch (a refused upload): its units go to the next shard."""
        with self._transaction():
            self._db.execute("UPDATE shards SET collected = 1, status = 'not_created' WHERE name = ?", (shard,))
            self._db.execute("UPDATE units SET batches = batches - 1 WHERE shard = ?", (shard,))

    # -- reading -----------------------------------------------------------------------

    def shards(self, *, uncollected_only: bool = False) -> list[ShardRecord]:
        where = " WHERE collected = 0" if uncollected_only else ""
        rows = self._db.execute(f"SELECT * FROM shards{where} ORDER BY name").fetchall()
        return [_shard_record(row) for row in rows]

    def in_open_shards(self, indices: Sequence[int]) -> set[int]:
        """Which of ``indices`` are lines of a shard not yet collected (their answer is on its way)."""
        found: set[int] = set()
        for chunk in _chunks(indices):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT idx FROM units JOIN shards ON units.shard = shards.name "
                f"WHERE shards.collected = 0 AND idx IN ({marks})",
                chunk,
            )
            found.update(row[0] for row in rows)
        return found

    def units(self, indices: Iterable[int]) -> dict[int, UnitRecord]:
        found: dict[int, UnitRecord] = {}
        for chunk in _chunks(list(indices)):
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT * FROM units WHERE idx IN ({marks})", chunk):
                found[row[0]] = UnitRecord(*row)
        return found

    def units_of_shard(self, shard: str) -> Iterator[UnitRecord]:
        for row in self._db.execute("SELECT * FROM units WHERE shard = ? ORDER BY idx", (shard,)):
            yield UnitRecord(*row)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _shard_record(row: tuple[object, ...]) -> ShardRecord:
    values = list(row)
    values[1] = Path(str(values[1]))
    values[14] = bool(values[14])
    return ShardRecord(*values)  # type: ignore[arg-type]


def _chunks(values: Sequence[int]) -> Iterator[list[int]]:
    for start in range(0, len(values), _QUERY_CHUNK):
        yield list(values[start : start + _QUERY_CHUNK])


def unit_lines(records: Iterable[UnitRecord]) -> list[UnitLine]:
    return [UnitLine(r.index, r.fingerprint, r.input_tokens, r.model, r.seed) for r in records]
