"""The response cache: replies already paid for, shared by every job and process of a user.

Keyed by the request fingerprint (a hash of the exact request body), so a row whose request
was answered before -- by this job or another -- is answered from disk at no cost. It lives
in one SQLite file (stdlib ``sqlite3``) in WAL mode with a busy timeout, so several runs can
read and write it at once.

The cache is a convenience, not the durable record: the checkpoint is. So the cache commits
with ``synchronous=NORMAL`` (a power cut may lose its last transactions, never corrupt it),
and a damaged or unreadable cache file stops a run with a StorageError that says how to go
on (``--no-cache``, or delete the file) instead of a traceback.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import StorageError
from .types import Reply

CACHE_DIR_ENV = "QWEN_BATCH_CACHE_DIR"
CACHE_FILE_NAME = "responses.sqlite3"
# The cache service name of the built-in emulator: its replies never answer a real service.
EMULATOR_SERVICE = "qwen-batch built-in emulator"
BUSY_TIMEOUT_S = 30.0
DIR_MODE = 0o700
FILE_MODE = 0o600
# SQLite builds before 3.32 allow at most 999 parameters in one statement.
_MAX_PARAMETERS = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    fingerprint   TEXT PRIMARY KEY,
    text          TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    request_id    TEXT,
    created_at    REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    reasoning        TEXT,
    reasoning_tokens INTEGER,
    usage_source     TEXT
) WITHOUT ROWID
"""
# Columns added since the first cache format, each with its type: an older file gains them
# (null for the replies it already holds, which had no reasoning).
_ADDED_COLUMNS = (("reasoning", "TEXT"), ("reasoning_tokens", "INTEGER"), ("usage_source", "TEXT"))


def default_cache_path() -> Path:
    """Where the cache lives: ``$QWEN_BATCH_CACHE_DIR``, else the XDG cache folder, else ``~/.cache``.

    Reads the environment when called, so tests and callers can point it elsewhere.
    """
    directory = os.environ.get(CACHE_DIR_ENV)
    if directory:
        return Path(directory).expanduser() / CACHE_FILE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qwen-batch" / CACHE_FILE_NAME


