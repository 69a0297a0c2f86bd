"""Shared fixtures. Helpers for the loopback tests live in ``tests/loopback.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_twisted
from loopback import Loopback


@pytest_twisted.async_yield_fixture
async def loopback() -> AsyncIterator[Loopback]:
    """Backends, proxies and client sockets on 127.0.0.1, all closed after the test."""
    harness = Loopback()
    try:
        yield harness
    finally:
        await harness.close()
