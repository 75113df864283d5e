"""The embedded default corpus: a seeded generator of web-like image-text pairs with truth.

Scenes (beach, night, snow, meadow, street, lake, desert, room) hold procedurally drawn
objects (46 everyday classes) with colours, patterns, sizes and counts; captions are
written like web captions (synonyms, plurals, counts, actions, filler words) with
configurable omissions and hallucinations, and each item carries its truth. See
``data_engine/corpus/README.md`` and :mod:`data_engine.corpus.generate`.
"""

from data_engine.corpus.config import DEFAULT_HELD_OUT, CorpusConfig
from data_engine.corpus.generate import (
    CorpusItem,
    generate_item,
    item_key,
    iter_corpus,
    split_size,
)
from data_engine.corpus.noise import measure_noise
from data_engine.corpus.vocab import (
    COLORS,
    OBJECT_NAMES,
    SCENE_NAMES,
    surface_forms,
    vocabulary,
)

__all__ = [
    "COLORS", "DEFAULT_HELD_OUT", "OBJECT_NAMES", "SCENE_NAMES", "CorpusConfig",
    "CorpusItem", "generate_item", "item_key", "iter_corpus", "measure_noise",
    "split_size", "surface_forms", "vocabulary",
]
