"""The stage-time summary ``ramflow run`` prints: seconds per stage from the run's step events."""

from __future__ import annotations

import pytest

from orchestration.pipeline import STAGE_NAMES, format_stage_times, stage_seconds


@pytest.mark.parametrize("events, expected", [
    # start -> success, in event order; stages come back in pipeline order
    ([("parsed_tags", "STEP_START", 10.0), ("raw_pairs", "STEP_START", 0.0),
      ("raw_pairs", "STEP_SUCCESS", 4.5), ("parsed_tags", "STEP_SUCCESS", 12.0)],
     {"raw_pairs": 4.5, "parsed_tags": 2.0}),
    # a failed stage is timed to its failure; one that never ended is left out
    ([("label_system", "STEP_START", 1.0), ("label_system", "STEP_FAILURE", 3.0),
      ("preliminary_model", "STEP_START", 3.0)],
     {"label_system": 2.0}),
    # steps that are not stages (asset checks) and other event types are ignored
    ([("raw_pairs_check", "STEP_START", 0.0), ("raw_pairs_check", "STEP_SUCCESS", 9.0),
      ("raw_pairs", "STEP_START", 1.0), ("raw_pairs", "STEP_OUTPUT", 2.0), ("raw_pairs", "STEP_SUCCESS", 3.0)],
     {"raw_pairs": 2.0}),
    ([], {}),
])
def test_stage_seconds(events, expected):
    got = stage_seconds(events)
    assert got == pytest.approx(expected)
    assert list(got) == [n for n in STAGE_NAMES if n in expected]


def test_format_stage_times_lists_every_stage_and_the_totals():
    text = format_stage_times({"raw_pairs": 30.0, "preliminary_model": 90.0}, wall=150.0)
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "seconds", "share"]
    assert lines[1].split() == ["raw_pairs", "30.0", "20.0%"]
    assert lines[2].split() == ["preliminary_model", "90.0", "60.0%"]
    assert lines[3].split() == ["stages", "120.0"]
    assert lines[4].split()[:2] == ["other", "30.0"]
    assert lines[5].split() == ["wall", "time", "150.0"]


def test_format_stage_times_without_wall_time_has_no_shares():
    lines = format_stage_times({"raw_pairs": 1.0}, wall=0.0).splitlines()
    assert lines[1].split() == ["raw_pairs", "1.0"]


def test_run_stage_times_reads_a_dagster_run():
    """The glue ``ramflow run`` uses: step events of a real (in-memory) Dagster run."""
    import dagster as dg

    from orchestration.stage_cli import run_stage_times

    @dg.asset(name="raw_pairs")
    def raw_pairs() -> int:
        return 1

    @dg.asset(name="parsed_tags", deps=[raw_pairs])
    def parsed_tags() -> int:
        return 2

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([raw_pairs, parsed_tags], instance=instance)
    lines = run_stage_times(result.run_id, wall=100.0, instance=instance).splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["raw_pairs", "parsed_tags"]
    assert all(0.0 <= float(line.split()[1]) < 100.0 for line in lines[1:3])
    assert lines[-1].split() == ["wall", "time", "100.0"]
