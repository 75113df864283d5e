"""The RAM-style model: image encoder, recognition decoder over tag queries, Tag2Text captioner.

Image path: timm backbone tokens ``[B, hw, Cb]``, the mean token prepended as a global token,
projected to ``image_dim`` (``image_proj``). Recognition: each tag query = ``relu(wordvec_proj(
label_embed[c]))`` (frozen text embedding -> trainable linear), refined by ``tagging_head`` layers
that only cross-attend to the image tokens (no self-attention among queries, so any subset of tags
can be scored independently and new tags can be added at inference), then one shared ``fc``
768->1 gives the logit of every tag. Generation: see :mod:`ram_model.generation`.

Forward contract (used by the trainer): ``model(batch) -> {"loss", "loss_tag", ["loss_caption"],
["loss_distill"]}`` with the batch keys documented in :meth:`RamModel.forward`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ram_model.backbones import backbone_tokens, create_backbone
from ram_model.generation import CaptionDecoder, InteractionEncoder
from ram_model.losses import asymmetric_loss, caption_lm_loss, combine_losses, distillation_loss
from ram_model.configs import RamConfig
from ram_model.tokenizer import build_tokenizer


class TagDecode(NamedTuple):
    """What the tagging decoder returns for image tokens."""

    logits: torch.Tensor                  # [B, C]
    attention: torch.Tensor | None        # [B, C, N] last-layer cross-attention (need_weights only)


class CrossAttentionLayer(nn.Module):
    """BERT-style post-LN layer with cross-attention + FFN only (RAM's ``tagging_head`` layer)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.crossattention = nn.MultiheadAttention(dim, heads, dropout=dropout, kdim=kv_dim, vdim=kv_dim,
                                                    batch_first=True)
        self.attention_norm = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, ffn)
        self.output = nn.Linear(ffn, dim)
        self.output_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, need_weights: bool = False):
        # queries [B, C, D], tokens [B, N, Dkv] -> ([B, C, D], attention [B, C, N] or None)
        attended, weights = self.crossattention(queries, tokens, tokens, need_weights=need_weights,
                                                average_attn_weights=True)
        x = self.attention_norm(queries + self.dropout(attended))
        x = self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))
        return x, weights


