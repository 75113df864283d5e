"""Inference-only fast tag path (image -> tag logits) of the official-layout RAM models.

Same math as :meth:`OfficialRamModel.tag_logits` (timm Swin -> mean token + ``image_proj`` ->
BERT cross-attention tagging head -> ``fc``), computed with fewer passes over memory:

* Linear layers run through oneDNN with weights packed once (``mkldnn._reorder_linear_weight``),
  GELU fused into ``fc1`` / ``intermediate`` and the residual add fused into ``fc2`` / ``output``
  (oneDNN post-ops). On this 2-core AMD CPU oneDNN's packed fp32 GEMM beats the MKL ``addmm`` that
  ``nn.Linear`` calls (``bench/bench_official.py``). Elsewhere (CUDA, no oneDNN) plain
  ``F.linear`` is used.
* Swin windows: the cyclic shift and the window partition are one gather with a precomputed token
  permutation; attention is fused SDPA with the relative-position bias and the shifted-window mask
  combined once into a cached ``[nW, heads, N, N]`` additive mask.
* Tag queries: ``relu(wordvec_proj(label_embed))`` and the first layer's query projection do not
  depend on the image: computed once per tag set (cached), never repeated per image.

Weights are read once when the path is built (:func:`fast_tag_path`); the cache key includes each
parameter's version counter, so training steps or ``load_state_dict`` rebuild it. Used only in
eval mode without autograd (see :func:`can_use`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _onednn_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and dtype in (torch.float32, torch.bfloat16))


class PackedLinear:
    """A Linear's weight prepacked for oneDNN (or kept as is), with optional fused GELU / residual add."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, onednn: bool):
        w = linear.weight.detach().to(dtype)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.onednn = onednn
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, None) if onednn else w

    def __call__(self, x: torch.Tensor, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.onednn:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu" if gelu else "none",
                                                      [], "none" if gelu else "")
        y = F.linear(x, self.weight, self.bias)
        if gelu:
            y = F.gelu(y)
        return y if residual is None else y.add_(residual)


def _norm(ln: nn.LayerNorm, dtype: torch.dtype):
    w, b = ln.weight.detach().to(dtype), ln.bias.detach().to(dtype)
    return lambda x: F.layer_norm(x, w.shape, w, b, ln.eps)


