"""Helpers that start *real* things for tests, benchmarks and the demo.

Every process runs in its own process group on a free loopback port, logs to a file, and is
stopped by group (never by name) when its context exits. Nothing here is a fake: the pytest
fixtures in ``tests/conftest.py`` are thin wrappers around these classes.
"""

from vllm_otel.testing.processes import ManagedProcess, free_port, wait_http
from vllm_otel.testing.services import AlertmanagerServer, PrometheusServer, VllmServer, find_binary

__all__ = ["ManagedProcess", "free_port", "wait_http", "VllmServer", "PrometheusServer",
           "AlertmanagerServer", "find_binary"]