class ResponseCache:
    """Replies by request fingerprint, in one SQLite file; safe for one writer thread plus readers.

    Raises StorageError (naming the file and the way out) if the file cannot be opened, is not
    a cache, or a read or write fails.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._prepare_files()
        except OSError as exc:
            raise self._error(f"cannot create it ({exc.strerror or exc})") from None
        try:
            # isolation_level=None: transactions are the explicit BEGIN/COMMIT below, not
            # the sqlite3 module's implicit ones.
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(f"cannot open it ({exc})") from None
        try:
            self._while_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._while_locked(lambda: self._db.execute(_SCHEMA))
            self._check_columns()
        except sqlite3.Error as exc:
            self._db.close()
            raise self._error(f"it is not a usable cache ({exc})") from None

    @staticmethod
    def _while_locked(step: Callable[[], object]) -> None:
        """Run ``step``, again while another process holds the new file's lock (processes that open
        one new cache together race to make it WAL, and SQLite answers that race at once with
        "database is locked", not after its busy timeout), for at most ``BUSY_TIMEOUT_S``."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        pause = 0.005
        while True:
            try:
                step()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def _prepare_files(self) -> None:
        directory = self.path.parent
        if not directory.exists():
            try:
                directory.mkdir(mode=DIR_MODE, parents=True)
            except FileExistsError:
                pass  # another process (a shard, a Ray worker) made it at the same moment
            else:
                directory.chmod(DIR_MODE)
        # Create the file ourselves so it is 0600 from the start; SQLite gives its -wal and
        # -shm files the database file's permissions.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.close(fd)

    def _check_columns(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(replies)")}
        expected = {"fingerprint", "text", "finish_reason", "input_tokens", "output_tokens", "request_id"}
        if not expected <= columns:
            raise sqlite3.DatabaseError(f"table replies lacks {sorted(expected - columns)}")
        for name, kind in _ADDED_COLUMNS:
            if name not in columns:
                try:
                    self._db.execute(f"ALTER TABLE replies ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as exc:
                    # Another process added it between our look and our ALTER.
                    if "duplicate column" not in str(exc):
                        raise

    def _error(self, problem: str) -> StorageError:
        return StorageError(
            f"{self.path}: response cache unusable: {problem}; "
            "re-run with --no-cache, or delete the file to start a new cache"
        )

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"

    def get_many(self, fingerprints: Sequence[str]) -> dict[str, Reply]:
        """The cached replies among ``fingerprints``; those not cached are absent from the dict."""
        found: dict[str, Reply] = {}
        unique = list(dict.fromkeys(fingerprints))
        with self._lock:
            try:
                for start in range(0, len(unique), _MAX_PARAMETERS):
                    chunk = unique[start : start + _MAX_PARAMETERS]
                    marks = ",".join("?" * len(chunk))
                    rows = self._db.execute(
                        "SELECT fingerprint, text, finish_reason, input_tokens, output_tokens, request_id, "
                        f"reasoning, reasoning_tokens, usage_source FROM replies WHERE fingerprint IN ({marks})",
                        chunk,
                    )
                    for fingerprint, text, finish, input_tokens, output_tokens, request_id, reasoning, thought, source in rows:
                        found[fingerprint] = Reply(
                            text,
                            finish,
                            input_tokens,
                            output_tokens,
                            request_id,
                            reasoning=reasoning,
                            reasoning_tokens=thought,
                            usage_source=source or "service",
                        )
            except sqlite3.Error as exc:
                raise self._error(f"read failed ({exc})") from None
        return found

    def put_many(self, items: Sequence[tuple[str, Reply]]) -> None:
        """Store replies in one transaction; a fingerprint already cached keeps its first reply.

        First wins so that every job reading the cache sees the same answer for a request.
        """
        if not items:
            return
        rows = [
            (fp, r.text, r.finish_reason, r.input_tokens, r.output_tokens, r.request_id, r.reasoning, r.reasoning_tokens, r.usage_source)
            for fp, r in items
        ]
        with self._lock:
            try:
                # IMMEDIATE takes the write lock up front, so a busy peer makes us wait
                # (busy timeout) instead of failing halfway through the transaction.
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT INTO replies (fingerprint, text, finish_reason, input_tokens, "
                        "output_tokens, request_id, reasoning, reasoning_tokens, usage_source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(fingerprint) DO NOTHING",
                        rows,
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error(f"write failed ({exc})") from None

    def __len__(self) -> int:
        with self._lock:
            try:
                count: int = self._db.execute("SELECT count(*) FROM replies").fetchone()[0]
                return count
            except sqlite3.Error as exc:
                raise self._error(f"read failed ({exc})") from None

    def close(self) -> None:
        """Close the database; idempotent."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ServiceCache:
    """The shared response cache seen from one service (a base URL, or the built-in emulator).

    A reply is reused only for the same request sent to the same service: the emulator's
    text must never answer a real run, nor one region's endpoint another's.
    """

    def __init__(self, cache: ResponseCache, service: str) -> None:
        self._cache = cache
        self._prefix = f"{service.rstrip('/')}\n".encode()

    def _key(self, fingerprint: str) -> str:
        return hashlib.sha256(self._prefix + fingerprint.encode()).hexdigest()

    def get_many(self, fingerprints: Sequence[str]) -> dict[str, Reply]:
        keys = {self._key(fingerprint): fingerprint for fingerprint in fingerprints}
        return {keys[key]: reply for key, reply in self._cache.get_many(list(keys)).items()}

    def put_many(self, items: Sequence[tuple[str, Reply]]) -> None:
        self._cache.put_many([(self._key(fingerprint), reply) for fingerprint, reply in items])
