"""A persistent SQLite cache of judgments, so no answer is ever paid for twice.

A judgment is keyed by a SHA-256 of (kind, judge name, model, prompt version, question,
reference, prediction). Only replies are stored: a request that failed (rate limit,
outage, timeout) leaves no row, so a rerun asks again, while everything judged before an
interruption is reused. An UNPARSEABLE reply is not a verdict and is not stored either (nor
read back from an older cache that holds one): a transient junk reply (a truncated or
overloaded response) is asked again next time instead of being kept as the answer's grade.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from vqabench.judges.base import Grade, Judge, JudgeItem, Preference, Verdict, VerdictCallback

CACHE_FILE_NAME = "judgments.db"
SCHEMA_VERSION = 1
_LOOKUP_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY,        -- sha256 of kind, judge, model, version, question, reference, answer(s)
    kind TEXT NOT NULL,          -- 'grade' or 'compare'
    judge TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,       -- the judge's prompt_version (grade) or compare_version (compare)
    outcome TEXT NOT NULL,       -- a Grade value, or 'A' / 'B' / 'tie' / 'unparseable'
    reply TEXT NOT NULL DEFAULT '',
    similarity REAL,
    created_at REAL NOT NULL
)
"""


def default_cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`<cache_dir>/judgments.db`; without a cache_dir, in vqabench's default cache folder."""
    if cache_dir is None:
        from vqabench.spec import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir) / CACHE_FILE_NAME


def judgment_key(kind: str, judge: str, model: str, version: str, *texts: str) -> str:
    """The cache key: a SHA-256 over the judge's identity and the judged texts."""
    payload = json.dumps([kind, judge, model, version, *texts], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Judgments in one SQLite file, safe to share between threads and worker processes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JudgmentCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0])

    @staticmethod
    def grade_key(judge: Judge, item: JudgeItem) -> str:
        return judgment_key(
            "grade", judge.name, judge.model, judge.prompt_version, item.question, item.reference, item.prediction
        )

    @staticmethod
    def compare_key(judge: Judge, question: str, reference: str, answer_a: str, answer_b: str) -> str:
        return judgment_key(
            "compare", judge.name, judge.model, judge.compare_version, question, reference, answer_a, answer_b
        )

    def get_verdicts(self, keys: Iterable[str]) -> dict[str, Verdict]:
        """The stored verdicts among `keys`."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Verdict] = {}
        with self._lock:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, outcome, reply, similarity FROM judgments WHERE kind = 'grade' "
                    f"AND outcome != 'unparseable' AND key IN ({marks})",
                    chunk,
                )
                for key, outcome, reply, similarity in rows:
                    found[key] = Verdict(Grade(outcome), reply=reply, similarity=similarity)
        return found

    def put_verdict(self, key: str, judge: Judge, verdict: Verdict) -> None:
        """Store a verdict; an unparseable reply is skipped (it is no verdict, so it is asked again)."""
        if verdict.grade is Grade.UNPARSEABLE:
            return
        self._put(
            key,
            "grade",
            judge.name,
            judge.model,
            judge.prompt_version,
            verdict.grade.value,
            verdict.reply,
            verdict.similarity,
        )

    def get_preference(self, key: str) -> Preference | None:
        with self._lock:
            row = self._db.execute(
                "SELECT outcome FROM judgments WHERE kind = 'compare' AND outcome != 'unparseable' AND key = ?", (key,)
            ).fetchone()
        return row[0] if row else None

    def put_preference(self, key: str, judge: Judge, preference: Preference) -> None:
        """Store a preference; an unparseable reply is skipped, as for verdicts."""
        if preference == "unparseable":
            return
        self._put(key, "compare", judge.name, judge.model, judge.compare_version, preference, "", None)

    def _put(
        self,
        key: str,
        kind: str,
        judge: str,
        model: str,
        version: str,
        outcome: str,
        reply: str,
        similarity: float | None,
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgments "
                "(key, kind, judge, model, version, outcome, reply, similarity, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, kind, judge, model, version, outcome, reply, similarity, time.time()),
            )
            self._db.commit()


class CachedJudge(Judge):
    """A judge that answers from the cache first and stores each new judgment as it arrives.

    Identical items in one batch are judged once. Each verdict is written the moment the
    inner judge delivers it, so an interrupted run keeps everything judged before the stop.
    """

    def __init__(self, inner: Judge, cache: JudgmentCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.model = inner.model
        self.prompt_version = inner.prompt_version
        self.compare_version = inner.compare_version

    def describe(self) -> str:
        return self.inner.describe()

    def prepare(self) -> None:
        self.inner.prepare()

    def grade(self, items: Sequence[JudgeItem], on_verdict: VerdictCallback | None = None) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(items)

        def deliver(index: int, verdict: Verdict) -> None:
            verdicts[index] = verdict
            if on_verdict is not None:
                on_verdict(index, verdict)

        keys = [self.cache.grade_key(self.inner, item) for item in items]
        stored = self.cache.get_verdicts(keys)
        waiting: dict[str, list[int]] = {}  # key -> indices of the items that share it
        for index, key in enumerate(keys):
            if key in stored:
                deliver(index, stored[key])
            else:
                waiting.setdefault(key, []).append(index)
        if waiting:
            asked_keys = list(waiting)

            def store(position: int, verdict: Verdict) -> None:
                key = asked_keys[position]
                if verdicts[waiting[key][0]] is not None:
                    return
                self.cache.put_verdict(key, self.inner, verdict)
                for index in waiting[key]:
                    deliver(index, verdict)

            answers = self.inner.grade([items[waiting[key][0]] for key in asked_keys], on_verdict=store)
            for position, verdict in enumerate(answers):
                store(position, verdict)
        return [v for v in verdicts if v is not None]

    def compare(self, question: str, reference: str, answer_a: str, answer_b: str) -> Preference:
        key = self.cache.compare_key(self.inner, question, reference, answer_a, answer_b)
        stored = self.cache.get_preference(key)
        if stored is not None:
            return stored
        preference = self.inner.compare(question, reference, answer_a, answer_b)
        self.cache.put_preference(key, self.inner, preference)
        return preference
