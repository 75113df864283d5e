"""Tag2Text generation branch: image-tag interaction encoder + causal caption decoder.

The interaction encoder (RAM's ``tag_encoder``) takes the embeddings of the conditioning tags,
prefixed by the global image token, lets them attend to each other and to all image tokens; the
caption decoder (RAM's ``text_decoder``) is a causal transformer decoder that cross-attends to the
interaction encoder's output. Training uses teacher forcing; inference decodes greedily.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


# --------------------------------------------------------------------------- official layout
# BERT layers computed and named like the released RAM / Tag2Text checkpoints (post-LN, exact
# GELU, LayerNorm eps from the config, cross-attention keys/values of their own width), used by
# ram_model.official. Within a layer the names are BERT's (``attention.self.query``,
# ``crossattention.output.LayerNorm``, ``intermediate.dense``, ``output.dense``), so the importer
# only renames the containers (``encoder.layer.N`` -> ``layers.N``). The default configs never
# build these classes: their outputs do not change.

class BertSelfAttention(nn.Module):
    """Multi-head attention with separate query / key / value projections (keys of width ``kv_dim``)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of {heads} heads")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, Lq, D], kv [B or 1, Lk, Dkv], mask additive [B or 1, 1, Lq or 1, Lk] or None -> [B, Lq, D]
        b, lq, d = x.shape
        h = self.heads
        q = self.query(x).view(b, lq, h, d // h).transpose(1, 2)  # [B, H, Lq, d]
        k = self.key(kv).view(kv.shape[0], kv.shape[1], h, d // h).transpose(1, 2)  # [B, H, Lk, d]
        v = self.value(kv).view(kv.shape[0], kv.shape[1], h, d // h).transpose(1, 2)
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, lq, d)


class BertResidualOutput(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BERT's ``*.output`` modules)."""

    def __init__(self, in_dim: int, dim: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)  # noqa: N815 - checkpoint name
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """Attention (``self``) + residual output (``output``)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.self = BertSelfAttention(dim, kv_dim, heads, dropout)
        self.output = BertResidualOutput(dim, dim, eps, dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(x, kv, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(dim, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class BertLayer(nn.Module):
    """Post-LN BERT layer: [self-attention] -> [cross-attention over ``memory``] -> FFN.

    RAM's recognition decoder (``tagging_head``) has no self-attention; the image-tag encoder and
    the caption decoder have both."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float, kv_dim: int | None,
                 self_attention: bool = True, dropout: float = 0.0):
        super().__init__()
        self.attention = BertAttention(dim, dim, heads, eps, dropout) if self_attention else None
        self.crossattention = BertAttention(dim, kv_dim, heads, eps, dropout) if kv_dim else None
        self.intermediate = BertIntermediate(dim, ffn)
        self.output = BertResidualOutput(ffn, dim, eps, dropout)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, L, D]; memory [B, M, Dkv]; masks additive (0 / large negative), broadcastable to [B, H, L, *]
        if self.attention is not None:
            x = self.attention(x, x, self_mask)
        if self.crossattention is not None:
            x = self.crossattention(x, memory, memory_mask)
        return self.output(self.intermediate(x), x)


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings -> LayerNorm (positions are computed, not stored)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)  # noqa: N815 - checkpoint name
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        pos = torch.arange(offset, offset + ids.shape[1], device=ids.device)
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None]))


MASK_NEGATIVE = -10000.0  # BERT's additive value for masked keys


def padding_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask [B, L]`` (1 = real) -> additive ``[B, 1, 1, L]``."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_NEGATIVE


