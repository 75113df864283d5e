"""Imported official models in the pipeline (issue 18, points 5 and 6), on a small slice of the
embedded corpus: the data engine tags with an imported model, a training stage starts from one
(``init_from``), and open-set tags never fall back to MiniLM.

The "official" model is tiny (``ram_official_tiny``: Swin 16-d, 32-d BERT) with random weights
in the released layout, over the corpus's own tag names, imported by ``import_official``.
"""

from __future__ import annotations

import pytest
import torch

from ramflow_io import formats
from data_engine.label_system import LabelSystem
from ram_model.registry import load_model
from ram_model.official.importer import OfficialImportConfig, import_official
from ram_model.official.layout import export_official_state
from ram_model.official.resources import OfficialTagSet
from ram_model.registry import create_model
from ram_model.text_encoder import TextEncoderUnavailable


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Embedded corpus (seeded, 96 px): pretrain 24, finetune 12, test 8 images; labels = truth tags."""
    import pandas as pd

    from data_engine.corpus import CorpusConfig
    from data_engine.ingest import IngestConfig, ingest
    from ramflow_io.shards import iter_samples

    root = tmp_path_factory.mktemp("corpus")
    ingest("embedded", root, IngestConfig(shard_size=8, progress=False),
           corpus_cfg=CorpusConfig(seed=0, image_size=96, n_pretrain=24, n_finetune=12, n_test=8))
    truth = {split: {s.key: list(s.meta[formats.TRUTH_FIELD]["tags"])
                     for s in iter_samples(formats.list_shards(root, split), decode=False)}
             for split in ("pretrain", "finetune", "test")}
    names = sorted({t for split in truth.values() for tags in split.values() for t in tags})
    system = LabelSystem()
    for name in names:
        system.add(name, "object")
    system.save(formats.label_system_dir(root))
    for split, rows in truth.items():
        path = formats.labels_path(root, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"key": list(rows), "parse_label_ids": [[names.index(t) for t in tags] for tags in rows.values()]}
                     ).to_parquet(path)
    return root, names


@pytest.fixture(scope="module")
def imported(corpus, tmp_path_factory):
    """A tiny official-layout RAM over the corpus's tag names, written as a .pth and imported."""
    _, names = corpus
    out = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    model = create_model("ram_official_tiny", pretrained=False)
    model.set_tags(names, torch.nn.functional.normalize(torch.randn(len(names), model.config.text_dim), dim=-1))
    torch.save({"model": export_official_state(model)}, out / "ram_tiny.pth")
    tags = OfficialTagSet(tuple(names), (), tuple([0.5] * len(names)), ())
    _, path = import_official(OfficialImportConfig(checkpoint=out / "ram_tiny.pth", arch="ram", out=out / "model",
                                                   model_name="ram_official_tiny"), tag_set=tags)
    return path.parent


def test_engine_tags_with_an_imported_model(corpus, imported, tmp_path):
    import engine_rounds as engine

    root, names = corpus
    # captioning on: the imported caption branch writes captions that the parser reads
    cfg = engine.EngineConfig(adapt_epochs=0, batch_size=8, min_count=2, n_clusters=2, captioning=True, report_tags=2)
    out = tmp_path / "engine.parquet"
    result = engine.run_engine(imported, root, "pretrain", formats.labels_path(root, "pretrain"),
                               formats.label_system_dir(root), out, cfg, tmp_path / "report")
    assert result.images == 24 and out.exists()
    assert set(result.metrics) == {"parsed", "generated", "cleaned"}


def test_training_stage_starts_from_an_imported_model(corpus, imported, tmp_path, monkeypatch):
    from ram_model.train_stage import TrainStageConfig, train_stage

    root, names = corpus
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAMFLOW_CACHE_DIR", str(tmp_path / "cache"))
    start = load_model(imported)
    cfg = TrainStageConfig(model="ram_official_tiny", splits=["finetune"], batch_size=4, micro_batch_size=4,
                           max_steps=2, checkpoint_every=2, warmup_steps=1, lr=1e-3, num_workers=1,
                           validation_fraction=0.25, eval_batch_size=8, seed=0, init_from=str(imported),
                           caption=True,  # the imported caption branch trains too (and is saved)
                           model_overrides={"text_encoder": f"checkpoint_tags:{imported}"})
    result = train_stage(cfg, root, tmp_path / "finetuned", formats.labels_path(root, "finetune"),
                         init_from=imported)
    tuned = load_model(result.checkpoint)
    assert tuned.config.layout == "official" and tuned.tag_names == names
    assert torch.equal(tuned.label_embed, start.label_embed)  # the checkpoint's own tag embeddings
    before, after = start.state_dict(), tuned.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any(k.startswith("tagging_head.") for k in moved) and any(k.startswith("visual_encoder.") for k in moved)
    assert result.metrics["steps"] == 2 and 0.0 <= result.metrics["test/mAP"] <= 1.0


