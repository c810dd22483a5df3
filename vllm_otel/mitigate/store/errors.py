"""The store's exceptions."""

from __future__ import annotations


class StoreError(RuntimeError):
    pass


class WriteWouldWait(StoreError):
    """A write told not to wait (``Store.write_now``) found another connection holding the SQLite
    write lock (another process on the same file): the caller writes elsewhere, later."""
