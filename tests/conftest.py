"""Shared fixtures. Helpers for the loopback tests live in ``tests/loopback.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from e2e_support import chromium, curl, haproxy, node  # noqa: F401  (fixtures of the end-to-end tests)
from loopback import Loopback
from twistd_support import processes  # noqa: F401  (a fixture of the twistd tests)


@pytest_twisted.async_yield_fixture
async def loopback() -> AsyncIterator[Loopback]:
    """Backends, proxies and client sockets on 127.0.0.1, all closed after the test."""
    harness = Loopback()
    try:
        yield harness
    finally:
        await harness.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests run only when -m names them (they take minutes).

    ``-m soak`` runs them; any other selection (``-m "not loopback"``, none at
    all) skips them.
    """
    if "soak" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="a soak test: run it with -m soak")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)
