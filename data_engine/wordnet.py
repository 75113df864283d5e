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

import json
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
    import nltk.data  # lazy: nltk WordNet, only when building labels
    from nltk.corpus.reader.wordnet import WordNetCorpusReader  # lazy: nltk WordNet, only when building labels

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


# --------------------------------------------------------------------------- parser lexicon

LEXICON_VERSION = 1
LEXICON_FILE = "ramflow_parser_lexicon.json"
_POS_FILES = {"n": "noun", "v": "verb", "a": "adj"}
# WordNet's detachment rules (morphy(7WN)), tried once on a form that is not an exception.
_DETACH = {
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
          ("shes", "sh"), ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
          ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
}
_LEX_PERSON, _LEX_ANIMAL = 18, 5  # noun.person, noun.animal in LEXNAMES


class Lexicon:
    """The slice of WordNet the caption parser needs, without NLTK's corpus reader.

    NLTK's reader takes seconds and hundreds of MiB to load; the parser only asks a few
    questions, answered here from plain sets built once from the WordNet files and cached as
    JSON next to them (:func:`load_lexicon`):

    * :meth:`morphy`: base forms of a word (the exception lists, then one pass of WordNet's
      detachment rules; same answers as NLTK's ``_morphy``);
    * :meth:`verb_count`: tagged-sense frequency of a verb lemma (``cntlist.rev``);
    * :attr:`multiword`: multi-word noun lemmas; :attr:`joinable`: those whose first sense is
      not a kind of their head noun ("hot dog" is no dog, "young man" is a man);
    * :attr:`person` / :attr:`animal` / :attr:`toy`: nouns whose first sense is a person, an
      animal, or a plaything (context rules: "a baby elephant", "a teddy bear and a baby doll").
    """

    def __init__(self, data: dict):
        self.lemmas = {pos: frozenset(data["lemmas"][pos]) for pos in _POS_FILES}
        self.exceptions = {pos: data["exceptions"][pos] for pos in _POS_FILES}
        self.verb_counts: dict[str, int] = data["verb_counts"]
        self.multiword = frozenset(data["multiword"])
        self.joinable = frozenset(data["joinable"])
        self.person = frozenset(data["person"])
        self.animal = frozenset(data["animal"])
        self.toy = frozenset(data["toy"])

    def morphy(self, form: str, pos: str) -> list[str]:
        """WordNet base forms of ``form`` (lower case) for ``pos`` in n / v / a, in order."""
        known = self.lemmas[pos]
        exc = self.exceptions[pos].get(form)
        if exc is not None:
            candidates = [form, *exc]
        else:
            candidates = [form] + [form[: -len(old)] + new for old, new in _DETACH[pos]
                                   if form.endswith(old)]
        out: list[str] = []
        for c in candidates:
            if c in known and c not in out:
                out.append(c)
        return out

    def verb_count(self, lemma: str) -> int:
        return self.verb_counts.get(lemma, 0)


