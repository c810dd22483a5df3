"""Named leases: one action per target, one decision at a time across replicas."""

from __future__ import annotations

import time

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError

from vllm_otel.mitigate.store.schema import LockRow
from vllm_otel.mitigate.store.engine import StoreEngine

_RAW_LOCK = ("INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?) "
             "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
             "expires_at = excluded.expires_at WHERE locks.expires_at < ? OR locks.owner = ?")
_RAW_UNLOCK = "DELETE FROM locks WHERE name = ? AND owner = ?"


class LeaseStore(StoreEngine):
    """Named leases, taken, renewed or taken over when expired."""


    def acquire_lock(self, name: str, owner: str, ttl_s: float, now: float | None = None) -> bool:
        """Take (or renew, or take over an expired) named lease; False when someone else holds it."""
        now = time.time() if now is None else now
        if self.fast_worker:  # one upsert: taken if free, expired or already ours
            with self._raw_write() as conn:
                return conn.execute(_RAW_LOCK, (name, owner, now + ttl_s, now, owner)).rowcount == 1
        try:
            with self._write() as s:
                s.add(LockRow(name=name, owner=owner, expires_at=now + ttl_s))
                s.flush()
            return True
        except IntegrityError:
            pass
        with self._write() as s:
            res = s.execute(update(LockRow).where(LockRow.name == name, or_(
                LockRow.expires_at < now, LockRow.owner == owner)).values(owner=owner,
                                                                          expires_at=now + ttl_s))
            return res.rowcount == 1

    def release_lock(self, name: str, owner: str) -> None:
        if self.fast_worker:
            with self._raw_write() as conn:
                conn.execute(_RAW_UNLOCK, (name, owner))
            return
        with self._write() as s:
            s.execute(delete(LockRow).where(LockRow.name == name, LockRow.owner == owner))

    def lock_holder(self, name: str, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        with self._session() as s:
            row = s.get(LockRow, name)
            return row.owner if row is not None and row.expires_at >= now else None
