"""Shared fixtures: the local stand-in of the Anthropic API (tests/fake_api.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_api import FakeAPI


@pytest.fixture
def fake_api() -> Iterator[FakeAPI]:
    """A started FakeAPI with zero batch latency; stopped after the test."""
    with FakeAPI() as api:
        yield api
