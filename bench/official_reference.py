"""A plain, layer-by-layer re-implementation of the official RAM / RAM++ tag path (the baseline).

``bench/bench_official.py`` measures ramflow's tag path against this module. It follows the
structure of the official code (xinyu1205/recognize-anything, ``ram/models/swin_transformer.py``
and ``ram/models/bert.py``) operation by operation, written anew here:

* Swin: patch embedding, per block LayerNorm -> cyclic shift (``torch.roll``) -> window partition
  -> explicit attention (``q * scale @ k^T``, the relative-position bias gathered from its table on
  every forward, the shifted-window mask added through a 5-d view, softmax, ``@ v``) -> window
  reverse -> reverse shift -> residual -> MLP; patch merging by strided slices + concat; final norm
  and the mean token prepended.
* Recognition decoder (``tagging_head`` in ``mode='tagging'``): BERT layers without
  self-attention: cross-attention with separate ``query/key/value`` linears, explicit
  matmul / divide by sqrt(head dim) / additive mask from an all-ones attention mask / softmax /
  matmul, post-LN residuals with LayerNorm eps 1e-12, exact-erf GELU FFN.
* ``generate_tag``: ``relu(wordvec_proj(label_embed))`` on every call, repeated per image of the
  batch; RAM++ re-weights its 51 descriptions per tag with the global image token first.

It loads the official state dict (``{"model": ...}`` or bare) directly: the tag-path keys must all
be present, the caption branch (``tag_encoder``, ``text_decoder``) is ignored. It is also an oracle
for other weight seeds (``python bench/official_reference.py --check``).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG = logging.getLogger("official_reference")
TAG_PATH_PREFIXES = ("visual_encoder.", "image_proj.", "label_embed", "wordvec_proj.", "tagging_head.", "fc.",
                     "reweight_scale")
COMPUTED_BUFFERS = ("relative_position_index", "attn_mask", "position_ids")


@dataclass(frozen=True)
class SwinSpec:
    """Swin hyper-parameters of the official configs (``configs/swin/config_swin*_384.json``)."""

    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    heads: tuple[int, ...] = (6, 12, 24, 48)
    window: int = 12
    image_size: int = 384
    patch: int = 4


SWIN_L_384 = SwinSpec()
SWIN_B_384 = SwinSpec(embed_dim=128, heads=(4, 8, 16, 32))


# ---------------------------------------------------------------------------------------- Swin
def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, w, w, C]."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, w, w, c)


def window_reverse(windows: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """[B * nW, w, w, C] -> [B, H, W, C]."""
    b = int(windows.shape[0] / (h * wd / w / w))
    x = windows.view(b, h // w, wd // w, w, w, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, wd, -1)


def relative_position_index(w: int) -> torch.Tensor:
    """[w*w, w*w] index into the (2w-1)^2 bias table, as the official WindowAttention builds it."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # [2, w*w]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()  # [w*w, w*w, 2]
    rel[:, :, 0] += w - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    return rel.sum(-1)


def shifted_window_mask(h: int, wd: int, w: int, shift: int) -> torch.Tensor:
    """[nW, w*w, w*w] additive mask (0 / -100) of the shifted windows."""
    img = torch.zeros(1, h, wd, 1)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = window_partition(img, w).view(-1, w * w)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window, self.heads = window, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape  # [B*nW, N, C]
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B*nW, h, N, d]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B*nW, h, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = torch.softmax(attn, dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int):
        super().__init__()
        if resolution <= window:  # the official rule: one window covers the map, no shift
            window, shift = resolution, 0
        self.dim, self.resolution, self.window, self.shift = dim, resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = wd = self.resolution
        b, n, c = x.shape  # [B, H*W, C]
        shortcut = x
        x = self.norm1(x).view(b, h, wd, c)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = window_partition(x, self.window).view(-1, self.window * self.window, c)
        win = self.attn(win, self.attn_mask).view(-1, self.window, self.window, c)
        x = window_reverse(win, self.window, h, wd)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.view(b, h * wd, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, heads: int, window: int, merge: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2) for i in range(depth))
        self.downsample = PatchMerging(dim, resolution) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # [B, H*W, C]