def test_open_set_on_an_official_model_needs_its_clip_encoder(imported, monkeypatch):
    """New tag names need CLIP embeddings: without the CLIP weights, a clear error, never MiniLM."""
    from ram_model.inference import Tagger

    monkeypatch.delenv("RAMFLOW_OPEN_CLIP_WEIGHTS", raising=False)
    from PIL import Image

    tagger = Tagger(load_model(imported))
    with pytest.raises(TextEncoderUnavailable, match=r"CLIP ViT-B/16.*open_clip_ram:/path.*never used instead"):
        tagger.tag([Image.new("RGB", (96, 96))], tags=["zebra crossing"])
    with pytest.raises(TextEncoderUnavailable, match="CLIP ViT-B/16"):
        create_model("ram_official_tiny", pretrained=False, tag_names=["zebra crossing"])
    with pytest.raises(TextEncoderUnavailable, match="not in the imported checkpoint: \\['zebra crossing'\\]"):
        create_model("ram_official_tiny", pretrained=False, tag_names=["zebra crossing"],
                     text_encoder=f"checkpoint_tags:{imported}")
    with pytest.raises(TextEncoderUnavailable, match="learned tag embeddings"):
        create_model("tag2text_official_tiny", pretrained=False, tag_names=["zebra crossing"])


def test_open_set_with_a_clip_encoder_scores_new_tags(imported, monkeypatch, tmp_path):
    """A CLIP encoder (here a deterministic stand-in plugged in as ``module:factory``) embeds new
    names; the model scores them per call without changing its own tag set."""
    from ram_model.inference import Tagger
    from ram_model.official.openset import OfficialTagNameEncoder, openset_prompts

    class StandInTower:
        encoder_id, dim = "stand-in-clip", 24

        def encode(self, texts):
            gen = torch.Generator().manual_seed(len(texts))
            return torch.nn.functional.normalize(torch.randn(len(texts), self.dim, generator=gen), dim=-1)

    monkeypatch.setenv("RAMFLOW_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model(imported)
    own = list(model.tag_names)
    tagger = Tagger(model, text_encoder=OfficialTagNameEncoder(StandInTower()))
    from PIL import Image

    results = tagger.tag([Image.new("RGB", (96, 96))], tags=["zebra crossing", "apple"], threshold=0.0)
    assert {t for t, _ in results[0]} == {"zebra crossing", "apple"}
    assert model.tag_names == own
    assert len(openset_prompts("apple")) == 63 and openset_prompts("apple")[8] == "This is a photo of an apple."


class StandInClip:
    """Deterministic stand-in for CLIP's text tower (hash-seeded unit vectors), plugged in by name."""

    encoder_id, dim = "stand-in-clip-24", 24

    def encode(self, texts):
        import zlib

        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1) if rows else torch.zeros(0, self.dim)


def stand_in_clip():
    return StandInClip()


def test_ram_plus_tags_from_a_description_file(tmp_path, monkeypatch):
    """RAM++ open set with descriptions (the official LLM description format): one [D, 512] table
    per tag, reweighted per image; a tag without descriptions is named in the error."""
    import json

    monkeypatch.setenv("RAMFLOW_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "descriptions.json"
    path.write_text(json.dumps([{"zebra crossing": ["white stripes on a road", "a pedestrian crossing"]},
                                {"kite": ["a kite flying in the sky", "a colourful kite on a string"]}]))
    model = create_model("ram_plus_official_tiny", pretrained=False, tag_names=["zebra crossing", "kite"],
                         tag_descriptions=str(path), text_encoder="test_official_finetune:stand_in_clip")
    assert model.label_embed.shape == (4, 24) and model.descriptions_per_tag == 2
    assert torch.equal(model.label_embed[2], StandInClip().encode(["a kite flying in the sky"])[0])
    assert model.eval().tag_logits(torch.randn(1, 3, 96, 96)).shape == (1, 2)
    with pytest.raises(KeyError, match="no descriptions for 1 tag"):
        create_model("ram_plus_official_tiny", pretrained=False, tag_names=["kite", "moon"],
                     tag_descriptions=str(path), text_encoder="test_official_finetune:stand_in_clip")
