"""The engine's streaming pass: batched inference over samples, bounded memory.

One pass over the split's shards, ``batch_size`` images at a time:

1. resize + normalise the batch (``[B, 3, S, S]``) and tag it (``tag_logits`` -> sigmoid;
   with ``flip``, the mean of the image's and its mirror image's probabilities: :func:`tag_probs`);
2. generation: union of parsed tags, confident model tags and (optionally) tags parsed from
   the captioning branch's caption (:mod:`.tag_generation`); union tags the image scores below
   their keep threshold are flagged (``low_score``) for cleaning;
3. cleaning input: the cross-attention maps of the batch's union tags
   (``tag_attention`` -> ``[B, T, h, w]``) give one region per (image, tag) (:mod:`.regions`);
   the crops are embedded (``image_embedding`` -> ``[N, D]``) and re-scored
   (``tag_logits`` -> the tag's probability) in chunks of ``batch_size``; only the float16
   embedding, the box and the probability are kept (:class:`.cleaning.CropStore`).

Images and crops live only for their batch, so memory is the store (``P * (2D + 28)`` bytes
for ``P`` pairs) plus the per-image label lists. The clustering itself (:func:`.cleaning.
clean_tags`) runs after the pass, on the store.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ramflow_io.shards import iter_samples

from .cleaning import CropStore
from .tag_generation import GeneratedLabels, flag_low_scores, generate_labels
from .regions import attention_to_box, crop_image, to_tensor


log = logging.getLogger(__name__)

@dataclass
class Sample:
    key: str
    image: Image.Image


@dataclass
class StreamOptions:
    """The subset of :class:`EngineConfig` the streaming pass needs."""

    batch_size: int = 32
    generation: bool = True
    captioning: bool = True
    regions: bool = True            # compute crops/embeddings (needed by cleaning)
    margin: float = 0.1
    add_thresholds: np.ndarray | None = None  # [C] generation thresholds (None: thresholds + margin)
    keep_thresholds: np.ndarray | None = None  # [C] union tags scored below are flagged low_score
    attention_threshold: float = 0.5
    region_margin: float = 0.15
    max_images: int | None = None
    flip: bool = False              # tag probabilities averaged with the mirror image's


@dataclass
class StreamState:
    keys: list[str] = field(default_factory=list)
    labels: list[GeneratedLabels] = field(default_factory=list)
    store: CropStore = field(default_factory=CropStore)
    skipped: Counter = field(default_factory=Counter)
    images: int = 0
    pairs: int = 0
    seconds: float = 0.0


def iter_shard_samples(shards: Iterable[Path], skipped: Counter) -> Iterator[Sample]:
    """Decode the image of each sample in the shards (the engine uses no caption or metadata).

    Reads with the shared reader (:func:`ramflow_io.shards.iter_samples`); undecodable
    images are skipped and counted (``bad_image``).
    """
    for sample in iter_samples(shards, decode=False):
        try:
            with Image.open(io.BytesIO(sample.image)) as im:
                image = im.convert("RGB")
        except Exception as err:  # noqa: BLE001 - any decode failure is one skip reason
            log.debug("skip %s: %s", sample.key, err)
            skipped["bad_image"] += 1
            continue
        yield Sample(key=sample.key, image=image)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _attention_for(model, x: torch.Tensor, tag_ids: list[int], num_classes: int) -> tuple[np.ndarray, dict[int, int]]:
    """Attention maps ``[B, T, h, w]`` of ``tag_ids`` and a tag -> column map.

    Asks the model for just these tags; a model that ignores ``tag_ids`` and returns all
    ``C`` maps is handled by indexing the tag's own column.
    """
    ids = torch.tensor(tag_ids, dtype=torch.long, device=x.device)
    att = model.tag_attention(x, tag_ids=ids)  # [B, T, h, w] (or [B, C, h, w])
    att = att.float().cpu().numpy()
    if att.shape[1] == len(tag_ids):
        return att, {t: j for j, t in enumerate(tag_ids)}
    if att.shape[1] == num_classes:
        return att, {t: t for t in tag_ids}
    raise ValueError(f"tag_attention returned {att.shape[1]} maps for {len(tag_ids)} tags ({num_classes} classes)")


@torch.inference_mode()
def _region_pairs(model, samples: list[Sample], x: torch.Tensor, labels: list[GeneratedLabels],
                  row0: int, opts: StreamOptions, data_config: dict, num_classes: int, store: CropStore) -> int:
    """Regions, crop embeddings and crop probabilities of every (image, union tag) pair."""
    batch_tags = sorted({t for g in labels for t in g.union})
    if not batch_tags:
        return 0
    att, column = _attention_for(model, x, batch_tags, num_classes)
    size = int(data_config["image_size"])
    pairs: list[tuple[int, int, tuple[float, float, float, float]]] = []
    for i, (sample, g) in enumerate(zip(samples, labels)):
        for t in g.union:
            box = attention_to_box(att[i, column[t]], sample.image.size, opts.attention_threshold, opts.region_margin)
            pairs.append((i, t, box))
    for chunk in _batched(pairs, opts.batch_size):
        crops = [crop_image(samples[i].image, box, size) for i, _, box in chunk]
        xc = to_tensor(crops, data_config).to(x.device)          # [N, 3, S, S]
        emb = model.image_embedding(xc).float().cpu().numpy()    # [N, D]
        logits = model.tag_logits(xc).float()                    # [N, C]
        tags = torch.tensor([t for _, t, _ in chunk], dtype=torch.long, device=logits.device)
        prob = torch.sigmoid(logits.gather(1, tags[:, None]))[:, 0].cpu().numpy()  # [N]
        store.add([row0 + i for i, _, _ in chunk], tags.cpu().numpy(), emb, prob, [b for _, _, b in chunk])
    return len(pairs)


@torch.inference_mode()
def tag_probs(model, x: torch.Tensor, flip: bool = False) -> np.ndarray:
    """Tag probabilities ``[B, C]`` of a batch ``x`` (``[B, 3, S, S]``).

    ``flip``: the mean of the probabilities of each image and of its left-right mirror image, a
    test-time augmentation that costs one more forward pass. A tag's presence does not change
    under a mirror (the corpus has no left/right tags), and averaging the two views smooths a
    single view's errors, which matters most near the generation threshold.
    """
    probs = torch.sigmoid(model.tag_logits(x).float())                                  # [B, C]
    if flip:
        probs = (probs + torch.sigmoid(model.tag_logits(torch.flip(x, dims=[3])).float())) / 2
    return probs.cpu().numpy()


@torch.inference_mode()
def score_samples(model, samples: Iterable[Sample], batch_size: int,
                  device: torch.device | str = "cpu", flip: bool = False) -> tuple[list[str], np.ndarray]:
    """Keys and tag probabilities ``[N, C]`` of ``samples``, ``batch_size`` images at a time."""
    keys: list[str] = []
    probs: list[np.ndarray] = []
    for batch in _batched(samples, batch_size):
        x = to_tensor([s.image for s in batch], model.data_config).to(device)   # [B, 3, S, S]
        probs.append(tag_probs(model, x, flip))                                 # [B, C]
        keys.extend(s.key for s in batch)
    width = len(getattr(model, "tag_names", ())) if not probs else probs[0].shape[1]
    return keys, np.concatenate(probs) if probs else np.zeros((0, width), dtype=np.float32)


@torch.inference_mode()
def stream_labels(
    model,
    samples: Iterable[Sample],
    parsed: Mapping[str, Sequence[int]],
    thresholds: np.ndarray,
    opts: StreamOptions,
    caption_to_ids: Callable[[list[str]], list[list[int]]] | None = None,
    device: torch.device | str = "cpu",
    total: int | None = None,
) -> StreamState:
    """Run generation and region extraction over ``samples`` (see the module docstring).

    Samples whose key has no parsed-label row are skipped (reason ``not_in_labels``).
    """
    state = StreamState()
    data_config = model.data_config
    num_classes = len(thresholds)
    use_caption = opts.captioning and caption_to_ids is not None
    if opts.captioning and caption_to_ids is None:
        log.warning("captioning branch requested but no caption parser given: branch off")

    def known(items: Iterable[Sample]) -> Iterator[Sample]:
        n = 0
        for s in items:
            if s.key not in parsed:
                state.skipped["not_in_labels"] += 1
                continue
            if opts.max_images is not None and n >= opts.max_images:
                state.skipped["over_max_images"] += 1
                continue
            n += 1
            yield s

    add_at = opts.add_thresholds if opts.add_thresholds is not None else thresholds + opts.margin  # [C]
    start = time.perf_counter()
    bar = tqdm(total=total if opts.max_images is None else min(total or opts.max_images, opts.max_images),
               desc="engine", unit="img", disable=None)
    scored = opts.generation or opts.keep_thresholds is not None  # probabilities needed
    for batch in _batched(known(samples), opts.batch_size):
        x = to_tensor([s.image for s in batch], data_config).to(device)  # [B, 3, S, S]
        probs = tag_probs(model, x, opts.flip) if scored else None  # [B, C]
        cap_ids = None
        if use_caption:
            cap_ids = caption_to_ids(list(model.caption(x)))
        gen = generate_labels([parsed[s.key] for s in batch], probs if opts.generation else None, add_at, 0.0,
                              cap_ids, num_classes)
        if opts.keep_thresholds is not None:
            flag_low_scores(gen, probs, opts.keep_thresholds)
        if opts.regions:
            state.pairs += _region_pairs(model, batch, x, gen, len(state.keys), opts, data_config,
                                         num_classes, state.store)
        state.keys.extend(s.key for s in batch)
        state.labels.extend(gen)
        bar.update(len(batch))
    bar.close()
    state.images = len(state.keys)
    state.seconds = time.perf_counter() - start
    log.info("engine pass: %d images, %d region pairs in %.1fs (%.2f img/s), store %.1f MB",
             state.images, state.pairs, state.seconds, state.images / max(state.seconds, 1e-9),
             state.store.nbytes() / 2**20)
    return state