def window_permutation(res: int, window: int, shift: int) -> torch.Tensor:
    """Raster index of the token at each position of the shifted window partition ``[res * res]``
    (``torch.roll`` by ``-shift`` then window partition, as one gather)."""
    r = torch.arange(res)
    rows = (r.view(res // window, 1, window, 1) + shift) % res  # [nWh, 1, w, 1]
    cols = (r.view(1, res // window, 1, window) + shift) % res  # [1, nWw, 1, w]
    return (rows * res + cols).reshape(-1)  # window-major, then row, col inside the window


@dataclass
class _Block:
    norm1: object
    qkv: PackedLinear
    proj: PackedLinear
    norm2: object
    fc1: PackedLinear
    fc2: PackedLinear
    heads: int
    window: int
    perm: torch.Tensor | None  # [HW] raster index per window-ordered token (None: one window, no shift)
    inv: torch.Tensor | None
    mask: torch.Tensor  # additive [nW or 1, heads, N, N]


class FastSwin:
    """timm ``SwinTransformer`` (square input, window attention) as a fast inference function."""

    def __init__(self, swin: nn.Module, dtype: torch.dtype, onednn: bool):
        self.patch_embed = swin.patch_embed
        self.dtype = dtype
        self.stages = []
        for stage in swin.layers:
            down = stage.downsample
            merge = None
            if not isinstance(down, nn.Identity) and down is not None:
                merge = (_norm(down.norm, dtype), PackedLinear(down.reduction, dtype, onednn))
            blocks = []
            for blk in stage.blocks:
                res = blk.input_resolution[0] if hasattr(blk, "input_resolution") else None
                blocks.append(self._block(blk, res, dtype, onednn))
            self.stages.append((merge, blocks))
        self.norm = _norm(swin.norm, dtype)

    @staticmethod
    def _block(blk: nn.Module, res: int, dtype: torch.dtype, onednn: bool) -> _Block:
        attn = blk.attn
        window = blk.window_size[0] if isinstance(blk.window_size, (tuple, list)) else blk.window_size
        shift = blk.shift_size[0] if isinstance(blk.shift_size, (tuple, list)) else blk.shift_size
        n = window * window
        bias = attn.relative_position_bias_table.detach()[attn.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # [1, h, N, N]
        mask = getattr(blk, "attn_mask", None)
        if shift and mask is not None:
            bias = bias + mask.detach().unsqueeze(1)  # [nW, h, N, N]
        one_window = res == window and not shift
        perm = None if one_window else window_permutation(res, window, shift)
        return _Block(_norm(blk.norm1, dtype), PackedLinear(attn.qkv, dtype, onednn),
                      PackedLinear(attn.proj, dtype, onednn), _norm(blk.norm2, dtype),
                      PackedLinear(blk.mlp.fc1, dtype, onednn), PackedLinear(blk.mlp.fc2, dtype, onednn),
                      attn.num_heads, window, perm, None if perm is None else torch.argsort(perm),
                      bias.to(dtype).contiguous())

    @staticmethod
    def _run_block(b: _Block, x: torch.Tensor) -> torch.Tensor:
        bsz, hw, c = x.shape  # [B, HW, C] raster order
        n = b.window * b.window
        y = b.norm1(x)
        if b.perm is not None:
            y = y[:, b.perm]  # [B, nW * N, C] shifted windows
        nw = hw // n
        qkv = b.qkv(y).view(bsz, nw, n, 3, b.heads, c // b.heads).permute(3, 0, 1, 4, 2, 5)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=b.mask)  # [B, nW, h, N, d]
        out = out.permute(0, 1, 3, 2, 4).reshape(bsz, hw, c)
        if b.perm is not None:
            out = out[:, b.inv]  # back to raster order (the projection is per token: order commutes)
        x = b.proj(out, residual=x)
        return b.fc2(b.fc1(b.norm2(x), gelu=True), residual=x)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> final-norm tokens ``[B, hw, C]``."""
        x = self.patch_embed(images)  # [B, H, W, C] (timm NHWC)
        bsz, h, w, c = x.shape
        x = x.to(self.dtype).reshape(bsz, h * w, c)
        for merge, blocks in self.stages:
            if merge is not None:
                x = x.view(bsz, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(bsz, -1, 4 * c)
                h, w = h // 2, w // 2
                x = merge[1](merge[0](x))
                c = x.shape[-1]
            for blk in blocks:
                x = self._run_block(blk, x)
        return self.norm(x)


class _QueryCache(NamedTuple):
    label_embed: torch.Tensor   # the tag set's embeddings themselves (identity is the key)
    version: int                # their in-place version counter when cached
    queries: torch.Tensor       # [C, D] relu(wordvec_proj(label_embed))
    first_q: torch.Tensor       # [C, D] the first layer's query projection of them


class FastTagHead:
    """RAM tagging head (cross-attention-only BERT layers + shared ``fc``) with cached queries."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, onednn: bool):
        self.dtype, self.onednn = dtype, onednn
        self.image_proj = PackedLinear(model.image_proj, dtype, onednn)
        self.wordvec_proj = model.wordvec_proj
        self.layers = []
        for layer in model.tagging_head:
            att = layer.crossattention
            self.layers.append(dict(
                heads=att.self.heads, query=PackedLinear(att.self.query, dtype, onednn),
                key=PackedLinear(att.self.key, dtype, onednn), value=PackedLinear(att.self.value, dtype, onednn),
                dense=PackedLinear(att.output.dense, dtype, onednn), norm1=_norm(att.output.LayerNorm, dtype),
                ffn1=PackedLinear(layer.intermediate.dense, dtype, onednn),
                ffn2=PackedLinear(layer.output.dense, dtype, onednn), norm2=_norm(layer.output.LayerNorm, dtype)))
        self.fc_w = model.fc.weight.detach().to(dtype).reshape(-1)  # [D]
        self.fc_b = model.fc.bias.detach().to(dtype)
        # Holding the tensor keeps its memory from being reused by another tag set, so identity +
        # version is a safe key.
        self._queries: _QueryCache | None = None

    def queries(self, label_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``relu(wordvec_proj(label_embed))`` and its first-layer query projection, cached per tag set.
        The cache is read and replaced as one object, so concurrent calls with different tag sets
        never mix one set's queries into another's answer."""
        cached = self._queries
        if cached is None or cached.label_embed is not label_embed or cached.version != label_embed._version:
            x0 = F.relu(self.wordvec_proj(label_embed.detach().float())).to(self.dtype)  # [C, D]
            cached = _QueryCache(label_embed, label_embed._version, x0, self.layers[0]["query"](x0))
            self._queries = cached
        return cached.queries, cached.first_q

    def __call__(self, tokens: torch.Tensor, label_embed: torch.Tensor) -> torch.Tensor:
        """Final Swin tokens ``[B, hw, Cb]`` -> logits ``[B, C]`` (fp32)."""
        bsz = tokens.shape[0]
        tokens = self.image_proj(torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1))  # [B, 1 + hw, 512]
        x, q = self.queries(label_embed)
        c, d = x.shape
        x = x.unsqueeze(0).expand(bsz, c, d)
        for i, p in enumerate(self.layers):
            h = p["heads"]
            if i:
                q = p["query"](x)
            q = q.reshape(-1, c, h, d // h).transpose(1, 2).expand(bsz, h, c, d // h)  # [B, h, C, dh]
            k = p["key"](tokens).view(bsz, -1, h, d // h).transpose(1, 2)  # [B, h, N, dh]
            v = p["value"](tokens).view(bsz, -1, h, d // h).transpose(1, 2)
            att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bsz, c, d)
            x = p["norm1"](p["dense"](att, residual=x.contiguous()))
            x = p["norm2"](p["ffn2"](p["ffn1"](x, gelu=True), residual=x))
        return (x @ self.fc_w + self.fc_b).float()


class FastTagPath:
    """Swin + tagging head of one model, at one dtype; rebuilt when the model's weights change."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        device = next(model.parameters()).device
        onednn = _onednn_ok(device, dtype)
        self.dtype = dtype
        self.swin = FastSwin(model.visual_encoder, dtype, onednn)
        self.head = FastTagHead(model, dtype, onednn)
        self.version = weights_version(model)

    def __call__(self, images: torch.Tensor, label_embed: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.swin(images), label_embed)


def weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or updated in place."""
    return tuple((id(t), t._version) for t in list(model.parameters()) + list(model.buffers()))


def can_use(model: nn.Module, tag_ids=None) -> bool:
    """The fast path covers RAM (official layout, timm Swin, fc head) in eval mode without autograd,
    over a whole tag set (no ``tag_ids`` subset)."""
    return (not model.training and not torch.is_grad_enabled() and tag_ids is None
            and getattr(model, "arch", None) == "ram" and hasattr(model.visual_encoder, "layers")
            and getattr(model, "query_norm", None) is None)


def fast_tag_logits(model: nn.Module, images: torch.Tensor, label_embed: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tag logits ``[B, C]`` of ``model`` through a :class:`FastTagPath` cached on the model."""
    cache = model.__dict__.setdefault("_fast_tag_paths", {})
    path = cache.get(dtype)
    if path is None or path.version != weights_version(model):
        path = cache[dtype] = FastTagPath(model, dtype)
        log.debug("built the fast tag path (%s)", dtype)
    return path(images.to(next(model.parameters()).dtype), model.label_embed if label_embed is None else label_embed)
