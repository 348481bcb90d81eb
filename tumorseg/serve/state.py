"""Durable job state: one SQLite database in the spool, one row per study and per delivery.

A study is ``received`` while instances arrive, ``complete`` after ``idle_seconds`` of quiet,
``running`` while segmented, ``done`` when its results are written, ``sent`` when every destination
acknowledged them, ``failed`` with a reason. More instances after ``complete`` start a new
generation (the study is segmented again; its RTSTRUCT is a new series). Every change is one
committed transaction, so a kill leaves the last committed state: :meth:`JobStore.recover` puts
``running`` studies back to ``complete`` at start.
"""
from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    instances INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    last_instance REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    study_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (study_uid, generation, destination)
);
"""


def study_key(study_uid: str) -> str:
    """How logs and the status name a study: a hash of its UID, never patient data."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Study:
    study_uid: str
    key: str
    state: str
    generation: int
    instances: int
    bytes: int
    last_instance: float
    reason: str


class JobStore:
    """The job database; safe to use from the SCP's threads and the worker (one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # committed means on disk
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One committed transaction, rolled back on any error (the connection never stays in one)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- receiving -------------------------------------------------------------------------
    def study_bytes(self, study_uid: str) -> int:
        """The bytes of the study being received (0 for one past it: a new generation starts)."""
        rows = self._read("SELECT bytes FROM studies WHERE study_uid = ? AND state = 'received'", (study_uid,))
        return int(rows[0][0]) if rows else 0

    def instance_received(self, study_uid: str, size: int, replaced: int = 0) -> None:
        """Count an instance (already on disk); ``replaced``: the size of the file it replaced (the
        same instance sent again counts once). A study past ``complete`` starts a new generation."""
        now = time.time()
        with self._transaction():
            row = self._db.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO studies (study_uid, key, state, instances, bytes, last_instance, updated)"
                                 " VALUES (?, ?, 'received', 1, ?, ?, ?)", (study_uid, study_key(study_uid), size, now, now))
            elif row[0] == "received":
                self._db.execute("UPDATE studies SET instances = instances + ?, bytes = bytes + ?, last_instance = ?,"
                                 " updated = ? WHERE study_uid = ?", (0 if replaced else 1, size - replaced, now, now,
                                                                      study_uid))
            else:
                self._db.execute("UPDATE studies SET state = 'received', generation = generation + 1, reason = '',"
                                 " instances = 1, bytes = ?, last_instance = ?, updated = ?"
                                 " WHERE study_uid = ?", (size, now, now, study_uid))

    # --- the worker ------------------------------------------------------------------------
    def recover(self) -> int:
        """At start: studies that were being segmented when the node stopped run again."""
        return self._write("UPDATE studies SET state = 'complete', updated = ? WHERE state = 'running'", (time.time(),))

    def restart_idle_clocks(self) -> int:
        """At start, once listening: studies still being received wait ``idle_seconds`` from now,
        since nobody could send them while the node was down."""
        return self._write("UPDATE studies SET last_instance = ? WHERE state = 'received'", (time.time(),))

    def restart_idle_clock(self, study_uid: str) -> bool:
        """The study, still being received, waits ``idle_seconds`` from now (its sender was cut off)."""
        return bool(self._write("UPDATE studies SET last_instance = ? WHERE study_uid = ? AND state = 'received'",
                                (time.time(), study_uid)))

    def mark_complete(self, idle_seconds: float, still_open: set[str] = frozenset()) -> list[Study]:
        """Studies quiet for ``idle_seconds`` become complete, except those an open association
        is still sending (``still_open``: study UIDs)."""
        cutoff = time.time() - idle_seconds
        ready = []
        for s in self.studies("received"):
            if s.study_uid in still_open:
                continue
            # Re-checked in the UPDATE: an instance that arrived since the SELECT keeps it open.
            if s.last_instance <= cutoff and self._write(
                    "UPDATE studies SET state = 'complete', updated = ? WHERE study_uid = ? AND state = 'received'"
                    " AND generation = ? AND last_instance <= ?", (time.time(), s.study_uid, s.generation, cutoff)):
                ready.append(s)
        return ready

    def next_complete(self) -> Study | None:
        rows = self.studies("complete")
        if not rows:
            return None
        study = min(rows, key=lambda s: s.last_instance)
        changed = self._write("UPDATE studies SET state = 'running', updated = ? WHERE study_uid = ? AND state = "
                              "'complete' AND generation = ?", (time.time(), study.study_uid, study.generation))
        return study if changed else None

    def finish(self, study: Study, destinations: list[str]) -> bool:
        """Results of ``study``'s generation are written: queue one delivery per destination.
        False (nothing changed) when more instances arrived meanwhile (a new generation runs)."""
        now = time.time()
        with self._transaction():
            changed = self._db.execute("UPDATE studies SET state = 'done', updated = ? WHERE study_uid = ? AND "
                                       "generation = ? AND state = 'running'", (now, study.study_uid,
                                                                                study.generation)).rowcount
            if changed:
                for name in destinations:
                    self._db.execute("INSERT OR IGNORE INTO deliveries (study_uid, generation, destination, state, "
                                     "next_try) VALUES (?, ?, ?, 'pending', ?)", (study.study_uid, study.generation,
                                                                                  name, now))
        return bool(changed)

    def fail(self, study: Study, reason: str) -> None:
        self._write("UPDATE studies SET state = 'failed', reason = ?, updated = ? WHERE study_uid = ? AND "
                    "generation = ?", (reason[:500], time.time(), study.study_uid, study.generation))

    def due_deliveries(self) -> list[tuple[str, int, str, int]]:
        """(study UID, generation, destination, attempts so far) of deliveries due now."""
        return [tuple(r) for r in self._read("SELECT study_uid, generation, destination, attempts FROM deliveries "
                                             "WHERE state = 'pending' AND next_try <= ? ORDER BY next_try",
                                             (time.time(),))]

    def delivered(self, study_uid: str, generation: int, destination: str) -> None:
        now = time.time()
        with self._transaction():
            self._db.execute("UPDATE deliveries SET state = 'sent', attempts = attempts + 1, reason = '' WHERE "
                             "study_uid = ? AND generation = ? AND destination = ?", (study_uid, generation, destination))
            left = self._db.execute("SELECT COUNT(*) FROM deliveries WHERE study_uid = ? AND generation = ? AND "
                                    "state != 'sent'", (study_uid, generation)).fetchone()[0]
            if left == 0:
                self._db.execute("UPDATE studies SET state = 'sent', updated = ? WHERE study_uid = ? AND generation = ?"
                                 " AND state = 'done'", (now, study_uid, generation))

    def delivery_failed(self, study_uid: str, generation: int, destination: str, reason: str,
                        attempts: int, limit: int, backoff: float) -> bool:
        """Record a failed attempt; True when it was the last one (the study is then failed)."""
        now = time.time()
        last = attempts + 1 >= limit
        with self._transaction():
            self._db.execute("UPDATE deliveries SET attempts = attempts + 1, reason = ?, next_try = ?, state = ? "
                             "WHERE study_uid = ? AND generation = ? AND destination = ?",
                             (reason[:500], now + backoff * 2 ** attempts, "failed" if last else "pending",
                              study_uid, generation, destination))
            if last:
                self._db.execute("UPDATE studies SET state = 'failed', reason = ?, updated = ? WHERE study_uid = ? "
                                 "AND generation = ? AND state = 'done'",
                                 (f"not delivered to {destination} after {limit} attempts: {reason}"[:500], now,
                                  study_uid, generation))
        return last

    def expired(self, keep_seconds: float) -> list[Study]:
        """Studies sent or failed more than ``keep_seconds`` ago."""
        cutoff = time.time() - keep_seconds
        return [s for s in self.studies() if s.state in ("sent", "failed") and self._updated(s.study_uid) < cutoff]

    def _updated(self, study_uid: str) -> float:
        rows = self._read("SELECT updated FROM studies WHERE study_uid = ?", (study_uid,))
        return float(rows[0][0]) if rows else float("inf")

    def forget(self, study: Study) -> bool:
        """Remove a study's rows, unless it changed since it was read (new instances)."""
        with self._transaction():
            gone = self._db.execute("DELETE FROM studies WHERE study_uid = ? AND generation = ? AND state = ?",
                                    (study.study_uid, study.generation, study.state)).rowcount
            if gone:
                self._db.execute("DELETE FROM deliveries WHERE study_uid = ?", (study.study_uid,))
        return bool(gone)

    # --- reading ---------------------------------------------------------------------------
    def studies(self, state: str | None = None) -> list[Study]:
        sql = "SELECT study_uid, key, state, generation, instances, bytes, last_instance, reason FROM studies"
        rows = self._read(sql + (" WHERE state = ?" if state else "") + " ORDER BY last_instance",
                          (state,) if state else ())
        return [Study(*r) for r in rows]

    def deliveries(self, study_uid: str) -> list[tuple[int, str, str, int, str]]:
        return [tuple(r) for r in self._read("SELECT generation, destination, state, attempts, reason FROM deliveries"
                                             " WHERE study_uid = ? ORDER BY generation, destination", (study_uid,))]
