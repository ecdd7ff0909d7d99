"""SQLite result store: one row per finished run, keyed by ``RunSpec.key()``.

WAL journal; every result is committed in its own transaction as soon as its run finishes, so a grid killed
midway keeps everything finished, and a rerun skips it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    kv_label TEXT NOT NULL,
    task TEXT NOT NULL,
    spec TEXT NOT NULL,
    result TEXT NOT NULL,
    versions TEXT NOT NULL,
    device TEXT NOT NULL,
    started_at REAL NOT NULL,
    duration_s REAL NOT NULL
)
"""


class ResultStore:
    """Args: path: the SQLite file (created with its folder if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT key, spec, result, versions, device, started_at, duration_s FROM runs WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else self._row(row)

    def has(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is not None

    def put(self, key: str, spec: dict[str, Any], result: dict[str, Any], *, versions: dict[str, str],
            device: str, started_at: float, duration_s: float) -> None:
        with self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, spec["model"], spec.get("kv_label", ""), spec["task"]["name"], json.dumps(spec),
                 json.dumps(result), json.dumps(versions), device, started_at, duration_s),
            )

    def all(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT key, spec, result, versions, device, started_at, duration_s FROM runs ORDER BY started_at"
        ).fetchall()
        return [self._row(r) for r in rows]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    @staticmethod
    def _row(row) -> dict[str, Any]:
        key, spec, result, versions, device, started_at, duration = row
        return {
            "key": key, "spec": json.loads(spec), "result": json.loads(result), "versions": json.loads(versions),
            "device": device, "started_at": started_at, "duration_s": duration,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at)),
        }
