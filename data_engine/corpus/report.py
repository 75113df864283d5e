"""Corpus stage report: vocabulary, measured noise per split and contact sheets, on disk.

The corpus itself is never materialised here (ingestion streams it with ``iter_corpus``);
this stage records what the generator produces under a config, so a run can be audited.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from data_engine.corpus.config import CorpusConfig
from data_engine.corpus.contact_sheet import classes_sheet, items_sheet
from data_engine.corpus.generate import iter_corpus, split_size
from data_engine.corpus.noise import measure_noise
from data_engine.corpus.vocab import vocabulary
from ramflow_io.formats import SPLITS

log = logging.getLogger(__name__)


def corpus_report(cfg: CorpusConfig, out_dir: str | Path, n_measure: int = 500,
                  sheets: bool = True) -> dict:
    """Write ``vocabulary.json``, ``report.json`` (+ PNG sheets) under ``out_dir``.

    Noise is measured on the first ``n_measure`` items of each split (generation is
    per-item, so this is a fair sample). Returns the report dict.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    (out / "vocabulary.json").write_text(json.dumps(vocab, indent=1))
    report: dict = {"config": cfg.model_dump(), "sizes": {}, "noise": {},
                    "n_tags": {c: sum(v["category"] == c for v in vocab)
                               for c in ("object", "scene", "attribute")}}
    for split in SPLITS:
        n = min(n_measure, split_size(cfg, split))
        report["sizes"][split] = split_size(cfg, split)
        truths = (it.truth for it in tqdm(iter_corpus(cfg, split, 0, n), total=n,
                                          desc=f"measure {split}", leave=False))
        report["noise"][split] = measure_noise(truths)
        log.info("%s: %s", split, report["noise"][split])
    if sheets:
        items_sheet(cfg, "pretrain", out / "pretrain_items.png", n=24)
        classes_sheet(out / "classes.png", size=cfg.image_size)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