def _read_index(path: Path) -> dict[str, list[str]]:
    """``lemma -> synset offsets`` of one ``index.<pos>`` file (lemmas with ``_`` as in WordNet)."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):
                continue
            parts = line.split()
            n_ptr = int(parts[3])
            n_syn = int(parts[2])
            out[parts[0]] = parts[6 + n_ptr:6 + n_ptr + n_syn]  # after lemma pos cnt p_cnt ptrs sense tagsense
    return out


def _read_noun_data(path: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """``offset -> hypernym offsets`` (``@`` and ``@i``) and ``offset -> lexicographer file``."""
    hyper: dict[str, list[str]] = {}
    lexfile: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):
                continue
            parts = line.split(" | ", 1)[0].split()
            offset, n_words = parts[0], int(parts[3], 16)
            lexfile[offset] = int(parts[1])
            k = 4 + 2 * n_words
            n_ptr = int(parts[k])
            ptrs = parts[k + 1:k + 1 + 4 * n_ptr]
            hyper[offset] = [ptrs[j + 1] for j in range(0, len(ptrs), 4)
                             if ptrs[j] in ("@", "@i") and ptrs[j + 2] == "n"]
    return hyper, lexfile


def build_lexicon(root: Path) -> dict:
    """Read the WordNet files in ``root`` into :class:`Lexicon`'s JSON-able data (~2 s)."""
    index = {pos: _read_index(root / f"index.{name}") for pos, name in _POS_FILES.items()}
    exceptions: dict[str, dict[str, list[str]]] = {}
    for pos, name in _POS_FILES.items():
        exc: dict[str, list[str]] = {}
        path = root / f"{name}.exc"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                terms = line.split()
                if terms:
                    exc[terms[0]] = terms[1:]
        exceptions[pos] = exc
    verb_counts: dict[str, int] = {}
    cnt = root / "cntlist.rev"
    if cnt.is_file():
        for line in cnt.read_text(encoding="utf-8").splitlines():
            key, _, count = line.split(" ")
            lemma, _, sense = key.partition("%")
            if sense.startswith("2:"):
                verb_counts[lemma] = verb_counts.get(lemma, 0) + int(count)
    hyper, lexfile = _read_noun_data(root / "data.noun")
    ancestors: dict[str, frozenset[str]] = {}

    def above(offset: str) -> frozenset[str]:  # proper ancestors (iterative: no deep recursion)
        if offset in ancestors:
            return ancestors[offset]
        out: set[str] = set()
        stack = list(hyper.get(offset, ()))
        while stack:
            o = stack.pop()
            if o not in out:
                out.add(o)
                stack.extend(hyper.get(o, ()))
        ancestors[offset] = frozenset(out)
        return ancestors[offset]

    lexicon_n = Lexicon({"lemmas": {p: index[p] for p in _POS_FILES}, "exceptions": exceptions,
                         "verb_counts": {}, "multiword": [], "joinable": [], "person": [],
                         "animal": [], "toy": []})
    noun_index = index["n"]
    multiword, joinable = [], []
    for lemma, offsets in noun_index.items():
        if "_" not in lemma or not offsets:
            continue
        phrase = lemma.replace("_", " ")
        multiword.append(phrase)
        head_synsets = {o for form in lexicon_n.morphy(phrase.split()[-1], "n")
                        for o in noun_index.get(form, ())}
        if not (above(offsets[0]) & head_synsets):
            joinable.append(phrase)
    plaything = set(noun_index.get("plaything", [])[:1])
    person, animal, toy = [], [], []
    for lemma, offsets in noun_index.items():
        if "_" in lemma or not offsets:
            continue
        first = offsets[0]
        if lexfile.get(first) == _LEX_PERSON:
            person.append(lemma)
        elif lexfile.get(first) == _LEX_ANIMAL:
            animal.append(lemma)
        if plaything & (above(first) | {first}):
            toy.append(lemma)
    return {"version": LEXICON_VERSION, "lemmas": {p: sorted(index[p]) for p in _POS_FILES},
            "exceptions": exceptions, "verb_counts": verb_counts, "multiword": sorted(multiword),
            "joinable": sorted(joinable), "person": sorted(person), "animal": sorted(animal),
            "toy": sorted(toy)}


def load_lexicon(nltk_data: str | os.PathLike | None = None) -> Lexicon:
    """The parser's :class:`Lexicon`, from its JSON cache (built on first use, atomically).

    The cache lives in the WordNet folder of :func:`ensure_wordnet` and is rebuilt when the
    WordNet files or :data:`LEXICON_VERSION` change.
    """
    root = ensure_wordnet(nltk_data)
    sig = {name: (root / name).stat().st_size for name in _REQUIRED + ("cntlist.rev",)
           if (root / name).is_file()}
    path = root / LEXICON_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") == LEXICON_VERSION and data.get("signature") == sig:
                return Lexicon(data)
        except (OSError, ValueError, KeyError):
            log.warning("WordNet lexicon cache %s unreadable: rebuilding it", path)
    data = build_lexicon(root)
    data["signature"] = sig
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)
    log.info("WordNet lexicon for the parser cached in %s", path)
    return Lexicon(data)
