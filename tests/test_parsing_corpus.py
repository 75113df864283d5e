"""Parser + label system vs the embedded corpus truth (~200 pretrain captions).

The label system is built from the parsed captions themselves (no corpus vocabulary); truth
has objects, scenes and colours, so only tags whose label is an object, a scene or a colour
are judged (actions and patterns are not in ``truth["mentioned"]``).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_engine.label_system import LabelSystemConfig, build_label_system
from data_engine.parsing import RESOURCES, ParseConfig, ParserPool

corpus = pytest.importorskip("data_engine.corpus")


@pytest.mark.slow
def test_precision_recall_on_corpus(tmp_path):
    items = list(corpus.iter_corpus(corpus.CorpusConfig(), "pretrain", 0, 200))
    captions = [it.caption for it in items]
    with ParserPool(ParseConfig(nltk_data=tmp_path / "nltk")) as pool:
        res = pool.parse_batch(captions)
    parsed = tmp_path / "parsed.parquet"
    pq.write_table(pa.table({"key": [str(i) for i in range(len(res))], "caption": captions,
                             "tags": [r.tags for r in res], "categories": [r.categories for r in res],
                             "status": [r.status for r in res]}), parsed)
    ls = build_label_system([parsed], LabelSystemConfig(min_freq=2, nltk_data=tmp_path / "nltk"),
                            tmp_path / "ls")
    colours = set(yaml.safe_load((RESOURCES / "attributes.yaml").read_text())["colour"])
    tp = fp = fn = 0
    for r, it in zip(res, items):
        pred = {n for n in ls.normalize(r.tags)
                if ls.category(ls.id_of(n)) in ("object", "scene") or n in colours}
        gold = set(it.truth["mentioned"])
        tp, fp, fn = tp + len(pred & gold), fp + len(pred - gold), fn + len(gold - pred)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, tp, fp, fn)
