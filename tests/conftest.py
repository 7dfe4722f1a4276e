"""Shared fixtures: the local stand-in of the Anthropic API (tests/fake_api.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import batching_harness  # noqa: F401  (first: it loads the sandbox module beside it)
from tests.fake_api import FakeAPI


@pytest.fixture
def fake_api() -> Iterator[FakeAPI]:
    """A started FakeAPI with zero batch latency; stopped after the test."""
    with FakeAPI() as api:
        yield api


@pytest.fixture(autouse=True)
def _close_toolboxes() -> Iterator[None]:
    """Toolboxes made by tests.support.make_rig own private temp dirs: remove them."""
    yield
    from tests.support import OPEN_TOOLBOXES

    while OPEN_TOOLBOXES:
        OPEN_TOOLBOXES.pop().close()