class RamModel(nn.Module):
    """RAM / Tag2Text-style tagger + captioner built from a :class:`RamConfig`."""

    def __init__(self, config: RamConfig, pretrained: bool = True, tokenizer=None):
        super().__init__()
        c = config
        self.config = c
        self.visual_encoder = create_backbone(c.backbone, c.backbone_kwargs, c.backbone_weights, pretrained)
        for name, param in self.visual_encoder.named_parameters():
            if name.startswith(tuple(c.frozen_backbone)):
                param.requires_grad_(False)
        if c.channels_last:
            self.visual_encoder.to(memory_format=torch.channels_last)
        self.image_proj = nn.Linear(self.visual_encoder.num_features, c.image_dim)
        self.wordvec_proj = nn.Linear(c.text_dim, c.decoder_dim)
        self.tagging_head = nn.ModuleList(
            CrossAttentionLayer(c.decoder_dim, c.image_dim, c.decoder_heads, c.decoder_ffn, c.dropout)
            for _ in range(c.decoder_layers)
        )
        self.fc = nn.Linear(c.decoder_dim, 1)
        if c.tag_prior is not None:
            if not 0.0 < c.tag_prior < 1.0:
                raise ValueError(f"tag_prior must be in (0, 1), got {c.tag_prior}")
            nn.init.constant_(self.fc.bias, math.log(c.tag_prior / (1.0 - c.tag_prior)))
        self.query_norm = nn.LayerNorm(c.decoder_dim) if c.query_norm else None
        self.token_norm = nn.LayerNorm(c.image_dim) if c.token_norm else None
        self.readout_proj = nn.Linear(c.decoder_dim, c.decoder_dim, bias=False) if c.query_readout else None
        # Tag set (not trained): frozen text embeddings [C, text_dim] and thresholds [C].
        self.register_buffer("label_embed", torch.zeros(0, c.text_dim))
        self.register_buffer("thresholds", torch.zeros(0))
        self.tag_names: list[str] = []
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(c.tokenizer, c.word_vocab_size)
        if c.caption:
            self.tag_input_proj = nn.Linear(c.text_dim, c.caption_dim)
            self.caption_image_proj = nn.Linear(c.image_dim, c.caption_dim)
            self.tag_encoder = InteractionEncoder(c.caption_dim, c.caption_heads, c.caption_ffn,
                                                  c.interaction_layers, c.dropout)
            self.text_decoder = CaptionDecoder(self.tokenizer.vocab_size, c.caption_dim, c.caption_heads,
                                               c.caption_ffn, c.caption_layers, c.max_caption_len, c.dropout)
        self.teacher: nn.Module | None = None
        if c.teacher is not None:
            self.teacher = create_backbone(c.teacher, None, c.teacher_weights, pretrained)
            self.teacher.requires_grad_(False).eval()
            cfg = getattr(self.teacher, "pretrained_cfg", {}) or {}
            self._teacher_mean = tuple(cfg.get("mean", c.mean))
            self._teacher_std = tuple(cfg.get("std", c.std))
        teacher_dim = self.teacher.num_features if self.teacher is not None else c.teacher_dim
        self.distill_proj = nn.Linear(c.image_dim, teacher_dim) if teacher_dim > 0 else None

    # ------------------------------------------------------------------ tag set
    @property
    def num_tags(self) -> int:
        return self.label_embed.shape[0]

    @property
    def data_config(self) -> dict:
        return {"image_size": self.config.image_size, "mean": tuple(self.config.mean), "std": tuple(self.config.std)}

    def set_tags(self, names: Sequence[str], embeddings: torch.Tensor,
                 thresholds: Sequence[float] | torch.Tensor | None = None) -> None:
        """Swap the query set (open set): ``embeddings [C, text_dim]`` of ``names``.

        Thresholds of names already known are kept, new names get ``default_threshold``
        unless ``thresholds`` is given.
        """
        names = list(names)
        emb = torch.as_tensor(embeddings, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape != (len(names), self.config.text_dim):
            raise ValueError(f"embeddings must be [{len(names)}, {self.config.text_dim}], got {tuple(emb.shape)}")
        if len(set(names)) != len(names):
            raise ValueError("tag names must be unique")
        device = self.label_embed.device
        if thresholds is None:
            old = dict(zip(self.tag_names, self.thresholds.tolist())) if self.thresholds.device.type != "meta" else {}
            thresholds = [old.get(n, self.config.default_threshold) for n in names]
        thr = torch.as_tensor(thresholds, dtype=torch.float32).reshape(len(names))
        self.label_embed = emb.to(device)
        self.thresholds = thr.to(device)
        self.tag_names = names

    def tag_index(self, names: Sequence[str]) -> list[int]:
        lookup = {n: i for i, n in enumerate(self.tag_names)}
        unknown = [n for n in names if n not in lookup]
        if unknown:
            raise KeyError(f"tags not in the model's tag set: {unknown[:10]}")
        return [lookup[n] for n in names]

    # ------------------------------------------------------------------ image side
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``images [B, 3, H, W]`` -> projected tokens ``[B, 1 + h*w, image_dim]`` (0 = global), grid."""
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        tokens, grid = backbone_tokens(self.visual_encoder, images)  # [B, hw, Cb]
        return self.project_tokens(tokens), grid

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Backbone tokens ``[B, hw, Cb]`` -> ``[B, 1 + hw, image_dim]`` with the mean token first."""
        tokens = self.image_proj(torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1))
        return tokens if self.token_norm is None else self.token_norm(tokens)

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised global image embedding ``[B, image_dim]`` (e.g. of region crops)."""
        tokens, _ = self.encode_image(images)
        return F.normalize(tokens[:, 0], dim=-1)

    # ------------------------------------------------------------------ recognition
    def _queries(self, tag_ids: torch.Tensor | Sequence[int] | None,
                 label_embed: torch.Tensor | None = None) -> torch.Tensor:
        # label_embed [C, text_dim]: a tag set passed per call (pure: the model's own set is not touched)
        table = self.label_embed if label_embed is None else label_embed.to(self.label_embed.device,
                                                                            self.label_embed.dtype)
        # tag_ids [K] (one subset for every image) or [B, K] (a subset per image)
        emb = table if tag_ids is None else table[torch.as_tensor(tag_ids, dtype=torch.long, device=table.device)]
        queries = F.relu(self.wordvec_proj(emb))  # [C, decoder_dim] or [B, K, decoder_dim]
        return queries if self.query_norm is None else self.query_norm(queries)

    def _decode_tags(self, tokens: torch.Tensor, tag_ids=None, need_weights: bool = False,
                     label_embed: torch.Tensor | None = None) -> TagDecode:
        """tokens ``[B, N, image_dim]`` -> logits ``[B, C]`` (+ last-layer attention ``[B, C, N]``).

        ``tag_ids``: ``[K]`` scores that subset for every image, ``[B, K]`` a subset per image."""
        queries = self._queries(tag_ids, label_embed)
        x = queries if queries.ndim == 3 else queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [B, K, D]
        weights = None
        for i, layer in enumerate(self.tagging_head):
            last = i == len(self.tagging_head) - 1
            x, w = layer(x, tokens, need_weights=need_weights and last)
            weights = w if last else weights
        logits = self.fc(x).squeeze(-1)  # [B, C]
        if self.readout_proj is not None:  # query-conditioned readout (open set: W is shared)
            logits = logits + (x * self.readout_proj(queries)).sum(-1) / x.shape[-1] ** 0.5
        return TagDecode(logits, weights)

    def tag_logits(self, images: torch.Tensor, tag_ids=None, label_embed: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C]`` logits over the current tag set (or the ``tag_ids`` subset).

        ``label_embed [C, text_dim]``: score these tag embeddings instead of the model's tag set,
        without changing it (safe when several threads tag with different custom sets)."""
        if label_embed is not None and (label_embed.ndim != 2 or label_embed.shape[1] != self.config.text_dim):
            raise ValueError(f"label_embed must be [C, {self.config.text_dim}], got {tuple(label_embed.shape)}")
        tokens, _ = self.encode_image(images)
        return self._decode_tags(tokens, tag_ids, label_embed=label_embed).logits

    def tag_attention(self, images: torch.Tensor, tag_ids=None) -> torch.Tensor:
        """Cross-attention of each tag query over the token grid ``[B, C, h, w]`` (last decoder
        layer, averaged over heads; the global token's share is dropped)."""
        tokens, (h, w) = self.encode_image(images)
        _, weights = self._decode_tags(tokens, tag_ids, need_weights=True)  # [B, C, 1 + hw]
        return weights[:, :, 1:].reshape(weights.shape[0], weights.shape[1], h, w)

    # ------------------------------------------------------------------ generation
    def _condition(self, tokens: torch.Tensor, cond: torch.Tensor, scores: torch.Tensor | None = None):
        """Interaction-encoder output for the tags set in ``cond [B, C]`` -> (memory, mask)."""
        c = self.config
        batch = tokens.shape[0]
        k = min(c.max_condition_tags, cond.shape[1])
        present = cond > 0.5
        if k > 0:
            # rank present tags: by score if given, randomly in training, by index otherwise
            if scores is not None:
                rank = scores.float().clamp(0, 1)
            elif self.training:
                rank = torch.rand(cond.shape, device=cond.device)
            else:
                rank = torch.linspace(1, 0, cond.shape[1], device=cond.device).expand_as(cond)
            vals, idx = torch.where(present, rank + 1.0, torch.zeros_like(rank)).topk(k, dim=1)  # [B, K]
            tag_mask = vals > 0
            tag_emb = self.tag_input_proj(self.label_embed)[idx]  # [B, K, Dc]
        else:
            tag_mask = torch.zeros(batch, 0, dtype=torch.bool, device=tokens.device)
            tag_emb = tokens.new_zeros(batch, 0, c.caption_dim)
        image = self.caption_image_proj(tokens)  # [B, N, Dc]
        seq = torch.cat([image[:, :1], tag_emb], dim=1)  # [B, 1+K, Dc]
        mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=tokens.device), tag_mask], dim=1)
        return self.tag_encoder(seq, mask, image), mask

    @torch.no_grad()
    def caption(self, images: torch.Tensor, tags: Sequence[Sequence[str]] | None = None,
                max_len: int | None = None) -> list[str]:
        """Greedy captions, conditioned on ``tags`` (names per image) or on the predicted tags."""
        if not self.config.caption:
            raise RuntimeError(f"{self.config.name} was built with caption=False")
        tokens, _ = self.encode_image(images)
        scores = None
        if tags is None:
            scores = torch.sigmoid(self._decode_tags(tokens).logits)  # [B, C]
            cond = (scores >= self.thresholds).float()
        else:
            if len(tags) != images.shape[0]:
                raise ValueError("need one tag list per image")
            cond = torch.zeros(images.shape[0], self.num_tags, device=tokens.device)
            for i, names in enumerate(tags):
                cond[i, self.tag_index(list(names))] = 1.0
        memory, mask = self._condition(tokens, cond, scores)
        tok = self.tokenizer
        ids = self.text_decoder.greedy(memory, mask, tok.bos_id, tok.eos_id, tok.pad_id,
                                       max_len or self.config.max_caption_len)
        return tok.decode(ids.cpu())

    # ------------------------------------------------------------------ training
    def teacher_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen teacher's pooled embedding ``[B, teacher_dim]`` (images re-normalised for it)."""
        if self.teacher is None:
            raise RuntimeError("no teacher configured")
        mean = torch.tensor(self.config.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.std, device=images.device).view(1, -1, 1, 1)
        t_mean = torch.tensor(self._teacher_mean, device=images.device).view(1, -1, 1, 1)
        t_std = torch.tensor(self._teacher_std, device=images.device).view(1, -1, 1, 1)
        with torch.no_grad():
            self.teacher.eval()
            return self.teacher((images * std + mean - t_mean) / t_std)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of one batch.

        batch: ``image [B, 3, H, W]`` (normalised), ``tag_targets [B, C]`` multi-hot over the
        current tag set; optional ``caption_ids``/``caption_mask [B, L]`` (caption loss, when the
        branch is enabled), ``parse_targets [B, C]`` (tags conditioning the captioner, default
        ``tag_targets``), ``teacher_embedding [B, Dt]`` (else the configured teacher computes it),
        ``reject_negatives`` (float: fraction of negative labels with the largest tag loss left out),
        ``complete_labels [B]`` (bool: rows whose labels are complete, never left out),
        ``tag_ids [K]`` or ``[B, K]`` (train only these queries: ``tag_targets`` is then ``[B, K]``
        over them) with ``tag_weights [B, K]`` (per-entry loss weights; see
        :mod:`ram_model.query_sampling`).
        Returns scalar ``loss`` plus ``loss_tag`` / ``loss_caption`` / ``loss_distill`` when computed.
        """
        c = self.config
        images, targets = batch["image"], batch["tag_targets"]
        tag_ids = batch.get("tag_ids")
        width = self.num_tags if tag_ids is None else tag_ids.shape[-1]
        if targets.ndim != 2 or targets.shape[1] != width:
            raise ValueError(f"tag_targets must be [B, {width}], got {tuple(targets.shape)}")
        tokens, _ = self.encode_image(images)
        logits, _ = self._decode_tags(tokens, tag_ids)  # [B, C] or [B, K]
        reject = float(batch.get("reject_negatives", 0.0))
        out = {"loss_tag": asymmetric_loss(logits, targets, c.gamma_neg, c.gamma_pos, c.asl_clip, c.asl_eps,
                                           c.asl_reduction, reject_negatives=reject,
                                           complete_rows=batch.get("complete_labels"),
                                           weights=batch.get("tag_weights"))}
        loss_caption = loss_distill = None
        if c.caption and batch.get("caption_ids") is not None:
            ids = batch["caption_ids"]
            mask = batch.get("caption_mask")
            mask = (ids != self.tokenizer.pad_id).long() if mask is None else mask
            cond = batch.get("parse_targets")
            if cond is None and tag_ids is not None:
                raise ValueError("a batch with tag_ids needs parse_targets [B, C] to condition the captioner")
            caption_tokens = tokens if c.caption_encoder_grad else tokens.detach()  # [B, N, image_dim]
            memory, mem_mask = self._condition(caption_tokens, targets if cond is None else cond)
            lm_logits = self.text_decoder(ids[:, :-1], memory, mem_mask, mask[:, :-1])  # [B, L-1, V]
            loss_caption = out["loss_caption"] = caption_lm_loss(lm_logits, ids[:, 1:], mask[:, 1:])
        if self.distill_proj is not None:
            teacher = batch.get("teacher_embedding")
            if teacher is None and self.teacher is not None:
                teacher = self.teacher_embedding(images)
            if teacher is not None:
                loss_distill = out["loss_distill"] = distillation_loss(self.distill_proj(tokens[:, 0]), teacher)
        out["loss"] = combine_losses(out["loss_tag"], loss_caption, loss_distill, c.tag_loss_weight,
                                     c.caption_loss_weight, c.distill_loss_weight, c.tag_loss_rescale)
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays frozen (BN statistics included)
        return self
