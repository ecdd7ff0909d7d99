"""SQLite result store: one row per run config, keyed by ``RunSpec.key(dtype, device)``, plus a claim table.

Schema ``lmcompress-results`` version 2 (recorded in ``store_meta``):

- ``runs``: the config key, the code version that computed the row, dtype, device, spec, provenance, result,
  status (``ok``, or ``failed`` with its ``error`` text and no result: see :meth:`ResultStore.put_failed`), timings and owner. A row whose code version is
  not the current one is *stale* (see :mod:`lmcompress.runner.provenance`).
- ``claims``: ``(key, owner = host:pid:uuid, heartbeat)``; a runner claims a cell before computing it (see
  :mod:`lmcompress.runner.claims`).

WAL journal; every result is committed in its own transaction as soon as its run finishes, so a grid killed
midway keeps everything finished, and a rerun skips it. A file is inspected (read-only) before anything is
written to it: a regular file that is not SQLite, an SQLite file of another schema, an older lmcompress store,
a read-only file or folder each raise :class:`StoreError` with one line; such a file is never modified (never
switched to WAL).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..errors import LMCompressError

SCHEMA_NAME = "lmcompress-results"
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS store_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    code_version TEXT NOT NULL,
    model TEXT NOT NULL,
    kv_label TEXT NOT NULL,
    task TEXT NOT NULL,
    dtype TEXT NOT NULL,
    device TEXT NOT NULL,
    spec TEXT NOT NULL,
    provenance TEXT NOT NULL,
    result TEXT,
    status TEXT NOT NULL DEFAULT 'ok',
    error TEXT,
    started_at REAL NOT NULL,
    duration_s REAL NOT NULL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    claimed_at REAL NOT NULL,
    heartbeat REAL NOT NULL
);
"""

_TABLES = {"store_meta", "runs", "claims"}
#: the ``runs`` columns of the version-1 store (before dtype, device and code version were in the key).
V1_COLUMNS = ("key", "model", "kv_label", "task", "spec", "result", "versions", "device", "started_at",
              "duration_s")
_COLUMNS = ("key, code_version, dtype, device, spec, provenance, result, status, error, started_at, duration_s, "
            "owner")


class StoreError(LMCompressError):
    """A result store path that cannot be used (not SQLite, another schema, an old store, read-only)."""


def writable(path: Path) -> bool:
    """``path`` may be written: the OS allows it and its mode has a write bit (so a file or folder marked
    read-only is respected even when running as root, whom ``os.access`` always allows)."""
    return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)


def _writable_dir(folder: Path, what: str) -> None:
    """Raise unless ``folder`` (or its nearest existing ancestor, which would hold it) is a writable folder."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise StoreError(f"{what} {str(folder)!r} cannot be created: {str(probe)!r} is a file, not a folder")
    if probe.exists() and not (writable(probe) and os.access(probe, os.X_OK)):
        raise StoreError(f"{what} {str(folder)!r} is not writable (folder {str(probe)!r} is read-only)")


def check_output_dir(out: str | Path) -> Path:
    """Raise :class:`StoreError` unless ``out`` is (or can be created as) a writable folder; creates nothing."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise StoreError(f"--out {str(path)!r} is a file; allowed: a folder (existing or new)")
    _writable_dir(path, "--out")
    return path


def inspect_store(path: str | Path) -> str:
    """What ``path`` is, read-only: ``"new"`` (missing or an empty file: a store can be created there) or
    ``"store"`` (a version-2 lmcompress store). Anything else raises :class:`StoreError` naming the problem."""
    path = Path(path)
    if not path.exists():
        _writable_dir(path.parent, "result store folder")
        return "new"
    if path.is_dir():
        raise StoreError(f"result store {str(path)!r} is a folder; allowed: an SQLite file (existing or new)")
    if not path.is_file():
        raise StoreError(f"result store {str(path)!r} is not a regular file")
    # Read through SQLite only: opening and closing the file with a plain file object would drop every POSIX
    # lock this process holds on it (its open stores' connections included), after which another process
    # closing the store deletes the write-ahead log still in use here, and rows written after that are lost.
    tables: set[str] = set() if path.stat().st_size == 0 else _tables(path)
    if not tables:
        return "new"
    if "store_meta" in tables:
        meta = _read_ro(path, "SELECT name, value FROM store_meta")
        meta_d = dict(meta)
        if meta_d.get("schema") != SCHEMA_NAME:
            raise StoreError(f"{str(path)!r} is an SQLite file of another schema ({meta_d.get('schema')!r}); "
                             f"allowed: a {SCHEMA_NAME} store or a new path")
        version = int(meta_d["version"]) if str(meta_d.get("version", "")).isdigit() else 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"result store {str(path)!r} has schema version {version}, newer than this "
                             f"lmcompress reads ({SCHEMA_VERSION}); upgrade lmcompress or pass another --store")
        if version == SCHEMA_VERSION and tables >= _TABLES:
            return "store"
    elif tables == {"runs"} and tuple(c for (c,) in _read_ro(path, "SELECT name FROM pragma_table_info('runs')")) \
            == V1_COLUMNS:
        raise StoreError(
            f"result store {str(path)!r} was written by an older lmcompress (schema 1: keys without dtype, device "
            "or code version), so its rows cannot be matched to runs; it was left untouched: move it away or "
            "pass another --store"
        )
    raise StoreError(f"{str(path)!r} is an SQLite file of another schema (tables: {', '.join(sorted(tables))}); "
                     f"allowed: a {SCHEMA_NAME} store written by lmcompress, or a new path")


