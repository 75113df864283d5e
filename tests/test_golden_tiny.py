"""The tiny pipeline's outputs are the golden ones (issue 21: a redesign changes no behaviour).

The session's tiny run (``tiny_pipeline``, tests/conftest.py) is reduced by
:func:`_golden.digest` and compared field by field with tests/data/tiny_pipeline_golden.json,
which was made from the tree before the redesign (e30db37). The data section (shards, parsed
tags, label system, label ids) is compared at any thread count; the models section (weights,
engine label sets, evaluation, registry) exactly at a torch thread count the golden file holds
(1 and 2, measured; see tests/_golden.py for why one section per thread count), and is skipped,
saying so, at another.

When a behaviour change is intended, regenerate the golden file and commit it with the change::

    OMP_NUM_THREADS=1 .venv/bin/python -m tests._golden --write
    OMP_NUM_THREADS=2 .venv/bin/python -m tests._golden --add-threads

(each runs the tiny pipeline once in a temporary folder; ``--check`` prints the differences).
"""

from __future__ import annotations

import pytest
import torch
from _golden import differences, load_golden


@pytest.fixture(scope="module")
def found(tiny_pipeline):
    """The digest taken right after the session's run (tests that re-materialize stages of the
    shared run, e.g. test_orchestration's reuse test, rewrite its registry decision later)."""
    assert tiny_pipeline.result.success, "the tiny pipeline failed"
    assert tiny_pipeline.outputs is not None
    return tiny_pipeline.outputs


@pytest.fixture(scope="module")
def golden():
    return load_golden()


def _fail_on(diff: list[str], section: str) -> None:
    if diff:
        shown = "\n".join(diff[:40]) + (f"\n... and {len(diff) - 40} more" if len(diff) > 40 else "")
        pytest.fail(f"{len(diff)} {section} field(s) differ from tests/data/tiny_pipeline_golden.json "
                    f"(regenerate only for an intended change: python -m tests._golden --write):\n{shown}")


def test_data_outputs_are_the_golden_ones(found, golden):
    """Shards, manifest, parsed tags, label system and label ids: exact, at any thread count."""
    assert found["data"]["label_system"]["tags"], "an empty label system digests to nothing"
    _fail_on(differences(golden["data"], found["data"], "data"), "data")


def test_model_outputs_are_the_golden_ones(found, golden):
    """Weights, engine label sets, evaluation metrics, thresholds and the registry decision:
    exact at the session's torch thread count (a different count changes float sums)."""
    threads = torch.get_num_threads()
    expected = golden["models_by_threads"].get(str(threads))
    if expected is None:
        pytest.skip(f"no golden models section at {threads} torch threads (have "
                    f"{sorted(golden['models_by_threads'])}); add one with "
                    f"OMP_NUM_THREADS={threads} python -m tests._golden --add-threads")
    assert set(found["models"]["evaluation"]) == {"preliminary_model", "retrained_model", "refined_model",
                                                   "finetuned_model"}
    _fail_on(differences(expected, found["models"], "models"), "model")


@pytest.mark.parametrize("change, field", [
    (lambda d: d["data"]["label_system"]["tags"].pop(), "data/label_system/tags"),
    (lambda d: d["models"]["evaluation"]["finetuned_model"]["all"].update(mAP=0.5),
     "models/evaluation/finetuned_model/all/mAP"),
    (lambda d: d["models"]["engine_rounds"]["engine_cleaned_data"]["labels"].pop("sha256"),
     "models/engine_rounds/engine_cleaned_data/labels/sha256"),
])
def test_a_changed_field_is_named_in_the_differences(golden, change, field):
    """The comparison reports the very field that changed (no pipeline run needed)."""
    import copy

    threads = sorted(golden["models_by_threads"])[0]
    before = {"data": golden["data"], "models": golden["models_by_threads"][threads]}
    after = copy.deepcopy(before)
    change(after)
    diff = differences(before, after)
    assert diff and all(line.startswith(field) for line in diff), diff
    assert differences(before, copy.deepcopy(before)) == []
