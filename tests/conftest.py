"""Test tiers: ``make test`` runs everything; ``make test-fast`` (``-m "not slow and not browser
and not official"``) is the unit tier for daily work.

Tests that read an end-to-end pipeline fixture are slow by construction, whatever their own
body costs, so they are marked here once instead of on every test that takes the fixture.
"""

from __future__ import annotations

import pytest

END_TO_END_FIXTURES = frozenset({"tiny_run", "coco_run"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if END_TO_END_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
