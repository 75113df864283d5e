"""The TINY profile (orchestration/profiles/tiny.yaml) runs the engine rounds with the SHIPPED
settings of params.yaml, so the end-to-end tests exercise the recipe ``make run`` uses, not the
configs' defaults. Only counts that scale with the corpus may differ (``SIZE_KEYS``), each with a
``SIZE`` comment in the profile saying why.

Both files are read fresh and compared programmatically: a value changed in params.yaml and not
in the profile fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "params.yaml"
TINY = REPO / "orchestration" / "profiles" / "tiny.yaml"

# keys of the engine sections that may differ in the tiny profile: sizes relative to a 32-image corpus
SIZE_KEYS: dict[str, frozenset[str]] = {
    "engine": frozenset({"min_count"}),
    "engine_refined": frozenset(),
}


def _section(path: Path, name: str) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")).get(name) or {}


@pytest.mark.parametrize("section", sorted(SIZE_KEYS))
def test_tiny_engine_sections_repeat_the_shipped_values(section):
    shipped, tiny = _section(SHIPPED, section), _section(TINY, section)
    assert set(tiny) == set(shipped), "the profile sets exactly the keys params.yaml sets (none left to defaults)"
    differ = {k for k in shipped if tiny[k] != shipped[k]}
    assert differ <= SIZE_KEYS[section], f"{section}: {sorted(differ - SIZE_KEYS[section])} differ from params.yaml"


def test_each_size_key_says_why_it_differs():
    lines = TINY.read_text(encoding="utf-8").splitlines()
    for section, keys in SIZE_KEYS.items():
        start = lines.index(f"{section}:")
        body = []
        for line in lines[start + 1:]:
            if line and not line.startswith((" ", "#")):
                break
            body.append(line)
        for key in keys:
            (line,) = [b for b in body if b.strip().startswith(f"{key}:")]
            assert "# SIZE" in line, f"{section}.{key}: the profile's comment says why the size differs"


@pytest.mark.parametrize("stage", ["engine_cleaned_data", "engine_refined_data"])
def test_both_engine_rounds_resolve_to_the_shipped_config(tmp_path, stage):
    """What the stage actually runs (``engine:`` with the round's section over it, then the config's
    defaults) is the shipped round's config except for the size keys."""
    from orchestration.settings import StageEnv
    from orchestration.stages import engine_config

    shipped = engine_config(stage, StageEnv.from_params(SHIPPED, data_root=str(tmp_path))).model_dump()
    tiny = engine_config(stage, StageEnv.from_params(TINY, data_root=str(tmp_path))).model_dump()
    allowed = SIZE_KEYS["engine"] | SIZE_KEYS["engine_refined"]
    assert {k for k in shipped if shipped[k] != tiny[k]} <= allowed
    assert tiny["adapt_epochs"] == shipped["adapt_epochs"]  # the engine's own fine-tune runs in the tiny pipeline


@pytest.mark.parametrize("stage", ["preliminary_model", "retrained_model", "refined_model", "finetuned_model"])
def test_tiny_training_stages_start_from_the_same_model_as_the_shipped_ones(stage):
    """The tiny recipe is smaller (model, steps), but each stage warm-starts like the shipped one."""
    assert _section(TINY, stage).get("init_from") == _section(SHIPPED, stage).get("init_from")
