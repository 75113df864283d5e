"""One table (orchestration/pipeline.py STAGES) drives dvc.yaml, the Dagster assets and the CLI.

dvc.yaml is generated from the table (``ramflow dvc-yaml --write``), so the committed file must
be the generated one; the Dagster assets, ``ramflow stage`` and ``ramflow train`` take their
names, functions and descriptions from it; the engine rounds' params merge rule and the
training stages' inputs are written once and read by every caller.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import yaml

from orchestration import dvc_yaml
from orchestration.pipeline import (COMMON_CODE, ENGINE_STAGES, FORCEABLE, MODEL_STAGES, STAGE_NAMES, STAGES,
                                    code_paths, module_path, stage_spec)

REPO = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_the_one_generated_from_the_table():
    diff = dvc_yaml.differences(REPO / "dvc.yaml")
    assert not diff, "dvc.yaml differs from the stage table; run `ramflow dvc-yaml --write`:\n" + "\n".join(diff)


def test_generated_dvc_stages_follow_the_table():
    stages = yaml.safe_load(dvc_yaml.render())["stages"]
    assert list(stages) == list(STAGE_NAMES)
    for spec in STAGES:
        stage = stages[spec.name]
        assert stage["cmd"] == f"ramflow stage {spec.name}"
        assert stage["deps"][:len(spec.all_code)] == list(code_paths(spec, REPO))
        upstream_outs = {f"${{paths.data_root}}/{o}" for u in spec.upstream for o in stage_spec(u).outs}
        assert set(stage["deps"][len(spec.all_code):]) == upstream_outs, spec.name
        assert [p for p in stage["params"] if p != "paths"] == list(spec.params)
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
        assert outs == [f"${{paths.data_root}}/{o}" for o in spec.outs]
        assert ("plots" in stage) == spec.plots


def test_check_fails_on_a_hand_edited_copy_and_write_restores_it(tmp_path, capsys):
    path = tmp_path / "dvc.yaml"
    shutil.copy2(REPO / "dvc.yaml", path)
    path.write_text(path.read_text().replace("      - data_engine/parsing.py\n", ""))
    parser = argparse.ArgumentParser()
    dvc_yaml.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dvc-yaml", "--check", "--path", str(path)])
    assert args.func(args) == 1
    assert "+      - data_engine/parsing.py" in capsys.readouterr().out.splitlines()  # the diff is printed
    args = parser.parse_args(["dvc-yaml", "--write", "--path", str(path)])
    assert args.func(args) == 0
    assert path.read_text() == (REPO / "dvc.yaml").read_text()
    assert dvc_yaml.write(path) is False  # already generated: not rewritten


def test_code_of_every_stage_exists_and_moved_code_is_an_error(tmp_path):
    for spec in STAGES:
        assert spec.all_code[:len(COMMON_CODE)] == COMMON_CODE
        for rel in code_paths(spec, REPO):
            assert (REPO / rel).exists(), (spec.name, rel)
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "mod.py").write_text("")
    assert module_path("pkg.sub", tmp_path) == "pkg/sub"
    assert module_path("pkg.mod", tmp_path) == "pkg/mod.py"
    with pytest.raises(FileNotFoundError, match="pkg.gone"):
        module_path("pkg.gone", tmp_path)


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_every_stage_function_is_a_stage_function(spec):
    fn = spec.runner()
    assert callable(fn) and fn.__module__ == "orchestration.stages" and fn.__name__ == f"run_{spec.name}"


def test_dagster_assets_come_from_the_table():
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    specs = {key.to_user_string(): graph.get(key) for key in graph.get_all_asset_keys()}
    assert set(specs) == set(STAGE_NAMES)
    for spec in STAGES:
        node = specs[spec.name]
        assert {p.to_user_string() for p in node.parent_keys} == set(spec.upstream)
        assert node.description == spec.description
        assert node.metadata["function"] == spec.function
        assert (node.partitions_def is not None) == spec.partitioned


def test_the_cli_takes_its_stage_names_from_the_table():
    from orchestration.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices = {name: p for name, p in sub.choices.items()}
    stage_arg = next(a for a in choices["stage"]._actions if a.dest == "name")
    train_arg = next(a for a in choices["train"]._actions if a.dest == "stage")
    assert list(stage_arg.choices) == list(STAGE_NAMES)
    assert list(train_arg.choices) == list(MODEL_STAGES)
    assert "dvc-yaml" in choices
    assert set(FORCEABLE) == set(MODEL_STAGES) | {"registered_model"}


def test_ramflow_train_reads_the_pipelines_wiring(tmp_path):
    from orchestration.stages import SKIPPABLE, train_inputs
    from orchestration.train_cli import default_inputs
    from ramflow_io import formats

    assert set(SKIPPABLE) == set(STAGE_NAMES) - set(FORCEABLE)
    for stage in MODEL_STAGES:
        wired = train_inputs(stage, tmp_path)
        labels, init = default_inputs(stage, tmp_path)
        assert labels == [wired.labels]
        assert init == (formats.model_dir(tmp_path, wired.init_stage) if wired.init_stage else None)
    assert default_inputs("finetuned_model", tmp_path)[1] == formats.model_dir(tmp_path, "refined_model")
    with pytest.raises(KeyError, match="not a training stage"):
        train_inputs("label_system", tmp_path)


def test_engine_rounds_merge_their_params_sections_in_table_order(tmp_path):
    """engine_round_config (stages and bench/engine_rules.py): first section, later ones over it."""
    from orchestration.stages import engine_round_config

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["engine"]["margin"] = 0.3
    params["engine_refined"] = {"margin": 0.2, "keep_quantile": 0.07}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert [stage_spec(s).params for s in ENGINE_STAGES] == [("engine",), ("engine", "engine_refined")]
    first, second = (engine_round_config(path, s) for s in ENGINE_STAGES)
    assert first.margin == 0.3 and second.margin == 0.2 and second.keep_quantile == 0.07
    assert first.keep_quantile == params["engine"]["keep_quantile"]
    assert engine_round_config(path, "engine_refined_data", {"margin": 0.1}).margin == 0.1