class OfficialTagEncoder(nn.Module):
    """RAM / Tag2Text image-tag interaction encoder: BERT over the tag text ("[ENC] dog | grass"),
    each layer cross-attending to all image tokens."""

    def __init__(self, vocab_size: int, dim: int, heads: int, ffn: int, layers: int, kv_dim: int,
                 max_positions: int = 512, eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, dim, max_positions, eps, dropout)
        self.layers = nn.ModuleList(BertLayer(dim, heads, ffn, eps, kv_dim, True, dropout) for _ in range(layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        # ids, mask [B, L]; image_tokens [B, N, Dkv] -> [B, L, D]
        x = self.embeddings(ids)
        self_mask = padding_mask(mask, x.dtype)
        for layer in self.layers:
            x = layer(x, self_mask, image_tokens, None)
        return x


class BertLMHead(nn.Module):
    """``dense -> GELU -> LayerNorm`` then the (tied) word embeddings + a bias -> vocabulary logits."""

    def __init__(self, dim: int, vocab_size: int, eps: float):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(dim, dim)
        self.transform.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return F.linear(x, word_embeddings, self.bias)  # [B, L, V]


class OfficialCaptionDecoder(nn.Module):
    """RAM / Tag2Text caption decoder: causal BERT cross-attending to the tag encoder's output,
    LM head tied to the word embeddings."""

    def __init__(self, vocab_size: int, dim: int, heads: int, ffn: int, layers: int,
                 max_positions: int = 512, eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, dim, max_positions, eps, dropout)
        self.layers = nn.ModuleList(BertLayer(dim, heads, ffn, eps, dim, True, dropout) for _ in range(layers))
        self.lm_head = BertLMHead(dim, vocab_size, eps)

    def forward(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # ids [B, L], mask [B, L] (1 = real) -> logits [B, L, V]; memory [B, M, D]. Like the official
        # decoder, every memory position is attended (its padding included): memory_mask is unused.
        x = self.embeddings(ids)
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        keep = causal[None, None] if mask is None else causal[None, None] & mask[:, None, None, :].bool()
        self_mask = (~keep).to(x.dtype) * MASK_NEGATIVE  # [B or 1, 1, L, L]
        for layer in self.layers:
            x = layer(x, self_mask, memory, None)
        return self.lm_head(x, self.embeddings.word_embeddings.weight)

    def start_cache(self, memory: torch.Tensor) -> dict:
        """Key/value cache of incremental decoding: the memory's cross-attention keys / values
        (computed once) and the self-attention keys / values of the tokens decoded so far."""
        cross = []
        for layer in self.layers:
            a = layer.crossattention.self
            cross.append((_split_heads(a.key(memory), a.heads), _split_heads(a.value(memory), a.heads)))
        return {"length": 0, "cross": cross, "self": [None] * len(self.layers)}

    def step(self, ids: torch.Tensor, cache: dict) -> torch.Tensor:
        """Feed one token per row ``ids [R]`` -> next-token logits ``[R, V]``; ``cache`` grows.
        Same values as :meth:`forward` on the whole prefix (a token only attends to earlier ones)."""
        x = self.embeddings(ids[:, None], offset=cache["length"])  # [R, 1, D]
        for i, layer in enumerate(self.layers):
            a = layer.attention.self
            k, v = _split_heads(a.key(x), a.heads), _split_heads(a.value(x), a.heads)
            if cache["self"][i] is not None:
                k, v = torch.cat([cache["self"][i][0], k], dim=2), torch.cat([cache["self"][i][1], v], dim=2)
            cache["self"][i] = (k, v)
            x = layer.attention.output(_merge_heads(F.scaled_dot_product_attention(
                _split_heads(a.query(x), a.heads), k, v)), x)
            c = layer.crossattention.self
            ck, cv = cache["cross"][i]
            x = layer.crossattention.output(_merge_heads(F.scaled_dot_product_attention(
                _split_heads(c.query(x), c.heads), ck, cv)), x)
            x = layer.output(layer.intermediate(x), x)
        cache["length"] += 1
        return self.lm_head(x, self.embeddings.word_embeddings.weight)[:, -1]

    @staticmethod
    def reorder(cache: dict, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` (beam search: the beams each new beam continues)."""
        cache["self"] = [(k[rows], v[rows]) for k, v in cache["self"]]
        cache["cross"] = [(k[rows], v[rows]) for k, v in cache["cross"]]

    def _prefill(self, prompt: torch.Tensor, memory: torch.Tensor) -> tuple[dict, torch.Tensor]:
        cache = self.start_cache(memory)
        for t in range(prompt.shape[1]):
            logits = self.step(prompt[:, t], cache)
        return cache, logits

    @torch.no_grad()
    def greedy(self, memory: torch.Tensor, prompt: torch.Tensor, eos_id: int, pad_id: int,
               max_len: int, min_len: int = 0) -> torch.Tensor:
        """Greedy decoding after ``prompt [B, P]`` -> ids ``[B, <=max_len]`` (prompt included),
        EOS suppressed before ``min_len`` tokens, padded after EOS."""
        ids = prompt
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        cache, logits = self._prefill(prompt, memory)
        while ids.shape[1] < max_len and not bool(done.all()):
            if ids.shape[1] < min_len:
                logits[:, eos_id] = float("-inf")
            nxt = torch.where(done, torch.full_like(logits[:, 0], pad_id, dtype=torch.long), logits.argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if ids.shape[1] < max_len and not bool(done.all()):
                logits = self.step(nxt, cache)
        return ids

    @torch.no_grad()
    def beam_search(self, memory: torch.Tensor, prompt: torch.Tensor, eos_id: int, pad_id: int,
                    max_len: int, min_len: int = 0, num_beams: int = 3) -> torch.Tensor:
        """Beam search as Hugging Face ``generate`` runs it for Tag2Text (length penalty 1, no early
        stop): each step keeps the ``num_beams`` best continuations of ``2 * num_beams`` candidates;
        an EOS among the best ``num_beams`` finishes a hypothesis (score / its length); at
        ``max_len`` the running beams are hypotheses too. ``memory [B, M, D]``, ``prompt [B, P]``
        -> the best hypothesis per row ``[B, <=max_len]`` (prompt included, padded)."""
        b, nb = prompt.shape[0], num_beams
        ids = prompt.repeat_interleave(nb, dim=0)  # [B * nb, P]
        cache, logits = self._prefill(ids, memory.repeat_interleave(nb, dim=0))
        scores = torch.zeros(b, nb, device=ids.device)
        scores[:, 1:] = -1e9  # every beam starts as the same prompt: only the first one expands
        scores = scores.view(-1)
        finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(b)]
        done = [False] * b
        while True:
            length = ids.shape[1]
            logp = torch.log_softmax(logits.float(), dim=-1)  # [B * nb, V]
            if length < min_len:
                logp[:, eos_id] = float("-inf")
            vocab = logp.shape[1]
            top, flat = (logp + scores[:, None]).view(b, nb * vocab).topk(2 * nb, dim=1)  # sorted
            new_scores, new_tokens, new_rows = [], [], []
            for row in range(b):
                kept = []
                if not done[row]:
                    for rank in range(2 * nb):
                        token, beam = int(flat[row, rank]) % vocab, int(flat[row, rank]) // vocab
                        if token == eos_id:
                            if rank < nb:  # the hypothesis ends with its EOS
                                hyp = torch.cat([ids[row * nb + beam], ids.new_tensor([eos_id])])
                                _add_hypothesis(finished[row], hyp, float(top[row, rank]),
                                                length - prompt.shape[1] + 1, nb)
                            continue
                        kept.append((float(top[row, rank]), token, row * nb + beam))
                        if len(kept) == nb:
                            break
                    best_running = float(top[row].max()) / max(length - prompt.shape[1] + 1, 1)
                    done[row] = len(finished[row]) >= nb and min(s for s, _ in finished[row]) >= best_running
                if done[row] or not kept:
                    kept = [(0.0, pad_id, row * nb)] * nb
                new_scores += [k[0] for k in kept]
                new_tokens += [k[1] for k in kept]
                new_rows += [k[2] for k in kept]
            rows = torch.tensor(new_rows, device=ids.device)
            tokens = torch.tensor(new_tokens, device=ids.device)
            ids = torch.cat([ids[rows], tokens[:, None]], dim=1)
            scores = torch.tensor(new_scores, device=ids.device)
            if ids.shape[1] >= max_len or all(done):
                break
            self.reorder(cache, rows)
            logits = self.step(tokens, cache)
        out = torch.full((b, max_len), pad_id, dtype=torch.long, device=ids.device)
        for row in range(b):
            if not done[row]:
                for beam in range(nb):
                    _add_hypothesis(finished[row], ids[row * nb + beam], float(scores[row * nb + beam]),
                                    ids.shape[1] - prompt.shape[1], nb)
            best = max(finished[row], key=lambda h: h[0])[1]
            out[row, : best.shape[0]] = best
        return out[:, : max(int((out != pad_id).sum(1).max()), prompt.shape[1])]


def _add_hypothesis(hyps: list, ids: torch.Tensor, score: float, generated: int, keep: int) -> None:
    """Keep the ``keep`` best finished hypotheses, scored by log-probability / generated length."""
    hyps.append((score / max(generated, 1), ids.clone()))
    hyps.sort(key=lambda h: h[0], reverse=True)
    del hyps[keep:]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, d = x.shape
    return x.view(b, length, heads, d // heads).transpose(1, 2)  # [B, H, L, d]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)
