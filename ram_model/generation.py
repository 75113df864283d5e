"""Tag2Text generation branch: image-tag interaction encoder + causal caption decoder.

The interaction encoder (RAM's ``tag_encoder``) takes the embeddings of the conditioning tags,
prefixed by the global image token, lets them attend to each other and to all image tokens; the
caption decoder (RAM's ``text_decoder``) is a causal transformer decoder that cross-attends to the
interaction encoder's output. Training uses teacher forcing; inference decodes greedily.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _decoder_stack(dim: int, heads: int, ffn: int, layers: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerDecoderLayer(dim, heads, ffn, dropout=dropout, activation="gelu",
                                   batch_first=True, norm_first=True)
        for _ in range(layers)
    )


class InteractionEncoder(nn.Module):
    """``[global image token] + tag embeddings`` -> self-attn + cross-attn(image tokens) -> ``[B, 1+K, D]``."""

    def __init__(self, dim: int, heads: int, ffn: int, layers: int, dropout: float = 0.0):
        super().__init__()
        self.layers = _decoder_stack(dim, heads, ffn, layers, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tags: torch.Tensor, tag_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        # tags [B, K+1, D] (index 0 = global image token), tag_mask [B, K+1] bool (True = real),
        # image_tokens [B, N, D]
        x = tags
        pad = ~tag_mask
        for layer in self.layers:
            x = layer(x, image_tokens, tgt_key_padding_mask=pad)
        return self.norm(x)


class CaptionDecoder(nn.Module):
    """Causal transformer LM over caption tokens, cross-attending to a memory ``[B, M, D]``."""

    def __init__(self, vocab_size: int, dim: int, heads: int, ffn: int, layers: int,
                 max_len: int, dropout: float = 0.0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.embed_norm = nn.LayerNorm(dim)
        self.layers = _decoder_stack(dim, heads, ffn, layers, dropout)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=True)
        self.lm_head.weight = self.word_embeddings.weight  # tied, as in BERT/Tag2Text
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        self.max_len = max_len

    def forward(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        # ids [B, L] -> logits [B, L, V]; memory_mask [B, M] bool (True = real)
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"caption length {length} > max_caption_len {self.max_len}")
        pos = torch.arange(length, device=ids.device)
        x = self.embed_norm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=x.dtype)
        tgt_pad = None if pad_mask is None else ~pad_mask.bool()
        if tgt_pad is not None:  # float mask like `causal` (mixing bool/float masks is deprecated)
            tgt_pad = torch.zeros_like(tgt_pad, dtype=x.dtype).masked_fill(tgt_pad, float("-inf"))
        mem_pad = torch.zeros_like(memory_mask, dtype=x.dtype).masked_fill(~memory_mask, float("-inf"))
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=causal, tgt_key_padding_mask=tgt_pad,
                      memory_key_padding_mask=mem_pad, tgt_is_causal=True)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def greedy(self, memory: torch.Tensor, memory_mask: torch.Tensor, bos_id: int, eos_id: int,
               pad_id: int, max_len: int) -> torch.Tensor:
        """Greedy decoding -> ids ``[B, <=max_len]`` starting with BOS, padded after EOS."""
        batch = memory.shape[0]
        ids = torch.full((batch, 1), bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
        for _ in range(min(max_len, self.max_len) - 1):
            logits = self.forward(ids, memory, memory_mask)[:, -1]  # [B, V]
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return ids
