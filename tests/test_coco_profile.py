"""The ``coco`` profile (real image-caption pairs, COCO-80 truth) on a tiny generated COCO-style
dataset in tmp_path: the COCO-80 matcher, the source's splits, and the whole pipeline through
Dagster with the profile's stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_engine.coco80 import Coco80Matcher, SYNONYMS_FILE
from data_engine.coco_source import CocoSourceConfig, read_rows, split_rows

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "orchestration" / "profiles" / "coco.yaml"

# (caption template, objects): shapes drawn in a colour per object so a model has something to see
_SCENES = [
    ("A dog sitting on a wooden bench in the park.", ["bench", "dog"], (200, 120, 40)),
    ("Two men riding bicycles down the street.", ["bicycle", "person"], (40, 80, 200)),
    ("A red car parked next to a fire hydrant.", ["car", "fire hydrant"], (220, 30, 30)),
    ("A cat sleeping on a couch.", ["cat", "couch"], (90, 200, 90)),
]


def make_coco_dataset(root: Path, n: int = 24) -> Path:
    """``n`` JPEGs + a coco_dev-style JSON-lines file (captions, COCO-80 objects); returns the file."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        caption, objects, colour = _SCENES[i % len(_SCENES)]
        img = Image.new("RGB", (80, 60), tuple(int(x) for x in rng.integers(0, 60, 3)))
        x0, y0 = int(rng.integers(0, 30)), int(rng.integers(0, 20))
        ImageDraw.Draw(img).rectangle([x0, y0, x0 + 40, y0 + 30], fill=colour)
        name = f"{i:012d}.jpg"
        img.save(root / "images" / name, quality=90)
        lines.append(json.dumps({"image_id": 1000 + i, "file_name": name, "image_path": f"images/{name}",
                                 "captions": [caption, caption.replace("A ", "One ", 1)], "objects": objects}))
    path = root / "coco_caption_objects.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("tag, category", [
    ("tennis player", "person"), ("men", "person"), ("hot dog", "hot dog"), ("dogs", "dog"),
    ("dining room table", "dining table"), ("pizza box", None), ("knives", "knife"), ("sky", None),
])
def test_matcher_maps_tags_by_longest_suffix(tag, category):
    assert Coco80Matcher.default().match_tag(tag) == category


def test_label_synonyms_file_covers_the_coco80_table():
    from data_engine.label_system import read_synonyms

    table = {k: v for k, v in json.loads(SYNONYMS_FILE.read_text()).items() if not k.startswith("_")}
    syn = read_synonyms(REPO / "data_engine" / "resources" / "coco80_label_synonyms.txt")
    assert len(table) == 80
    for cat, forms in table.items():
        for form in forms:
            assert form == cat or syn.get(form) == cat, (form, cat)


def test_source_splits_are_disjoint_and_keep_truth(tmp_path):
    data = make_coco_dataset(tmp_path / "coco")
    cfg = CocoSourceConfig(kind="coco", path=data, test_fraction=1 / 3, finetune_fraction=1 / 6)
    rows = read_rows(cfg)
    parts = split_rows(rows, cfg)
    assert {k: len(v) for k, v in parts.items()} == {"pretrain": 12, "finetune": 4, "test": 8}
    ids = [r["image_id"] for part in parts.values() for r in part]
    assert sorted(ids) == sorted(r["image_id"] for r in rows) and len(set(ids)) == len(ids)
    assert all(Path(r["image_path"]).exists() for r in rows)
    with pytest.raises(ValueError, match="needs source.path"):
        CocoSourceConfig(kind="coco")


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    import dagster as dg

    from orchestration.stage_cli import run_pipeline

    tmp = tmp_path_factory.mktemp("coco_run")
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("DAGSTER_HOME", str(home))
    data = make_coco_dataset(tmp / "coco")
    params = yaml.safe_load(PROFILE.read_text())
    params["paths"]["data_root"] = str(tmp / "data")
    params["source"].update(path=str(data), test_fraction=1 / 3, finetune_fraction=1 / 6)
    params["ingest"]["shard_size"] = 8
    params["label_system"]["synonyms_file"] = str(REPO / "data_engine" / "resources" / "coco80_label_synonyms.txt")
    small = {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 1, "num_workers": 0,
             "eval_batch_size": 8, "log_every": 1, "resume": False}
    for stage in ("preliminary_model", "retrained_model", "refined_model", "finetuned_model"):
        section = dict(params[stage])
        section.update(small)
        section["model_overrides"] = {**section["model_overrides"], "image_size": 64}
        params[stage] = section
    # the 4 finetune images: the validation share and the engine's calibration half leave ~1 to train on
    params["finetuned_model"].update(batch_size=1, micro_batch_size=1)
    params["engine"]["batch_size"] = 8
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result, _, env = run_pipeline(path, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    finally:
        mp.undo()
    return result, env, params


def test_coco_profile_runs_every_stage_against_coco80_truth(coco_run):
    from orchestration.partitions import shard_keys
    from orchestration.pipeline import STAGE_NAMES, report_path

    result, env, params = coco_run
    assert result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert done == set(STAGE_NAMES)
    assert shard_keys(env.params_path) == ["pretrain-000000", "pretrain-000001", "finetune-000000", "test-000000"]
    raw = json.loads(report_path(env.data_root, "raw_pairs").read_text())
    assert raw["metrics"]["written"] == 24 and raw["metrics"]["counts_add_up"] is True
    labels = json.loads(report_path(env.data_root, "label_system").read_text())
    assert labels["metrics"]["tags"] == 80  # only the COCO-80 names are labels
    evaluation = json.loads(report_path(env.data_root, "evaluation_report").read_text())
    counts = evaluation["details"]["counts"]["finetuned_model"]
    assert counts["used"] == 8 and counts.get("truth_tags_unknown_to_model", 0) == 0
    assert 0.0 < evaluation["metrics"]["mAP"] <= 1.0