class SwinTransformer(nn.Module):
    """Official-style Swin; ``forward`` returns ``[B, 1 + H*W, C]`` with the mean token first."""

    def __init__(self, spec: SwinSpec):
        super().__init__()
        self.patch_embed = PatchEmbed(spec.embed_dim, spec.patch)
        res = spec.image_size // spec.patch
        last = len(spec.depths) - 1
        self.layers = nn.ModuleList(
            SwinStage(spec.embed_dim * 2 ** i, res // 2 ** i, d, h, spec.window, i < last)
            for i, (d, h) in enumerate(zip(spec.depths, spec.heads)))
        self.num_features = spec.embed_dim * 2 ** last
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        cls = F.adaptive_avg_pool1d(x.transpose(1, 2), 1)  # [B, C, 1]
        return torch.cat([cls.transpose(1, 2), x], dim=1)


# ------------------------------------------------------------------------ recognition decoder
class BertCrossSelfAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.heads, self.head_dim).permute(0, 2, 1, 3)  # [B, h, L, d]

    def forward(self, hidden: torch.Tensor, enc: torch.Tensor, enc_mask: torch.Tensor) -> torch.Tensor:
        q = self._split(self.query(hidden))  # [B, h, C, d]
        k, v = self._split(self.key(enc)), self._split(self.value(enc))  # [B, h, N, d]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + enc_mask
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:-2], -1)  # [B, C, D]


class BertDenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BertSelfOutput / BertOutput)."""

    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.dense = nn.Linear(d_in, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertCrossAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.self = BertCrossSelfAttention(dim, kv_dim, heads)
        self.output = BertDenseNorm(dim, dim)

    def forward(self, hidden, enc, enc_mask):
        return self.output(self.self(hidden, enc, enc_mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(dim, ffn)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertTaggingLayer(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int, ffn: int):
        super().__init__()
        self.crossattention = BertCrossAttention(dim, kv_dim, heads)
        self.intermediate = BertIntermediate(dim, ffn)
        self.output = BertDenseNorm(ffn, dim)

    def forward(self, hidden, enc, enc_mask):
        x = self.crossattention(hidden, enc, enc_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, layers: int, dim: int, kv_dim: int, heads: int, ffn: int):
        super().__init__()
        self.layer = nn.ModuleList(BertTaggingLayer(dim, kv_dim, heads, ffn) for _ in range(layers))


class TaggingHead(nn.Module):
    """``BertModel`` in ``mode='tagging'`` (q2l config: 2 layers, 768 wide, 4 heads, FFN 3072)."""

    def __init__(self, layers: int = 2, dim: int = 768, kv_dim: int = 512, heads: int = 4, ffn: int = 3072):
        super().__init__()
        self.encoder = BertEncoder(layers, dim, kv_dim, heads, ffn)

    def forward(self, embeds: torch.Tensor, enc: torch.Tensor, enc_atts: torch.Tensor) -> torch.Tensor:
        # invert_attention_mask: [B, N] of 1/0 -> [B, 1, 1, N] additive (0 / dtype min)
        ext = (1.0 - enc_atts[:, None, None, :].to(enc.dtype)) * torch.finfo(enc.dtype).min
        x = embeds
        for layer in self.encoder.layer:
            x = layer(x, enc, ext)
        return x


class OfficialRamTagPath(nn.Module):
    """The RAM (``arch="ram"``) or RAM++ (``arch="ram_plus"``) tag path, official layout."""

    def __init__(self, arch: str = "ram", num_class: int = 4585, swin: SwinSpec = SWIN_L_384,
                 des_per_class: int = 51):
        super().__init__()
        if arch not in ("ram", "ram_plus"):
            raise ValueError(f"arch must be 'ram' or 'ram_plus', got {arch!r}")
        self.arch, self.num_class = arch, num_class
        self.visual_encoder = SwinTransformer(swin)
        self.image_proj = nn.Linear(self.visual_encoder.num_features, 512)
        rows = num_class * (des_per_class if arch == "ram_plus" else 1)
        self.label_embed = nn.Parameter(torch.zeros(rows, 512))
        if arch == "ram_plus":
            self.reweight_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.wordvec_proj = nn.Linear(512, 768)
        self.tagging_head = TaggingHead()
        self.fc = nn.Linear(768, 1)

    def _label_queries(self, image_embeds: torch.Tensor) -> torch.Tensor:
        bs = image_embeds.shape[0]
        if self.arch == "ram":
            label_embed = F.relu(self.wordvec_proj(self.label_embed))  # [C, 768]
            return label_embed.unsqueeze(0).repeat(bs, 1, 1)  # [B, C, 768]
        des = self.label_embed.shape[0] // self.num_class
        cls = image_embeds[:, 0, :]
        cls = cls / cls.norm(dim=-1, keepdim=True)
        sim = (self.reweight_scale.exp() * cls @ self.label_embed.t()).view(bs, -1, des)  # [B, C, des]
        weight = torch.softmax(sim, dim=2)
        reweighted = torch.empty(bs, self.num_class, 512, dtype=image_embeds.dtype, device=image_embeds.device)
        for i in range(bs):  # the official per-image loop
            reweighted[i] = (weight[i].unsqueeze(-1) * self.label_embed.view(-1, des, 512)).sum(dim=1)
        return F.relu(self.wordvec_proj(reweighted))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, 3, 384, 384]`` (normalised) -> tag logits ``[B, num_class]`` (before sigmoid)."""
        image_embeds = self.image_proj(self.visual_encoder(image))  # [B, 1 + N, 512]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        queries = self._label_queries(image_embeds)
        tagging = self.tagging_head(queries, image_embeds, image_atts)
        return self.fc(tagging).squeeze(-1)