def _read_ro(path: Path, sql: str) -> list[tuple]:
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise StoreError(f"result store {str(path)!r} is not an SQLite file; allowed: a store written by "
                             "lmcompress bench, or a new path") from None
        raise StoreError(f"result store {str(path)!r} cannot be read as SQLite ({exc})") from None


def _tables(path: Path) -> set[str]:
    return {name for (name,) in _read_ro(path, "SELECT name FROM sqlite_master WHERE type = 'table'")
            if not name.startswith("sqlite_")}


def this_host() -> str:
    return socket.gethostname()


def owner_alive(host: str, pid: int, heartbeat: float, timeout_s: float, now: float | None = None) -> bool:
    """A claim's owner counts as alive while its heartbeat is younger than ``timeout_s`` and, on this host, its
    process exists."""
    now = time.time() if now is None else now
    if now - heartbeat > timeout_s:
        return False
    if host == this_host():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def _switch_to_wal(db: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the file's lock: switching the journal
    mode needs the file to itself, and SQLite answers "database is locked" at once instead of waiting on the
    busy timeout (two runners opening one new store together)."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class ResultStore:
    """Args:
    path: the SQLite file (created with its folder if missing; see :func:`inspect_store` for what is refused).
    readonly: open an existing store for reading only (reports); nothing is written, no WAL switch.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        kind = inspect_store(self.path)
        if readonly:
            if kind == "new":
                raise StoreError(f"result store {str(self.path)!r} does not exist or is empty")
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0,
                                       isolation_level=None)
            return
        if self.path.exists() and not (writable(self.path) and writable(self.path.parent)):
            raise StoreError(f"result store {str(self.path)!r} is read-only; allowed: a writable file and folder "
                             "(lmcompress report reads a read-only store)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        _switch_to_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        if kind == "new":  # tables and meta rows in one transaction: a concurrent opener sees none or all
            self._db.executescript(
                f"BEGIN IMMEDIATE;\n{SCHEMA}\nINSERT OR IGNORE INTO store_meta VALUES ('schema', '{SCHEMA_NAME}'), "
                f"('version', '{SCHEMA_VERSION}');\nCOMMIT;")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- runs
    def get(self, key: str) -> dict[str, Any] | None:
        """The stored record of ``key`` (any code version; ``record["code_version"]`` says which), or None."""
        row = self._db.execute(f"SELECT {_COLUMNS} FROM runs WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._row(row)

    def code_version_of(self, key: str) -> str | None:
        """The code version of the finished (status ``ok``) row of ``key``, or None if there is none."""
        row = self._db.execute("SELECT code_version FROM runs WHERE key = ? AND status = 'ok'", (key,)).fetchone()
        return None if row is None else row[0]

    def has(self, key: str, code_version: str | None = None) -> bool:
        """A finished row of ``key`` exists (computed by ``code_version`` when given)."""
        found = self.code_version_of(key)
        return found is not None and (code_version is None or found == code_version)

    def put(self, key: str, spec: dict[str, Any], result: dict[str, Any], *, provenance: dict[str, Any],
            device: str, started_at: float, duration_s: float, owner: str | None = None) -> None:
        """Store (or replace) the finished run ``key`` and drop its claim, in one transaction."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO runs (key, model, kv_label, task, code_version, dtype, device, spec, provenance, "
                "result, status, error, started_at, duration_s, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, spec["model"], spec.get("kv_label", ""), spec["task"]["name"], provenance["code_version"],
                 provenance["dtype"], device, json.dumps(spec), json.dumps(provenance), json.dumps(result), "ok",
                 None, started_at, duration_s, owner),
            )
            self._db.execute("DELETE FROM claims WHERE key = ?", (key,))

    def put_failed(self, key: str, spec: dict[str, Any], error: str, *, provenance: dict[str, Any], device: str,
                   started_at: float, duration_s: float, owner: str | None = None) -> None:
        """Store the failure of run ``key`` (status ``failed``, its error text, no result) and drop its claim, in
        one transaction. A finished row of ``key`` (of another code version) is kept: it is not replaced by a
        failure."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO runs (key, model, kv_label, task, code_version, dtype, device, spec, provenance, "
                "result, status, error, started_at, duration_s, owner) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, "
                "'failed', ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM runs WHERE key = ? AND status = 'ok')",
                (key, spec["model"], spec.get("kv_label", ""), spec["task"]["name"], provenance["code_version"],
                 provenance["dtype"], device, json.dumps(spec), json.dumps(provenance), error, started_at, duration_s,
                 owner, key),
            )
            self._db.execute("DELETE FROM claims WHERE key = ?", (key,))

    def failed_keys(self) -> set[str]:
        """Keys whose stored row is a failure (status ``failed``)."""
        return {k for (k,) in self._db.execute("SELECT key FROM runs WHERE status = 'failed'")}

    def records(self, status: str | None = "ok") -> list[dict[str, Any]]:
        """Stored records with ``status`` (``"ok"``, ``"failed"``; None: all), oldest first."""
        if status is None:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM runs ORDER BY started_at").fetchall()
        else:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM runs WHERE status = ? ORDER BY started_at",
                                    (status,)).fetchall()
        return [self._row(r) for r in rows]

    def all(self) -> list[dict[str, Any]]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM runs WHERE status = 'ok' ORDER BY started_at").fetchall()
        return [self._row(r) for r in rows]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM runs WHERE status = 'ok'").fetchone()[0]

    @staticmethod
    def _row(row) -> dict[str, Any]:
        key, code, dtype, device, spec, prov, result, status, error, started_at, duration, owner = row
        prov_d = json.loads(prov)
        return {
            "key": key, "spec": json.loads(spec), "result": None if result is None else json.loads(result),
            "code_version": code, "dtype": dtype, "device": device, "versions": prov_d.get("versions", {}),
            "provenance": prov_d, "status": status, "error": error, "owner": owner,
            "started_at": started_at, "duration_s": duration,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at)),
        }

    # -------------------------------------------------------------------------------------------- claims
    def try_claim(self, key: str, owner: str, pid: int, *, accept: set[str] | None, timeout_s: float) -> str:
        """Claim ``key`` for ``owner`` unless it is done or held by a live owner, in one transaction.

        Args:
            accept: code versions whose finished row counts as done (None: any).
            timeout_s: heartbeat age after which a claim's owner counts as dead.

        Returns:
            ``"done"`` (a finished row of an accepted code version exists), ``"busy"`` (claimed by another live
            owner) or ``"claimed"`` (now ours; an expired claim of a dead owner is taken over).
        """
        now = time.time()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT code_version FROM runs WHERE key = ? AND status = 'ok'",
                                   (key,)).fetchone()
            if row is not None and (accept is None or row[0] in accept):
                return "done"
            claim = self._db.execute("SELECT owner, host, pid, heartbeat FROM claims WHERE key = ?",
                                     (key,)).fetchone()
            if claim is not None and claim[0] != owner and owner_alive(claim[1], claim[2], claim[3], timeout_s, now):
                return "busy"
            self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?)",
                             (key, owner, this_host(), pid, now, now))
            return "claimed"

    def heartbeat(self, owner: str) -> int:
        """Refresh the heartbeat of every claim of ``owner``; returns how many it holds."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            return self._db.execute("UPDATE claims SET heartbeat = ? WHERE owner = ?", (time.time(), owner)).rowcount

    def release(self, key: str, owner: str) -> None:
        """Drop ``owner``'s claim of ``key`` (no-op if it holds none)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    def release_all(self, owner: str) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM claims WHERE owner = ?", (owner,))

    def claims(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT key, owner, host, pid, claimed_at, heartbeat FROM claims").fetchall()
        return [dict(zip(("key", "owner", "host", "pid", "claimed_at", "heartbeat"), r)) for r in rows]
