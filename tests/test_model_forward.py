"""Forward contract, shapes of every registered config, open-set tags, distillation, caption()."""

from __future__ import annotations

import pytest
import torch

from _model_helpers import TAGS, fake_embeddings, tiny_model
from ram_model.registry import MODEL_CONFIGS, count_parameters, create_model, get_config, list_models


def _batch(model, b: int, n_tags: int, captions: bool = True) -> dict:
    size = model.data_config["image_size"]
    torch.manual_seed(1)
    batch = {"image": torch.randn(b, 3, size, size), "tag_targets": (torch.rand(b, n_tags) > 0.5).float()}
    if captions:
        ids, mask = model.tokenizer.encode(["a cat under a tree.", "red sky"][:b] * b, 12)
        batch["caption_ids"], batch["caption_mask"] = ids[:b], mask[:b]
    return batch


def _check_model(model, b: int = 1) -> None:
    n = model.num_tags
    batch = _batch(model, b, n)
    out = model(batch)
    assert set(out) == {"loss", "loss_tag", "loss_caption"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    model.eval()
    with torch.no_grad():
        grid = model.encode_image(batch["image"])[1]
        assert model.tag_logits(batch["image"]).shape == (b, n)
        att = model.tag_attention(batch["image"])
        assert att.shape == (b, n, *grid)
        assert model.image_embedding(batch["image"]).shape == (b, model.config.image_dim)


def test_registry_lists_the_required_configs():
    assert {"ram_swin_l_384", "ram_swin_b_224", "ram_tiny", "ram_effnet_lite0"} <= set(list_models())
    l = MODEL_CONFIGS["ram_swin_l_384"]
    assert (l.image_size, l.image_dim, l.decoder_dim, l.decoder_layers, l.decoder_heads, l.decoder_ffn) == (
        384, 512, 768, 2, 4, 3072)
    assert get_config("ram_tiny", decoder_layers=3, mean=[0.1, 0.2, 0.3]).mean == (0.1, 0.2, 0.3)
    with pytest.raises(TypeError):
        get_config("ram_tiny", not_a_field=1)
    with pytest.raises(KeyError):
        get_config("nope")


def test_param_counts_match_official_ram_parts():
    counts = count_parameters("ram_swin_l_384")
    # official RAM checkpoint: tagging_head 13,389,312 / image_proj 786,944 / fc 769 parameters
    assert counts["part.tagging_head"] == 13_389_312
    assert counts["part.image_proj"] == 786_944
    assert counts["part.fc"] == 769
    assert count_parameters("ram_tiny")["total"] < 10_000_000


@pytest.mark.parametrize("rescale", ["ram", "none"])
def test_tiny_forward_and_loss_components(rescale):
    model = tiny_model(tag_loss_rescale=rescale)
    _check_model(model, b=2)
    model.train()
    out = model({k: v for k, v in _batch(model, 2, len(TAGS)).items() if not k.startswith("caption")})
    assert set(out) == {"loss", "loss_tag"} and torch.allclose(out["loss"], out["loss_tag"])
    out = model(_batch(model, 2, len(TAGS)))
    out["loss"].backward()
    # "ram": the tag term is rescaled to the caption loss' value; "none": plain sum
    expected = 2 * out["loss_caption"] if rescale == "ram" else out["loss_tag"] + out["loss_caption"]
    assert torch.allclose(out["loss"], expected, rtol=1e-5)
    assert model.wordvec_proj.weight.grad is not None and model.text_decoder.word_embeddings.weight.grad is not None
    with pytest.raises(ValueError):
        model({"image": torch.randn(1, 3, 96, 96), "tag_targets": torch.zeros(1, len(TAGS) + 1)})


def test_effnet_lite0_forward_with_offline_weights():
    from ram_model.backbones import effnet_lite0_package_state_dict

    model = create_model("ram_effnet_lite0", tag_names=TAGS, tag_embeddings=fake_embeddings(TAGS),
                         image_size=128)
    ref = effnet_lite0_package_state_dict()
    own = model.visual_encoder.state_dict()
    assert torch.equal(own["conv_stem.weight"], ref["conv_stem.weight"])
    assert torch.equal(own["conv_head.weight"], ref["conv_head.weight"])
    assert model.data_config["mean"] == (0.5, 0.5, 0.5)
    _check_model(model, b=1)


def test_effnet_lite0_weights_classify_imagenet_sensibly():
    """Mapped ImageNet weights recognise drawn patterns: a fine black grid on white is a screen,
    red/white concentric rings a maze or spiral (random weights give ~uniform, arbitrary outputs)."""
    import numpy as np
    import timm
    from PIL import Image, ImageDraw
    from timm.data import ImageNetInfo

    from ram_model.backbones import effnet_lite0_package_state_dict
    from ram_model.inference import preprocess

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(effnet_lite0_package_state_dict())
    grid = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(0, 224, 20):
        draw.line([(i, 0), (i, 224)], fill="black", width=3)
        draw.line([(0, i), (224, i)], fill="black", width=3)
    rings = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(rings)
    for r in range(110, 0, -12):
        draw.ellipse([112 - r, 112 - r, 112 + r, 112 + r], fill="red" if (r // 12) % 2 else "white")
    x = preprocess([grid, rings], {"image_size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    with torch.no_grad():
        probs = net(x).softmax(-1)
    info = ImageNetInfo()
    top = [[info.index_to_description(int(i)) for i in p.topk(2).indices] for p in probs]
    assert any(w in top[0][0] for w in ("window screen", "shoji", "fire screen")), top
    assert any(w in " ".join(top[1]) for w in ("maze", "coil")), top
    assert float(probs[0].max()) > 0.3 and float(probs[1].max()) > 0.3


@pytest.mark.slow  # 352M / 461M params built at random init: slow on a shared 2-core box
@pytest.mark.parametrize("name", ["ram_swin_b_224", "ram_swin_l_384"])
def test_swin_configs_forward_batch1(name):
    torch.manual_seed(0)
    model = create_model(name, pretrained=False, tag_names=TAGS, tag_embeddings=fake_embeddings(TAGS))
    _check_model(model, b=1)


def test_open_set_tag_addition_keeps_old_logits():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = model.tag_logits(x)
        model.set_tags(TAGS + ["zebra"], fake_embeddings(TAGS + ["zebra"]))
        after = model.tag_logits(x)
        subset = model.tag_logits(x, tag_ids=[5, 0])
    assert before.shape == (2, len(TAGS)) and after.shape == (2, len(TAGS) + 1)
    torch.testing.assert_close(after[:, : len(TAGS)], before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(subset, after[:, [5, 0]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model.set_tags(["a", "b"], torch.zeros(3, 384))


@pytest.mark.parametrize("flags", [
    {"query_norm": False, "token_norm": False, "query_readout": False},  # RAM's decoder as published
    {"query_norm": True, "token_norm": True, "query_readout": True},  # the small configs' decoder
])
def test_decoder_variants_score_tags_independently(flags):
    """With or without the norms and the query readout, a tag's logit depends on its own
    embedding only: adding a tag changes no other tag's logit (open set)."""
    torch.manual_seed(0)
    model = create_model("ram_tiny", tag_names=TAGS, tag_embeddings=fake_embeddings(TAGS), **flags).eval()
    assert (model.readout_proj is not None) == flags["query_readout"]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = model.tag_logits(x)
        model.set_tags(["zebra"] + TAGS, fake_embeddings(["zebra"] + TAGS))
        after = model.tag_logits(x)[:, 1:]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_frozen_backbone_prefixes_and_channels_last():
    """``frozen_backbone`` prefixes get no gradient; ``channels_last`` does not change the logits."""
    kwargs = dict(tag_names=TAGS, tag_embeddings=fake_embeddings(TAGS), image_size=64, caption=False)
    torch.manual_seed(0)
    model = create_model("ram_effnet_lite0", pretrained=False, **kwargs)
    frozen = {n for n, p in model.visual_encoder.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.visual_encoder.named_parameters() if n.startswith("blocks.2."))
    model(_batch(model, 2, len(TAGS), captions=False))["loss"].backward()
    assert all(p.grad is None for n, p in model.visual_encoder.named_parameters() if n in frozen)
    nchw = create_model("ram_effnet_lite0", pretrained=False, channels_last=False, **kwargs).eval()
    nchw.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().tag_logits(x), nchw.tag_logits(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prior", [0.02, 0.3])
def test_tag_prior_sets_the_initial_tag_probability(prior):
    """``tag_prior`` starts the shared head's bias at logit(prior): without the readout term (and
    with a zeroed fc weight) every tag of every image starts at exactly that probability."""
    torch.manual_seed(0)
    model = create_model("ram_tiny", tag_names=TAGS, tag_embeddings=fake_embeddings(TAGS), tag_prior=prior,
                         query_readout=False, caption=False).eval()
    torch.nn.init.zeros_(model.fc.weight)
    with torch.no_grad():
        probs = torch.sigmoid(model.tag_logits(torch.randn(3, 3, 96, 96)))
    torch.testing.assert_close(probs, torch.full((3, len(TAGS)), prior))
    default = create_model("ram_tiny", tag_names=TAGS, tag_embeddings=fake_embeddings(TAGS), tag_prior=None)
    assert abs(float(default.fc.bias)) < 1.0  # PyTorch's default init: U(-1/sqrt(D), 1/sqrt(D))
    with pytest.raises(ValueError, match="tag_prior"):
        create_model("ram_tiny", tag_names=TAGS, tag_embeddings=fake_embeddings(TAGS), tag_prior=1.0)


def test_set_tags_keeps_known_thresholds():
    model = tiny_model()
    model.set_tags(TAGS, fake_embeddings(TAGS), thresholds=[0.1, 0.2, 0.3, 0.4, 0.9])
    model.set_tags(["red", "new"], fake_embeddings(["red", "new"]))
    assert model.thresholds.tolist() == pytest.approx([0.9, model.config.default_threshold])


def test_distillation_loss_with_tiny_teacher():
    model = tiny_model(teacher="test_resnet", caption=False)
    batch = _batch(model, 2, len(TAGS), captions=False)
    out = model(batch)
    assert set(out) == {"loss", "loss_tag", "loss_distill"}
    out["loss"].backward()
    assert model.distill_proj.weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())  # frozen
    # precomputed teacher embeddings (no teacher module): teacher_dim in the config
    model2 = tiny_model(teacher_dim=16, caption=False)
    out2 = model2({**batch, "teacher_embedding": torch.randn(2, 16)})
    assert "loss_distill" in out2
    assert "loss_distill" not in model2(batch)  # nothing to distil from
    assert "loss_distill" not in tiny_model(caption=False)({**batch, "teacher_embedding": torch.randn(2, 16)})


def test_caption_returns_strings():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 96, 96)
    caps = model.caption(x)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    caps = model.caption(x, tags=[["cat"], ["dog", "sky"]], max_len=5)
    assert len(caps) == 2 and all(len(c.split()) <= 4 for c in caps)
    with pytest.raises(KeyError):
        model.caption(x, tags=[["unicorn"], []])


def test_parse_targets_condition_the_captioner():
    model = tiny_model().eval()
    batch = _batch(model, 2, len(TAGS))
    a = model(batch)["loss_caption"]
    b = model({**batch, "parse_targets": torch.zeros(2, len(TAGS))})["loss_caption"]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("encoder_grad", [True, False])
def test_caption_encoder_grad_decides_whether_the_caption_loss_moves_the_encoder(encoder_grad):
    model = tiny_model(caption_encoder_grad=encoder_grad).train()
    model(_batch(model, 2, len(TAGS)))["loss_caption"].backward()
    encoder = [p.grad for p in model.visual_encoder.parameters() if p.requires_grad]
    reached = any(g is not None and g.abs().sum() > 0 for g in encoder)
    assert reached == encoder_grad
    # the generation branch itself learns either way
    assert model.text_decoder.word_embeddings.weight.grad.abs().sum() > 0
