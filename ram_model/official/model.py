"""RAM, RAM++ and Tag2Text in the layout of their released checkpoints (``layout="official"``).

:class:`OfficialRamModel` is a :class:`ram_model.model.RamModel` (same tag-set, tagging, training
and checkpoint interface) whose parts compute what the official code computes:

* image tokens: timm Swin ``forward_features`` (final LayerNorm included), the mean token
  prepended, ``image_proj`` to 512 (RAM, RAM++) or the 1024-d Swin-B tokens as they are (Tag2Text);
* tag queries ``[B, C, 768]``: RAM ``relu(wordvec_proj(label_embed))`` over 512-d CLIP text
  embeddings; RAM++ first reweights each tag's 51 description embeddings by
  ``softmax(exp(reweight_scale) * <global image token (L2-normalised), description>)`` per image;
  Tag2Text a learned embedding per tag;
* ``tagging_head``: BERT layers with cross-attention only (4 heads, eps 1e-12), then one shared
  ``fc`` 768 -> 1 (RAM, RAM++) or Tag2Text's group-wise linear head (one weight row per tag);
* captioning (RAM, Tag2Text): ``tag_encoder`` (BERT over "[ENC] tag | tag ...", cross-attending
  to the image tokens; its first layers share their cross-attention and FFN with the tagging head)
  and ``text_decoder`` (causal BERT, LM head tied to its word embeddings).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ram_model import fast_tag  # inference without autograd: same logits, packed oneDNN path
from ram_model.backbones import create_backbone
from ram_model.generation import BertLayer, OfficialCaptionDecoder, OfficialTagEncoder
from ram_model.model import RamModel, TagDecode
from ram_model.configs import RamConfig
from ram_model.tokenizer import build_tokenizer

ARCHS = ("ram", "ram_plus", "tag2text")
CAPTION_PROMPT = "a picture of "
TAG_TEXT_LEN = 40  # the official tag encoder's input is padded / truncated to 40 tokens
REPEAT_SUFFIX = re.compile(r" \(\d+\)$")  # ram_model.official.resources.unique_names
TIED_PARTS = ("crossattention", "intermediate", "output")  # shared by tagging_head[i] and tag_encoder.layers[i]


class GroupWiseLinear(nn.Module):
    """Tag2Text's head: logit ``c`` = ``<W[0, c], x[:, c]> + b[0, c]`` (one weight row per tag)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(1, num_classes, dim))  # noqa: N815 - checkpoint name
        self.b = nn.Parameter(torch.zeros(1, num_classes))

    def forward(self, x: torch.Tensor, tag_ids: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, C, D] -> [B, C]
        w, b = (self.W[0], self.b[0]) if tag_ids is None else (self.W[0, tag_ids], self.b[0, tag_ids])
        return (w * x).sum(-1) + b