def tag_path_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tag-path entries of an official state dict (``{"model": sd}`` or bare; the old
    ``vision_multi`` name of the tagging head accepted); computed buffers dropped."""
    state = state.get("model", state)
    out = {}
    for key, value in state.items():
        key = key.replace("vision_multi.", "tagging_head.", 1) if key.startswith("vision_multi.") else key
        if key.startswith(TAG_PATH_PREFIXES) and not key.endswith(COMPUTED_BUFFERS):
            out[key] = value
    return out


def load_official(path: Path | str, arch: str = "ram", swin: SwinSpec = SWIN_L_384) -> OfficialRamTagPath:
    """Build the baseline and load an official checkpoint's tag path strictly (eval mode)."""
    state = tag_path_state(torch.load(path, map_location="cpu", weights_only=True))
    rows = state["label_embed"].shape[0]
    num_class = rows if arch == "ram" else rows // 51
    model = OfficialRamTagPath(arch, num_class, swin)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"official tag path: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def golden_inputs(image_dir: Path | str, size: int = 384) -> torch.Tensor:
    """The golden README's 4 inputs ``[4, 3, size, size]``: the first two images of ``image_dir``
    in sorted order through the official transform (RGB, torchvision bilinear Resize to
    ``size x size``, ToTensor, ImageNet Normalize), then two PCG64(1) standard-normal inputs."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    files = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:2]
    if len(files) < 2:
        raise FileNotFoundError(f"{image_dir}: need at least two images")
    real = [tf(Image.open(f).convert("RGB")) for f in files]
    noise = np.random.Generator(np.random.PCG64(1)).standard_normal((2, 3, size, size), dtype=np.float32)
    return torch.cat([torch.stack(real), torch.from_numpy(noise)])


def _check(args: argparse.Namespace) -> None:
    """Compare the baseline's logits with a golden file of the official code."""
    golden = torch.load(args.golden, weights_only=True)
    model = load_official(args.weights, golden["arch"])
    images = golden_inputs(args.coco_images)
    with torch.inference_mode():
        logits = model(images)
    diff = (logits - golden["logits"]).abs().max().item()
    LOG.info("%s: max |logits - golden| = %.3g", args.golden, diff)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description="check the official-layout baseline against a golden file")
    ap.add_argument("--weights", required=True, help="official-layout checkpoint (official_weights.py output)")
    ap.add_argument("--golden", required=True)
    ap.add_argument("--coco-images", required=True, help="folder of the golden README's COCO images")
    _check(ap.parse_args())
