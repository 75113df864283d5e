"""Token attributes of spaCy's ``attribute_ruler`` + ``lemmatizer``, from a per-token cache.

In ``en_core_web_sm`` the tagger predicts fine-grained tags and two rule components turn them
into coarse POS, morphology and lemmas: the ``attribute_ruler`` (a Matcher over ~180 tag-map
and exception patterns) and the rule ``lemmatizer``. Both do per-token Python work and cost
as much as the tok2vec network on short captions (on 3,000 COCO captions: ruler 0.95 s,
lemmatizer 0.59 s, tok2vec 0.87 s, parser 0.83 s of CPU). The rule lemmatizer also tests
membership in a word *list* per candidate form; its index is turned into sets here.

Their output for a token is a function of few inputs. Single-token ruler patterns read the
token's tag, text and a few tests of its dependency label (``nsubj``, ``aux``, ...); the
multi-token ones either read the previous token's dependency label (``expl`` + "is" -> VERB:
"there is a dog") or start with a rare word ("gon na", "let 's"); the lemma is a function of
text, POS and morphology. So the result is cached per key ``(orth, tag, dependency class,
previous dep if a context pattern reads it)``, where labels that pass the same pattern tests
share a class, and written back to the Doc with one ``Doc.from_array``. Keys the cache lacks
are computed by the real components on one synthetic Doc per batch (a missing token follows a
filler token that carries its context dependency, or that keeps it apart from a token that
could start a pattern), so a new key costs one or two tokens of ruler work, once. A Doc
holding a word that starts a multi-token pattern, or that a pattern re-tags or re-labels
(whitespace tokens), runs the real components unchanged.

The output is the real components' output by construction (the tests compare whole Docs);
:meth:`CachedTokenAttrs.build` returns None when a pipeline's rules fall outside what the
key covers, and the caller then keeps the real components.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

# Pattern keys whose value is a function of the token's text, tag or dependency label only.
_TOKEN_KEYS = frozenset({"TAG", "DEP", "LOWER", "ORTH", "TEXT", "IS_SPACE", "IS_PUNCT",
                         "IS_ALPHA", "IS_DIGIT", "IS_LOWER", "IS_UPPER", "IS_TITLE", "LENGTH"})
_FILLER = "zzfiller"  # synthetic context token: matches no pattern's LOWER
Key = tuple[int, int, int, int]  # orth, tag, dependency class, context dep (hashes; 0 = none)


def _set_test(value) -> Callable[[str], bool] | None:
    """A predicate for a pattern value that is a string, ``{IN: [...]}`` or ``{NOT_IN: [...]}``."""
    if isinstance(value, str):
        return value.__eq__
    if isinstance(value, dict) and set(value) == {"IN"}:
        return frozenset(value["IN"]).__contains__
    if isinstance(value, dict) and set(value) == {"NOT_IN"}:
        excluded = frozenset(value["NOT_IN"])
        return lambda x: x not in excluded
    return None


def _word_test(spec: dict) -> Callable[[str], bool] | None:
    """A predicate on a lower-cased word that every word matching ``spec`` passes, or None."""
    if "LOWER" in spec:
        value = spec["LOWER"]
        if isinstance(value, dict) and set(value) == {"REGEX"}:
            return re.compile(value["REGEX"]).search
        return _set_test(value)
    if spec.get("IS_SPACE") is True:
        return str.isspace
    return None


class CachedTokenAttrs:
    """POS, MORPH and LEMMA as the ruler + lemmatizer would set them, cached per token key."""

    def __init__(self, components: list, context_deps: frozenset[int],
                 dep_tests: list[Callable[[str], bool]], triggers: list[Callable[[str], bool]],
                 max_keys: int = 500_000):
        self.components = components          # the real components, run in order
        self.context_deps = context_deps      # dep hashes a 2-token pattern reads on the left
        self.dep_tests = dep_tests            # every test a pattern makes of a token's own DEP
        self.triggers = triggers              # words that start a pattern the key cannot hold
        self.max_keys = max_keys
        self.cache: dict[Key, tuple[int, int, int]] = {}  # -> pos, morph, lemma hashes
        self.real_keys: set[Key] = set()  # keys whose word may start a pattern: real components
        self._dep_class: dict[int, int] = {}  # dep hash -> class (index of its test outcomes)
        self._signatures: dict[tuple[bool, ...], int] = {}
        self.stats = {"docs_cached": 0, "docs_real": 0, "keys_computed": 0}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, nlp, names: tuple[str, ...] = ("attribute_ruler", "lemmatizer"),
              max_keys: int = 500_000) -> CachedTokenAttrs | None:
        """Take ``names`` out of ``nlp`` and return the cache that stands in for them.

        None (and ``nlp`` unchanged) when they are not the pipeline's last components, or a
        ruler pattern reads anything the cache key does not hold.
        """
        present = [n for n in names if n in nlp.pipe_names]
        if not present or nlp.pipe_names[-len(present):] != present:
            log.info("cached token attributes: %s are not the last components; not used", names)
            return None
        context_deps: set[int] = set()
        dep_tests, triggers = [], []
        for name in present:
            comp = nlp.get_pipe(name)
            if hasattr(comp, "patterns"):  # the attribute ruler
                for rule in comp.patterns:
                    rewrites = bool(set(rule["attrs"]) - {"POS", "MORPH", "LEMMA"})  # TAG, DEP
                    for pattern in rule["patterns"]:
                        if any(set(spec) - _TOKEN_KEYS for spec in pattern):
                            log.info("ruler pattern %s reads more than the key; not used", pattern)
                            return None
                        context = (len(pattern) == 2 and set(pattern[0]) == {"DEP"}
                                   and isinstance(pattern[0]["DEP"], str) and rule["index"] in (1, -1))
                        if len(pattern) > 1 and not context or rewrites:
                            test = _word_test(pattern[0])  # a doc without such a word cannot match
                            if test is None:
                                log.info("ruler pattern %s: no word to detect it by; not used", pattern)
                                return None
                            triggers.append(test)
                            continue
                        if context:
                            context_deps.add(nlp.vocab.strings.add(pattern[0]["DEP"]))
                        for spec in pattern[1:] if context else pattern:
                            if "DEP" in spec:
                                test = _set_test(spec["DEP"])
                                if test is None:
                                    log.info("ruler DEP test %s not supported; not used", spec)
                                    return None
                                dep_tests.append(test)
            elif getattr(comp, "mode", None) != "rule" or not hasattr(comp, "lookups"):
                log.info("component %s is not a rule lemmatizer; not used", name)
                return None
        components = [nlp.remove_pipe(n)[1] for n in present]
        for comp in components:  # rule lemmatizer: its word index as sets (it tests membership)
            if hasattr(comp, "lookups") and "lemma_index" in comp.lookups.tables:
                table = comp.lookups.get_table("lemma_index")
                for key in list(table.keys()):
                    table[key] = frozenset(table[key])
        return cls(components, frozenset(context_deps), dep_tests, triggers, max_keys)

    # -- application ----------------------------------------------------------------------
    def _dep_class_of(self, dep: int, strings) -> int:
        label = strings[dep] if dep else ""
        signature = tuple(test(label) for test in self.dep_tests)
        cls_id = self._signatures.setdefault(signature, len(self._signatures))
        self._dep_class[dep] = cls_id
        return cls_id

    def _keys(self, doc, missing: dict[Key, int]) -> list[Key]:
        """Cache keys of a Doc's tokens; keys the cache lacks go to ``missing`` (with the
        token's dependency label, for computing them)."""
        from spacy.attrs import DEP, ORTH, TAG  # lazy: spaCy, loaded by parsing.load_spacy first

        ctx, classes, cache = self.context_deps, self._dep_class, self.cache
        keys, prev = [], 0
        for orth, tag, dep in doc.to_array([ORTH, TAG, DEP]).tolist():  # (n_tokens, 3)
            c = classes.get(dep)
            if c is None:
                c = self._dep_class_of(dep, doc.vocab.strings)
            key = (orth, tag, c, prev)
            keys.append(key)
            if key not in cache:
                missing.setdefault(key, dep)
            prev = dep if dep in ctx else 0
        return keys

    def _compute(self, vocab, missing: dict[Key, int]) -> None:
        """Fill the cache for ``missing`` (key -> a dependency label of that class): the real
        components on one synthetic Doc."""
        from spacy.attrs import LEMMA, MORPH, POS  # lazy: spaCy, loaded by parsing.load_spacy first
        from spacy.tokens import Doc  # lazy: spaCy, loaded by parsing.load_spacy first

        strings = vocab.strings
        words, tags, deps, where, flags = [], [], [], [], []
        isolate = True  # the last token may start a pattern: the next key gets a filler first
        for (orth, tag, _, prev), dep in missing.items():
            word = strings[orth]
            trigger = any(t(word.lower()) for t in self.triggers)
            if prev or isolate:  # a filler carrying the context dependency (or none)
                words.append(_FILLER)
                tags.append("XX")
                deps.append(strings[prev] if prev else "dep")
            where.append(len(words))
            flags.append(trigger)
            words.append(word)
            tags.append(strings[tag])
            deps.append(strings[dep] if dep else "dep")
            isolate = trigger or dep in self.context_deps
        n = len(words)
        doc = Doc(vocab, words=words, spaces=[True] * n, tags=tags, deps=deps,
                  heads=list(range(n)))
        for comp in self.components:
            doc = comp(doc)
        values = doc.to_array([POS, MORPH, LEMMA]).tolist()  # (n, 3)
        if len(self.cache) + len(missing) > self.max_keys:
            self.cache.clear()
            self.real_keys.clear()
        for key, j, trigger in zip(missing, where, flags):
            self.cache[key] = tuple(values[j])
            if trigger:
                self.real_keys.add(key)
        self.stats["keys_computed"] += len(missing)

    def __call__(self, docs: list) -> list:
        """Set POS, MORPH and LEMMA on ``docs`` (tagged and parsed) in place; return them."""
        from spacy.attrs import LEMMA, MORPH, POS  # lazy: spaCy, loaded by parsing.load_spacy first

        if not docs:
            return docs
        missing: dict[Key, int] = {}
        all_keys = [self._keys(doc, missing) for doc in docs]
        if missing:
            self._compute(docs[0].vocab, missing)
        get, real = self.cache.get, self.real_keys
        for doc, keys in zip(docs, all_keys):
            values = list(map(get, keys))
            if None in values or not real.isdisjoint(keys):  # evicted meanwhile, a pattern word
                for comp in self.components:
                    doc = comp(doc)
                self.stats["docs_real"] += 1
                continue
            if values:
                doc.from_array([POS, MORPH, LEMMA], np.array(values, dtype=np.uint64))  # (n_tokens, 3)
            self.stats["docs_cached"] += 1
        return docs