class OfficialRamModel(RamModel):
    """The official RAM / RAM++ / Tag2Text networks (see the module docstring)."""

    def __init__(self, config: RamConfig, pretrained: bool = True, tokenizer=None):
        nn.Module.__init__(self)
        c = config
        if c.official_arch not in ARCHS:
            raise ValueError(f"{c.name}: official_arch must be one of {ARCHS}, got {c.official_arch!r}")
        if c.official_arch == "ram_plus" and c.caption:
            raise ValueError(f"{c.name}: RAM++ has no caption branch (set caption=False)")
        self.config = c
        self.arch = c.official_arch
        self.visual_encoder = create_backbone(c.backbone, c.backbone_kwargs, c.backbone_weights, pretrained)
        for name, param in self.visual_encoder.named_parameters():
            if name.startswith(tuple(c.frozen_backbone)):
                param.requires_grad_(False)
        width = self.visual_encoder.num_features
        if self.arch == "tag2text":
            if c.image_dim != width or c.text_dim != c.decoder_dim:
                raise ValueError(f"{c.name}: Tag2Text needs image_dim == backbone width ({width}) and "
                                 f"text_dim == decoder_dim ({c.decoder_dim})")
            self.image_proj = nn.Identity()
            self.wordvec_proj = None
            # learned tag embeddings and head rows: sized by set_tags (the tag set is the checkpoint's)
            self.label_embed = nn.Parameter(torch.zeros(0, c.decoder_dim))
            self.fc = GroupWiseLinear(0, c.decoder_dim)
        else:
            self.image_proj = nn.Linear(width, c.image_dim)
            self.wordvec_proj = nn.Linear(c.text_dim, c.decoder_dim)
            self.register_buffer("label_embed", torch.zeros(0, c.text_dim))  # [C * descriptions, text_dim]
            self.fc = nn.Linear(c.decoder_dim, 1)
        if self.arch == "ram_plus":
            self.reweight_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.tagging_head = nn.ModuleList(
            BertLayer(c.decoder_dim, c.decoder_heads, c.decoder_ffn, c.layer_norm_eps, c.image_dim,
                      self_attention=False, dropout=c.dropout)
            for _ in range(c.decoder_layers))
        self.register_buffer("thresholds", torch.zeros(0))
        self.tag_names: list[str] = []
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(c.tokenizer, c.word_vocab_size)
        if c.caption:
            self._build_caption_branch(c)
        # parts of RamModel this layout does not have
        self.query_norm = self.token_norm = self.readout_proj = None
        self.teacher = self.distill_proj = None

    def _build_caption_branch(self, c: RamConfig) -> None:
        if c.caption_dim != c.decoder_dim or c.caption_ffn != c.decoder_ffn:
            raise ValueError(f"{c.name}: the tag encoder shares layers with the tagging head: "
                             "caption_dim / caption_ffn must equal decoder_dim / decoder_ffn")
        vocab = self.tokenizer.vocab_size
        self.tag_encoder = OfficialTagEncoder(vocab, c.caption_dim, c.caption_heads, c.caption_ffn,
                                              c.interaction_layers, c.image_dim, eps=c.layer_norm_eps,
                                              dropout=c.dropout)
        self.text_decoder = OfficialCaptionDecoder(vocab, c.caption_dim, c.caption_heads, c.caption_ffn,
                                                   c.caption_layers, eps=c.layer_norm_eps, dropout=c.dropout)
        # The official model ties the lowest layers of the image-tag encoder to the tagging head.
        for enc_layer, tag_layer in zip(self.tag_encoder.layers, self.tagging_head):
            for part in TIED_PARTS:
                setattr(enc_layer, part, getattr(tag_layer, part))

    @property
    def data_config(self) -> dict:
        """Preprocessing of the official code: bilinear resize to a square, ImageNet mean / std."""
        return {**super().data_config, "interpolation": "bilinear"}

    # ------------------------------------------------------------------ tag set
    @property
    def num_tags(self) -> int:
        return len(self.tag_names)

    @property
    def descriptions_per_tag(self) -> int:
        """Embeddings per tag in ``label_embed`` (RAM++: 51 in the released model; 1 for RAM)."""
        return self.label_embed.shape[0] // max(len(self.tag_names), 1)

    def set_tags(self, names: Sequence[str], embeddings: torch.Tensor,
                 thresholds: Sequence[float] | torch.Tensor | None = None) -> None:
        """Swap the tag set. RAM: ``embeddings [C, 512]`` (CLIP text embeddings of the names).
        RAM++: ``[C, D, 512]`` or ``[C * D, 512]`` (D descriptions per tag, D from the config).
        Tag2Text: its learned ``[C, 768]`` embeddings (a closed set: the head has a row per tag)."""
        names = list(names)
        emb = torch.as_tensor(embeddings, dtype=torch.float32)
        if emb.ndim == 3 and self.arch == "ram_plus":
            emb = emb.reshape(-1, emb.shape[-1])
        width = self.label_embed.shape[1]
        rows_ok = emb.shape[0] == len(names) or (self.arch == "ram_plus" and names and emb.shape[0] % len(names) == 0)
        if emb.ndim != 2 or emb.shape[1] != width or not rows_ok:
            per = " (x descriptions per tag)" if self.arch == "ram_plus" else ""
            raise ValueError(f"{self.config.name}: embeddings must be [{len(names)}{per}, {width}], "
                             f"got {tuple(torch.as_tensor(embeddings).shape)}")
        if self.arch != "tag2text":
            rows = emb
            super().set_tags(names, torch.zeros(len(names), self.config.text_dim), thresholds)
            self.label_embed = rows.to(self.thresholds.device)
            return
        if len(set(names)) != len(names):
            raise ValueError("tag names must be unique")
        device = self.label_embed.device
        old = dict(zip(self.tag_names, self.thresholds.tolist())) if self.tag_names else {}
        if thresholds is None:
            thresholds = [old.get(n, self.config.default_threshold) for n in names]
        if self.fc.W.shape[1] != len(names):  # a new tag set: head rows start at zero
            self.fc = GroupWiseLinear(len(names), self.config.decoder_dim).to(device)
        self.label_embed = nn.Parameter(emb.to(device))
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float32).reshape(len(names)).to(device)
        self.tag_names = names

    # ------------------------------------------------------------------ recognition
    def _queries(self, tag_ids, label_embed: torch.Tensor | None = None,
                 tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Tag queries ``[C, D]`` (RAM, Tag2Text) or ``[B, C, D]`` (RAM++: they depend on the image)."""
        table = self.label_embed if label_embed is None else label_embed.to(self.label_embed.device,
                                                                            self.label_embed.dtype)
        if self.arch == "tag2text":
            if label_embed is not None:
                raise ValueError("Tag2Text's tag embeddings are learned: it cannot score other tags")
            return table if tag_ids is None else table[tag_ids]
        if self.arch == "ram":
            emb = table if tag_ids is None else table[tag_ids]  # [C, text_dim]
            return F.relu(self.wordvec_proj(emb))
        # RAM++: the model's own table is [C * D, E]; a per-call table [C, E] (one embedding per tag,
        # e.g. RAM's open-set prompts) or [C, D, E] (descriptions)
        if label_embed is None:
            desc = table.view(len(self.tag_names), -1, table.shape[-1])  # [C, D, text_dim]
        else:
            desc = table if table.ndim == 3 else table.unsqueeze(1)
        desc = desc if tag_ids is None else desc[tag_ids]
        image = F.normalize(tokens[:, 0], dim=-1)  # [B, text_dim]; the global token (image_dim == text_dim)
        weights = torch.softmax(self.reweight_scale.exp() * torch.einsum("be,cde->bcd", image, desc), dim=-1)
        emb = torch.einsum("bcd,cde->bce", weights, desc)  # [B, C, text_dim]
        return F.relu(self.wordvec_proj(emb))

    def tag_logits(self, images: torch.Tensor, tag_ids=None, label_embed: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C]`` logits over the model's tags (or the ``tag_ids`` subset), or over a per-call
        ``label_embed``: ``[C, text_dim]`` (RAM, RAM++) or ``[C, D, text_dim]`` (RAM++ descriptions);
        the model is not changed."""
        if label_embed is not None and _same_tensor(label_embed, self.label_embed):
            label_embed = None  # the model's own table (a Tagger's default tag set)
        if label_embed is not None:
            ok = label_embed.shape[-1] == self.config.text_dim and (
                label_embed.ndim == 2 or (label_embed.ndim == 3 and self.arch == "ram_plus"))
            if not ok:
                raise ValueError(f"label_embed must be [C, {self.config.text_dim}]"
                                 f"{' or [C, D, ' + str(self.config.text_dim) + ']' if self.arch == 'ram_plus' else ''}, "
                                 f"got {tuple(label_embed.shape)}")

        if fast_tag.can_use(self, tag_ids):
            return fast_tag.fast_tag_logits(self, images, label_embed)
        tokens, _ = self.encode_image(images)
        return self._decode_tags(tokens, tag_ids, label_embed=label_embed).logits

    def _decode_tags(self, tokens: torch.Tensor, tag_ids=None, need_weights: bool = False,
                     label_embed: torch.Tensor | None = None) -> TagDecode:
        """tokens ``[B, N, image_dim]`` -> logits ``[B, C]`` (+ last-layer attention ``[B, C, N]``)."""
        if tag_ids is not None:
            tag_ids = torch.as_tensor(tag_ids, dtype=torch.long, device=tokens.device)
        queries = self._queries(tag_ids, label_embed, tokens)
        x = queries if queries.ndim == 3 else queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        weights = None
        for i, layer in enumerate(self.tagging_head):
            if need_weights and i == len(self.tagging_head) - 1:
                weights = _attention_weights(layer.crossattention.self, x, tokens)
            x = layer(x, memory=tokens)  # [B, C, D]
        logits = self.fc(x, tag_ids) if self.arch == "tag2text" else self.fc(x).squeeze(-1)
        return TagDecode(logits, weights)

    # ------------------------------------------------------------------ generation
    def tag_text(self, cond: torch.Tensor) -> list[str]:
        """Multi-hot ``[B, C]`` -> "tag | tag | ..." per row, in tag-index order (the official order)."""
        names = [REPEAT_SUFFIX.sub("", n) for n in self.tag_names]  # "perch (2)" -> "perch"
        return [" | ".join(names[i] for i in torch.nonzero(row > 0.5).flatten().tolist()) for row in cond]

    def _condition(self, tokens: torch.Tensor, cond: torch.Tensor, scores: torch.Tensor | None = None):
        """Image-tag encoder over the tag text of ``cond [B, C]`` -> (memory ``[B, 40, D]``, mask ``[B, 40]``)."""
        ids, mask = self.tokenizer.encode_tags(self.tag_text(cond), TAG_TEXT_LEN)
        ids, mask = ids.to(tokens.device), mask.to(tokens.device)
        return self.tag_encoder(ids, mask, tokens), mask

    @torch.no_grad()
    def caption(self, images: torch.Tensor, tags: Sequence[Sequence[str]] | None = None,
                max_len: int | None = None, min_len: int = 10, num_beams: int = 3) -> list[str]:
        """Captions after the prompt "a picture of " (the official defaults: beam search with 3
        beams, 10 to 30 tokens, prompt included; ``num_beams=1``: greedy), conditioned on ``tags``
        or on the tags predicted the official way (probability strictly above the class threshold)."""
        return self.decode_captions(self.caption_ids(images, tags, max_len, min_len, num_beams))

    def decode_captions(self, ids: torch.Tensor) -> list[str]:
        """Caption ids (prompt included) -> text the official way: decode everything, then cut
        as many characters as the prompt has."""
        return [text[len(CAPTION_PROMPT):] for text in self.tokenizer.decode(ids.cpu())]

    @torch.no_grad()
    def caption_ids(self, images: torch.Tensor | None, tags: Sequence[Sequence[str]] | None = None,
                    max_len: int | None = None, min_len: int = 10, num_beams: int = 3,
                    tokens: torch.Tensor | None = None, tag_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, <=max_len]`` of :meth:`caption`, prompt included (what the official
        ``text_decoder.generate`` returns). ``tokens`` (from :meth:`encode_image`) and ``tag_logits``
        skip recomputing what the caller already has (one image pass for tags and captions)."""
        if not self.config.caption:
            raise RuntimeError(f"{self.config.name} has no caption branch")
        tokens = self.encode_image(images)[0] if tokens is None else tokens
        cond = torch.zeros(tokens.shape[0], self.num_tags, device=tokens.device)
        if tags is None:
            logits = self._decode_tags(tokens).logits if tag_logits is None else tag_logits
            cond = (torch.sigmoid(logits) > self.thresholds).float()
        else:
            if len(tags) != tokens.shape[0]:
                raise ValueError("need one tag list per image")
            for i, names in enumerate(tags):
                cond[i, self.tag_index(list(names))] = 1.0
        memory, _ = self._condition(tokens, cond)
        tok = self.tokenizer
        prompt = torch.tensor([tok.prompt_ids(CAPTION_PROMPT)], device=tokens.device).expand(tokens.shape[0], -1)
        if num_beams > 1:
            return self.text_decoder.beam_search(memory, prompt, tok.eos_id, tok.pad_id, max_len or 30, min_len,
                                                 num_beams)
        return self.text_decoder.greedy(memory, prompt, tok.eos_id, tok.pad_id, max_len or 30, min_len)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.device == b.device and a.data_ptr() == b.data_ptr()


def _attention_weights(attn, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention of ``x [B, L, D]`` over ``kv [B, N, Dkv]`` -> ``[B, L, N]``."""
    b, length, d = x.shape
    h = attn.heads
    q = attn.query(x).view(b, length, h, d // h).transpose(1, 2)
    k = attn.key(kv).view(kv.shape[0], kv.shape[1], h, d // h).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1).mean(1)
