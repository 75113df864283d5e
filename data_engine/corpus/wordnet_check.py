"""Check the corpus vocabulary against WordNet 3.0 (the system copy in /usr/share/wordnet).

- every synonym shares a noun synset with its canonical name (so a WordNet-based label
  system can merge them);
- no object class is a WordNet hypernym of another (in their most common senses), so a
  hierarchy-aware label system never sees one class as a kind of another.

NLTK refuses to read below /usr/share, so the files are copied into a private temporary
``nltk_data`` folder (with the ``lexnames`` and empty ``index.sense`` files that the
Debian package lacks). Run ``python -m data_engine.corpus.wordnet_check``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

from data_engine.corpus.vocab import OBJECTS, SCENES

log = logging.getLogger(__name__)

_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food "
    "noun.group noun.location noun.motive noun.object noun.person noun.phenomenon "
    "noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl"
).split()
_POS_ID = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def prepare_nltk_wordnet(source: str | Path, dest: str | Path) -> Path:
    """Copy the WordNet dict files into ``dest/corpora/wordnet``; returns ``dest``."""
    source, dest = Path(source), Path(dest)
    target = dest / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and (f.name.startswith(("data.", "index.")) or f.suffix == ".exc"):
            shutil.copyfile(f, target / f.name)
    with open(target / "lexnames", "w", encoding="ascii") as fh:
        for i, name in enumerate(_LEXNAMES):
            fh.write(f"{i:02d}\t{name}\t{_POS_ID[name.split('.')[0]]}\n")
    (target / "index.sense").touch()
    return dest


def check_vocabulary(wordnet_dir: str | Path = "/usr/share/wordnet") -> dict:
    """Synonym and hypernym checks; returns ``{"synonyms": [...], "hypernyms": [...]}``.

    ``synonyms``: one row per (canonical, synonym) with ``ok`` and the shared synsets.
    ``hypernyms``: the pairs of object classes where one's first noun sense is among the
    hypernyms (transitive, instance hypernyms included) of the other's first noun sense.
    """
    import nltk  # lazy: nltk WordNet, only this check

    with tempfile.TemporaryDirectory(prefix="ramflow_wn_") as tmp:
        data = prepare_nltk_wordnet(wordnet_dir, tmp)
        nltk.data.path.insert(0, str(data))
        try:
            from nltk.corpus.reader.wordnet import WordNetCorpusReader  # lazy: nltk WordNet, only this check

            with warnings.catch_warnings():  # "multilingual functions are not available"
                warnings.filterwarnings("ignore", message="The multilingual functions")
                wn = WordNetCorpusReader(str(data / "corpora" / "wordnet"), None)
            return _run_checks(wn)
        finally:
            nltk.data.path.remove(str(data))


def _run_checks(wn) -> dict:
    def synsets(word: str):
        return set(wn.synsets(word.replace(" ", "_"), pos="n"))

    rows = []
    for name, syns in [(o.name, [s for s, _ in o.synonyms]) for o in OBJECTS] + [
            (s.name, list(s.synonyms)) for s in SCENES]:
        for syn in syns:
            shared = sorted(s.name() for s in synsets(name) & synsets(syn))
            rows.append({"name": name, "synonym": syn, "ok": bool(shared), "shared": shared})
    first = {}
    for o in OBJECTS:
        ss = wn.synsets(o.name.replace(" ", "_"), pos="n")
        if ss:
            first[o.name] = ss[0]

    def ancestors(s):
        return set(s.closure(lambda x: x.hypernyms() + x.instance_hypernyms()))

    anc = {n: ancestors(s) for n, s in first.items()}
    hyper = [{"hypernym": a, "hyponym": b} for a in first for b in first
             if a != b and first[a] in anc[b]]
    return {"synonyms": rows, "hypernyms": hyper,
            "not_in_wordnet": sorted(o.name for o in OBJECTS if o.name not in first)}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = check_vocabulary()
    print(json.dumps(result, indent=1))
    bad = [r for r in result["synonyms"] if not r["ok"]]
    return 1 if bad or result["hypernyms"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
