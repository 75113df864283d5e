"""Importing released RAM / RAM++ / Tag2Text checkpoints (issue 18).

Fast tests (no shared data): tiny official-layout models round-trip through the importer and the
ramflow checkpoint format, the full-size layouts' keys and shapes equal the released key lists,
and bad checkpoints fail with errors that name the keys.

``official`` tier: the golden outputs of the official code (``../shared/reference/official_ram/
golden``, skipped when absent). The deterministic official-layout weights are regenerated once per
session and architecture (20-30 s, 1.3-2 GB under the pytest tmp dir), imported through the file
path users take, and our tag logits must match the official ones to 1e-4 and the tag strings exactly.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ram_model.checkpoint import read_checkpoint
from ram_model.registry import load_model
from ram_model.official.importer import OfficialImportConfig, build_from_official_state, import_official
from ram_model.official.layout import COMPUTED_BUFFERS, LayoutError, export_official_state, unwrap_state
from ram_model.official.resources import MODEL_NAMES, OfficialTagSet, key_list, official_tag_set
from ram_model.registry import create_model

ARCHS = ("ram", "ram_plus", "tag2text")
TINY = {"ram": "ram_official_tiny", "ram_plus": "ram_plus_official_tiny", "tag2text": "tag2text_official_tiny"}
REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("RAMFLOW_OFFICIAL_GOLDEN", REPO.parent / "shared/reference/official_ram/golden"))
COCO = Path(os.environ.get("RAMFLOW_COCO_DEV_IMAGES", REPO.parent / "shared/data/coco_dev/images"))
TOLERANCE = 1e-4


# --------------------------------------------------------------------------- tiny, no shared data

def tiny_official(arch: str, n_tags: int = 6, seed: int = 0):
    """A tiny official-layout model with random weights and its tag set (names t0..t5)."""
    torch.manual_seed(seed)
    model = create_model(TINY[arch], pretrained=False)
    names = tuple(f"t{i}" for i in range(n_tags))
    rows = n_tags * model.config.descriptions_per_tag
    model.set_tags(list(names), torch.nn.functional.normalize(torch.randn(rows, model.config.text_dim), dim=-1),
                   [0.5] * n_tags)
    with torch.no_grad():  # make every tensor differ from its init (biases, LayerNorms, head rows)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), OfficialTagSet(names, (), tuple([0.5] * n_tags), ())


def images(n: int = 2, size: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_checkpoint_round_trips_through_importer(arch, tmp_path):
    model, tags = tiny_official(arch)
    ckpt = tmp_path / "official.pth"
    torch.save({"model": export_official_state(model)}, ckpt)
    cfg = OfficialImportConfig(checkpoint=ckpt, arch=arch, out=tmp_path / "imported", model_name=TINY[arch])
    imported, path = import_official(cfg, tag_set=tags)
    reloaded = load_model(path)  # the ordinary ramflow checkpoint
    x = images()
    with torch.no_grad():
        want = model.tag_logits(x)
        assert torch.equal(imported.tag_logits(x), want)
        assert torch.equal(reloaded.tag_logits(x), want)
    assert reloaded.tag_names == list(tags.names) and reloaded.config.official_arch == arch
    # served like any ramflow model: the Tagger scores the model's own tag set (RAM++: its
    # description table, Tag2Text: its learned embeddings) through the per-call path
    from ram_model.inference import Tagger

    pictures = [Image.fromarray((np.random.default_rng(i).random((120, 90, 3)) * 255).astype(np.uint8))
                for i in range(2)]
    scores = Tagger(reloaded).scores(pictures)
    from ram_model.inference import preprocess

    with torch.no_grad():
        direct = torch.sigmoid(model.tag_logits(preprocess(pictures, reloaded.data_config))).numpy()
    np.testing.assert_allclose(scores, direct, rtol=0, atol=1e-6)
    extra = read_checkpoint(path)["extra"]
    assert extra["source"] == "official" and extra["official_arch"] == arch
    if model.config.caption:  # the caption branch is mapped too: same greedy caption
        assert reloaded.caption(x, max_len=12) == model.caption(x, max_len=12)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_layout_keys_equal_released_key_lists(arch):
    """Every learned tensor of the released checkpoint has a place in our model, same shape."""
    released = {k: s for k, s in key_list(arch).items() if not k.endswith(COMPUTED_BUFFERS)}
    tags = official_tag_set(arch)
    with torch.device("meta"):
        model = create_model(MODEL_NAMES[arch], pretrained=False)
        rows = len(tags.names) * model.config.descriptions_per_tag
        model.set_tags(list(tags.names), torch.zeros(rows, model.config.text_dim), tags.served_thresholds())
    ours = {k: tuple(v.shape) for k, v in export_official_state(model).items()}
    assert ours == released


def _tiny_state(arch="ram"):
    model, tags = tiny_official(arch)
    return export_official_state(model), tags


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"tagging_head.encoder.layer.0.extra.weight": torch.zeros(1)}),
     "left unused: ['tagging_head.encoder.layer.0.extra.weight']"),
    (lambda s: s.pop("fc.bias"), "left unset: ['fc.bias']"),
    (lambda s: s.pop("visual_encoder.layers.0.downsample.norm.weight"),
     "left unset: ['visual_encoder.layers.1.downsample.norm.weight']"),
    (lambda s: s.update({"text_decoder.cls.predictions.decoder.weight":
                         s["text_decoder.cls.predictions.decoder.weight"] + 1}), "tied weights differ"),
    (lambda s: s.update({"tag_encoder.encoder.layer.1.intermediate.dense.bias":
                         s["tag_encoder.encoder.layer.1.intermediate.dense.bias"] + 1}), "tied weights differ"),
    (lambda s: s.update({"fc.weight": torch.zeros(2, 3)}), "shape of fc.weight"),
])
def test_bad_checkpoint_errors_name_the_key(edit, message):
    state, tags = _tiny_state()
    edit(state)
    with pytest.raises(LayoutError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_from_official_state(state, "ram", TINY["ram"], tags)


def test_bare_state_dict_old_head_name_and_computed_buffers(tmp_path):
    model, tags = tiny_official("ram")
    state = {k.replace("tagging_head.", "vision_multi.", 1): v for k, v in export_official_state(model).items()}
    state["visual_encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(64, 9, 9)  # dropped: computed
    state["tag_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save(state, tmp_path / "bare.pth")  # no {"model": ...} wrapper
    imported, _ = import_official(OfficialImportConfig(checkpoint=tmp_path / "bare.pth", arch="ram",
                                                       model_name=TINY["ram"]), tag_set=tags)
    with torch.no_grad():
        assert torch.equal(imported.tag_logits(images()), model.tag_logits(images()))
    assert unwrap_state({"model": {"vision_multi.x": torch.zeros(1)}}) == {"tagging_head.x": torch.zeros(1)}


def test_relative_position_tables_are_resized_for_another_window():
    state, tags = _tiny_state("ram")
    kwargs = dict(create_model(TINY["ram"], pretrained=False).config.backbone_kwargs, window_size=6)
    model = build_from_official_state(state, "ram", TINY["ram"], tags, backbone_kwargs=kwargs)
    table = model.state_dict()["visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (11 * 11, 1)  # (2 * 6 - 1)^2 offsets, was (2 * 3 - 1)^2
    center = state["visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"][12]  # offset (0, 0)
    assert torch.allclose(table[60], center, atol=1e-6)
    assert torch.isfinite(model.tag_logits(images())).all()


def test_cli_import_official(tmp_path, capsys):
    from orchestration.cli import main

    model, tags = tiny_official("tag2text")
    torch.save({"model": export_official_state(model)}, tmp_path / "t2t.pth")
    (tmp_path / "tags.txt").write_text("\n".join(tags.names) + "\n", encoding="utf-8")
    assert main(["import-official", str(tmp_path / "t2t.pth"), "--arch", "tag2text", "--model", TINY["tag2text"],
                 "--tag-list", str(tmp_path / "tags.txt"), "--threshold", "0.6", "--out", str(tmp_path / "m")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tags"] == len(tags.names)
    reloaded = load_model(tmp_path / "m")
    assert reloaded.thresholds.tolist() == pytest.approx([0.6] * len(tags.names))
    with torch.no_grad():
        assert torch.equal(reloaded.tag_logits(images()), model.tag_logits(images()))


def test_tag2text_repeated_names_stay_distinct():
    tags = official_tag_set("tag2text")
    assert len(set(tags.names)) == len(tags.names) == 3429
    assert tags.names[3116] == "perch (2)" and tags.display_names()[3116] == "perch"
    probs = torch.zeros(1, 3429)
    probs[0, [2550, 3116, 127]] = 0.9  # "perch" twice; 127 is deleted by the official code
    assert tags.official_tags(probs) == ["perch | perch"]


# --------------------------------------------------------------------------- official tier (golden files)

def _official_weights_module():
    spec = importlib.util.spec_from_file_location("official_weights", GOLDEN / "official_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _golden(arch: str) -> dict:
    path = GOLDEN / f"{arch}_seed0.pt"
    if not path.is_file():
        pytest.skip(f"golden outputs of the official code not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _golden_inputs(gold: dict, data_config: dict) -> torch.Tensor:
    """The 4 inputs of the golden files: 2 COCO images preprocessed by ramflow, 2 random tensors."""
    from ram_model.inference import load_image, preprocess

    missing = [n for n in gold["images"] if not (COCO / n).is_file()]
    if missing:
        pytest.skip(f"golden images not found under {COCO}: {missing}")
    real = preprocess([load_image(COCO / n) for n in gold["images"]], data_config)  # [2, 3, 384, 384]
    noise = np.random.Generator(np.random.PCG64(gold["random_input_seed"])).standard_normal(
        (2, 3, 384, 384), dtype=np.float32)
    return torch.cat([real, torch.from_numpy(noise)])


@pytest.fixture(scope="session", params=ARCHS)
def official_import(request, tmp_path_factory):
    """(arch, imported model, golden dict): weights regenerated into a session tmp file, imported."""
    arch = request.param
    gold = _golden(arch)
    path = tmp_path_factory.mktemp(f"official_{arch}") / f"{arch}_seed{gold['seed']}.pth"
    weights = _official_weights_module().official_weights(arch, gold["seed"])
    torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}}, path)
    del weights
    model, _ = import_official(OfficialImportConfig(checkpoint=path, arch=arch))
    yield arch, model, gold
    del model
    path.unlink()


@pytest.mark.official
@pytest.mark.parametrize("arch", ARCHS)
def test_preprocessing_matches_official(arch):
    gold = _golden(arch)
    with torch.device("meta"):
        config = create_model(MODEL_NAMES[arch], pretrained=False).data_config
    x = _golden_inputs(gold, config)
    assert [float(t.double().sum()) for t in x[:2]] == list(gold["preprocessed_sum"])
    assert torch.equal(x[:2, 0, 0, :8], gold["preprocessed_head"])


@pytest.mark.official
def test_logits_and_tags_match_official(official_import, record_property):
    arch, model, gold = official_import
    x = _golden_inputs(gold, model.data_config)
    with torch.inference_mode():
        tokens, _ = model.encode_image(x)
        logits = model._decode_tags(tokens).logits  # [4, C], what tag_logits returns
    diff = float((logits - gold["logits"]).abs().max())
    record_property(f"{arch}_max_abs_logit_diff", diff)
    print(f"{arch}: max abs logit diff vs official {diff:.3g}")
    assert diff <= TOLERANCE
    probs = torch.sigmoid(logits)
    tags = official_tag_set(arch)
    assert tags.official_tags(probs) == gold["tags"]
    # ramflow's own rule (probability >= the stored threshold; deleted tags' threshold unreachable)
    kept = [[tags.display_names()[i] for i in torch.nonzero(row >= model.thresholds).flatten().tolist()]
            for row in probs]
    assert [" | ".join(k) for k in kept] == gold["tags"]
    if "caption_token_ids" in gold:  # Tag2Text: beam search (3 beams, 10-30 tokens) on the predicted tags
        # The official generate() hands the decoder image-tag memory already repeated per beam,
        # transformers repeats it once more and the official attention keeps the first B * beams
        # rows: image i's beams read the memory of image [0, 0, 0, 1][i]. Rows 0 and 3 are the
        # captions of images 0 and 1 as intended; all four rows check the whole caption branch.
        rows = [0, 0, 0, 1]
        with torch.inference_mode():
            ids = model.caption_ids(None, tokens=tokens[rows], tag_logits=logits[rows])
        assert torch.equal(ids, gold["caption_token_ids"])
        assert model.decode_captions(ids) == gold["captions"]


@pytest.mark.slow  # MLflow store + pyfunc logging
def test_register_puts_an_imported_model_in_the_registry_as_a_serving_pyfunc(tmp_path, capsys):
    import mlflow
    import pandas as pd

    from orchestration.cli import main
    from ram_model.serving import IMAGE_COLUMN, encode_image
    from ram_model.tracking import mlflow_store

    model, tags = tiny_official("ram")
    torch.save({"model": export_official_state(model)}, tmp_path / "ram.pth")
    (tmp_path / "tags.txt").write_text("\n".join(tags.names), encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["import-official", str(tmp_path / "ram.pth"), "--arch", "ram", "--model", TINY["ram"],
                 "--tag-list", str(tmp_path / "tags.txt"), "--out", str(tmp_path / "m"), "--register",
                 "--tracking-uri", uri]) == 0
    registered = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["registered"]
    assert registered["name"] == "ram-official-ram" and registered["version"] == "1"
    with mlflow_store(uri):
        pyfunc = mlflow.pyfunc.load_model("models:/ram-official-ram/1")
    image = Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8))
    out = pyfunc.predict(pd.DataFrame({IMAGE_COLUMN: [encode_image(image)]}), params={"threshold": 0.0})
    assert sorted(out["tags"][0]) == sorted(tags.names)
