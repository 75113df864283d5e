"""dvc.yaml and the Dagster definitions describe the same pipeline.

Both graphs are derived from the tools themselves: DVC's resolved stages (a stage depends on
another when one of its deps is, or lies inside, one of the other's outs) and Dagster's asset
graph (``defs.resolve_asset_graph()`` parents).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def dvc_graph(repo_root: Path) -> dict[str, dict]:
    """``{stage: {"upstream": set, "params": set, "cmd": str, "outs": set}}`` from dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        stages = list(repo.index.stages)
        outs = {s.name: [str(o.fs_path) for o in s.outs] for s in stages}
        graph = {}
        for s in stages:
            deps = [str(d.fs_path) for d in s.deps if not hasattr(d, "params") or not d.params]
            params = set()
            for d in s.deps:
                if getattr(d, "params", None):
                    params |= set(d.params)
            upstream = {other for other, paths in outs.items() if other != s.name
                        and any(_inside(dep, out) for dep in deps for out in paths)}
            graph[s.name] = {"upstream": upstream, "params": params, "cmd": s.cmd,
                             "outs": {Path(o).relative_to(repo_root).as_posix() for o in outs[s.name]}}
    return graph


def dagster_graph() -> dict[str, set[str]]:
    from orchestration.definitions import defs

    asset_graph = defs.resolve_asset_graph()
    return {key.to_user_string(): {p.to_user_string() for p in asset_graph.get(key).parent_keys}
            for key in asset_graph.get_all_asset_keys()}


@pytest.fixture(scope="module")
def graphs():
    return dvc_graph(REPO), dagster_graph()


def test_same_stages_and_same_dependencies(graphs):
    dvc, dag = graphs
    assert set(dvc) == set(dag)
    for name in dvc:
        assert dvc[name]["upstream"] == dag[name], name


def test_lineage_chain_is_present(graphs):
    _, dag = graphs
    chain = ["raw_pairs", "parsed_tags", "label_system", "preliminary_model", "engine_cleaned_data",
             "retrained_model", "engine_refined_data", "refined_model", "finetuned_model", "evaluation_report",
             "registered_model"]
    for up, down in zip(chain, chain[1:]):
        assert up in dag[down], f"{up} -> {down} missing"


def test_dvc_stages_call_the_stage_functions_with_their_params(graphs):
    from orchestration.pipeline import STAGES

    dvc, _ = graphs
    for spec in STAGES:
        stage = dvc[spec.name]
        assert stage["cmd"] == f"ramflow stage {spec.name}"
        assert set(spec.params) <= stage["params"], spec.name
        assert {f"data/{o}" for o in spec.outs} <= stage["outs"], spec.name
        assert f"data/reports/{spec.name}.json" in stage["outs"], "metrics file of every stage"


def test_dagster_partitions_cover_the_raw_shards():
    from orchestration.definitions import defs
    from orchestration.partitions import parse_shard_key, shard_keys

    graph = defs.resolve_asset_graph()
    for name in ("raw_pairs", "parsed_tags"):
        node = graph.get(__import__("dagster").AssetKey(name))
        assert node.partitions_def is not None
        keys = node.partitions_def.get_partition_keys()
        assert keys == shard_keys()
        assert {parse_shard_key(k)[0] for k in keys} == {"pretrain", "finetune", "test"}
    assert graph.get(__import__("dagster").AssetKey("label_system")).partitions_def is None


def test_the_second_engine_round_reads_engine_with_engine_refined_over_it(tmp_path):
    from orchestration.settings import StageEnv
    from orchestration.stages import engine_config

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["engine"]["n_clusters"] = 7
    params["engine_refined"] = {"generation_precision": 0.9}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    env = StageEnv.from_params(path, data_root=str(tmp_path))
    first, second = engine_config("engine_cleaned_data", env), engine_config("engine_refined_data", env)
    assert first.generation_precision == params["engine"]["generation_precision"] != 0.9
    assert second.generation_precision == 0.9 and first.n_clusters == second.n_clusters == 7
    assert engine_config("engine_refined_data", env, {"generation_precision": 0.8}).generation_precision == 0.8
    # the shipped params file: the refined model is the retrained recipe, apart from the model it
    # starts from (each continues the stage before it) and the caption branch (the served lineage's)
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    differ = {"init_from", "caption"}
    assert ({k: v for k, v in shipped["refined_model"].items() if k not in differ}
            == {k: v for k, v in shipped["retrained_model"].items() if k not in differ})


def test_rematerializing_every_partition_of_one_split_rewrites_it(tmp_path):
    """raw_pairs for all shards of one split (but not all splits) rewrites those shards only."""
    from ramflow_io.formats import list_shards
    from orchestration.settings import StageEnv
    from orchestration.stages import run_raw_pairs

    env = StageEnv.from_params(REPO / "orchestration" / "profiles" / "tiny.yaml", data_root=str(tmp_path / "data"))
    first = run_raw_pairs(env)
    (finetune_shard,) = list_shards(env.data_root, "finetune")
    before = {p: p.stat().st_mtime_ns for s in ("pretrain", "test") for p in list_shards(env.data_root, s)}
    finetune_shard.unlink()
    again = run_raw_pairs(env, keys=["finetune-000000"])
    assert again.metrics["shards_written"] == 1 and finetune_shard.exists()
    assert again.metrics["written"] == first.metrics["written"] == 32 + 12 + 12
    assert {p: p.stat().st_mtime_ns for p in before} == before
