"""Offline WordNet 3.0 for NLTK, built from the Debian ``wordnet-base`` files.

NLTK's corpus reader refuses ``/usr/share`` paths and expects two files Debian does not ship
(``lexnames`` and ``index.sense``). :func:`ensure_wordnet` copies the database into an
``nltk_data/corpora/wordnet`` folder (``$RAMFLOW_NLTK_DATA`` or ``~/.cache/ramflow/nltk_data``
by default), writes ``lexnames`` (the 45 lexicographer file names, in WordNet's fixed order)
and an empty ``index.sense``. It is idempotent and cheap after the first call, so callers use
it lazily; nothing is downloaded.

:func:`load_wordnet` returns a ``WordNetCorpusReader`` built on that folder (registered in
``nltk.data.path``, which NLTK's path sentinel requires).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

WORDNET_SOURCE_ENV = "RAMFLOW_WORDNET_SOURCE"
NLTK_DATA_ENV = "RAMFLOW_NLTK_DATA"
DEFAULT_SOURCE = Path("/usr/share/wordnet")

# WordNet 3.0 lexicographer files (lexnames(5WN)): number = line index; last field is the
# syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb).
LEXNAMES: tuple[tuple[str, int], ...] = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1),
    ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2),
    ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2),
    ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2), ("verb.possession", 2),
    ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
)

# Files the NLTK reader opens (data.*, index.*, *.exc); anything else in the source is ignored.
_REQUIRED = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv"))
_OPTIONAL = ("noun.exc", "verb.exc", "adj.exc", "adv.exc", "cntlist.rev", "LICENSE", "citation.bib")


def default_nltk_data() -> Path:
    """``$RAMFLOW_NLTK_DATA`` or ``~/.cache/ramflow/nltk_data``."""
    env = os.environ.get(NLTK_DATA_ENV)
    return Path(env) if env else Path.home() / ".cache" / "ramflow" / "nltk_data"


def ensure_wordnet(nltk_data: str | os.PathLike | None = None,
                   source: str | os.PathLike | None = None) -> Path:
    """Make ``<nltk_data>/corpora/wordnet`` usable by NLTK; return that folder.

    Idempotent: files already copied (same size) are kept. Raises ``FileNotFoundError`` with
    a hint when the Debian files are missing (``apt-get install wordnet-base``).
    """
    src = Path(source or os.environ.get(WORDNET_SOURCE_ENV) or DEFAULT_SOURCE)
    dst = Path(nltk_data) if nltk_data else default_nltk_data()
    dst = dst / "corpora" / "wordnet"
    missing = [name for name in _REQUIRED if not (src / name).is_file()]
    if missing and not all((dst / name).is_file() for name in _REQUIRED):
        raise FileNotFoundError(
            f"WordNet database not found in {src} (missing {missing[:3]}...); "
            "install it with `apt-get install wordnet-base` or set $" + WORDNET_SOURCE_ENV)
    dst.mkdir(parents=True, exist_ok=True)
    copied = 0
    for name in _REQUIRED + _OPTIONAL:
        s, d = src / name, dst / name
        if s.is_file() and (not d.is_file() or d.stat().st_size != s.stat().st_size):
            tmp = d.with_suffix(d.suffix + ".tmp")
            shutil.copyfile(s, tmp)
            os.replace(tmp, d)  # atomic: concurrent callers never see half a file
            copied += 1
    lexnames = "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES))
    lex_path = dst / "lexnames"
    if not lex_path.is_file() or lex_path.read_text() != lexnames:
        lex_path.write_text(lexnames)
    sense = dst / "index.sense"
    if not sense.exists():
        sense.write_text("")
    if copied:
        log.info("WordNet: copied %d files from %s to %s", copied, src, dst)
    return dst


def load_wordnet(nltk_data: str | os.PathLike | None = None):
    """A ready ``nltk.corpus.reader.WordNetCorpusReader`` (no Open Multilingual WordNet).

    NLTK's path sentinel only opens files below a folder listed in ``nltk.data.path``, so the
    nltk_data folder is appended there once (NLTK's own search list; nothing else changes).
    """
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = ensure_wordnet(nltk_data)
    data_dir = str(root.parent.parent.resolve())
    if data_dir not in nltk.data.path:
        nltk.data.path.append(data_dir)
    with warnings.catch_warnings():  # "multilingual functions are not available": expected, no OMW
        warnings.filterwarnings("ignore", message="The multilingual functions", category=UserWarning)
        return WordNetCorpusReader(str(root), None)


def multiword_nouns(nltk_data: str | os.PathLike | None = None) -> frozenset[str]:
    """All multi-word noun lemmas of WordNet (``"fire hydrant"``, ``"living room"``, ...).

    Read straight from ``index.noun`` (fast, no reader needed); the parser uses it to keep
    adjective+noun compounds such as "hot dog" together instead of splitting off "hot".
    """
    root = ensure_wordnet(nltk_data)
    out = set()
    with open(root / "index.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):  # licence header
                continue
            lemma = line.split(" ", 1)[0]
            if "_" in lemma:
                out.add(lemma.replace("_", " ").lower())
    return frozenset(out)
