"""Test tiers: ``make test`` runs everything; ``make test-fast`` (``-m "not slow and not browser
and not official"``) is the unit tier for daily work.

Tests that read an end-to-end pipeline fixture are slow by construction, whatever their own
body costs, so they are marked here once instead of on every test that takes the fixture.

``tiny_pipeline`` is the session's ONE tiny pipeline run (every asset of the TINY profile
through Dagster, laid out as a DVC repository; tests/_pipeline.py): the Dagster, ``dvc repro``
and browser tests all start from it instead of each running the pipeline again.
"""

from __future__ import annotations

import pytest

END_TO_END_FIXTURES = frozenset({"tiny_pipeline", "tiny_run", "coco_run"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if END_TO_END_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The session's tiny pipeline run (:class:`_pipeline.TinyPipeline`). Read it; to change
    anything, work on ``_pipeline.copy_pipeline(tiny_pipeline, tmp_path)``."""
    from _pipeline import run_tiny_pipeline

    return run_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))
