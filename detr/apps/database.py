"""The applications' SQLite files: one place that opens them the same way.

WAL journal (readers never wait for the writer), full sync (a committed transaction survives a
power cut), a busy timeout for other processes, and one lock, so a connection can be shared by
the threads of a server.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from detr.errors import DataError

BUSY_TIMEOUT = 30  # seconds a writer waits for another process's transaction


class Database:
    """A SQLite file with its schema created if absent."""

    def __init__(self, path: str | Path, schema: str, what: str) -> None:
        """
        Raises:
            DataError: the file is not a SQLite database (or cannot be opened), naming `what` it should be.
        """
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(schema)
        except sqlite3.DatabaseError as err:
            raise DataError(f"{path}: not a usable {what}: {err}") from None
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together, or none does."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        self.db.close()
