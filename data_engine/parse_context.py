"""Context rules of the caption parser: the words around a noun decide what it names.

The dependency rules of :mod:`data_engine.parsing` read one noun phrase at a time. Some words
name different things in different company, and a tag list keyed by words then merges them:

* colour or thing: "an orange bus" (colour) vs "an orange and a banana" (fruit);
* glasses: "a man wearing glasses" (eyeglasses) vs "two glasses of wine" (wine glasses);
* kin words in animal scenes: "an elephant and her baby" is a young elephant, not a person;
* possessors of toys: "a child's toy" shows a toy, not necessarily a child.

:class:`ContextRules` holds the editable word lists (``resources/context.yaml``) and the
WordNet classes (:class:`data_engine.wordnet.Lexicon`: persons, animals, playthings); the
parser asks it about each noun phrase. Everything is syntax plus these lists: no image or
data set specifics.
"""

from __future__ import annotations

from pathlib import Path

import yaml

_NOUN_POS = frozenset({"NOUN", "PROPN"})
_PREDICATIVE = frozenset({"acomp", "attr", "oprd"})
_MODIFIER_DEPS = frozenset({"amod", "compound", "nmod", "npadvmod"})
KEEP = object()  # "no rule applies": the parser keeps its own reading


class ContextRules:
    """Context decisions for one parser (word lists + WordNet noun classes)."""

    def __init__(self, path: str | Path, lexicon, colours: frozenset[str]):
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        self.colours = colours
        self.counting = frozenset(cfg.get("colour_thing", {}).get("determiners", ()))
        eye = cfg.get("eyeglasses", {})
        self.eyeglasses_tag = eye.get("tag", "eyeglasses")
        self.wear = frozenset(eye.get("wear_verbs", ()))
        self.have = frozenset(eye.get("have_verbs", ()))
        self.with_preps = frozenset(eye.get("with_preps", ()))
        self.drinks: dict[str, str] = dict(cfg.get("drink_glass", {}).get("drinks", {}))
        young = cfg.get("young_animal", {})
        self.kin = frozenset(young.get("kin", ()))
        self.possessives = frozenset(young.get("possessives", ()))
        self.young_modifiers = frozenset(young.get("young_modifiers", ()))
        self.toy_possessor = bool(cfg.get("toy_possessor", {}).get("enabled", False))
        self.person = lexicon.person if lexicon is not None else frozenset()
        self.animal = lexicon.animal if lexicon is not None else frozenset()
        self.toy = lexicon.toy if lexicon is not None else frozenset()

    # -- caption-level facts (computed once per doc) -----------------------------------------
    def facts(self, doc, lemma) -> dict:
        """Nouns of the caption by class: ``people`` (not kin words), ``animals`` (index, lemma)."""
        people, animals, young = False, [], False
        for tok in doc:
            if tok.pos_ not in _NOUN_POS:
                continue
            lm = lemma(tok)
            if lm in self.person and lm not in self.kin or lm in ("people", "person"):
                people = True
            if lm in self.animal and lm not in self.person:
                animals.append((tok.i, lm))
                if any(c.lower_ in self.young_modifiers for c in tok.children
                       if c.dep_ in ("amod", "compound")):
                    young = True
        drinks = {tok.lower_ for tok in doc} & set(self.drinks)
        return {"people": people, "animals": animals, "young": young, "drinks": drinks}

    # -- per phrase ----------------------------------------------------------------------------
    def colour_is_thing(self, tok) -> bool:
        """A colour word heading its own noun phrase, plural or counted: a thing ("an orange",
        "two oranges", "a bowl of greens"); not when it modifies what follows ("a grey striped
        cat", "a gold colored plane"), is itself modified ("a light blue") or is paired with
        colours ("a grey and orange hydrant", "a yellow and a green motorcycle")."""
        if tok.pos_ not in _NOUN_POS or tok.dep_ in _PREDICATIVE or tok.dep_ in _MODIFIER_DEPS:
            return False
        if tok.head.i > tok.i and tok.head.pos_ in _NOUN_POS:
            return False
        if any(c.dep_ in ("amod", "advmod", "compound") for c in tok.children):
            return False
        doc = tok.doc
        nxt = doc[tok.i + 1] if tok.i + 1 < len(doc) else None
        if nxt is not None and (nxt.pos_ in ("NOUN", "PROPN", "ADJ", "NUM")
                                or nxt.tag_ in ("VBN", "VBG", "VBD")):  # "a grey striped cat"
            return False
        partners = [c for c in tok.children if c.dep_ == "conj"]
        if tok.dep_ == "conj":
            partners.append(tok.head)
        for other in partners:
            if other.lower_ in self.colours or any(
                    c.lower_ in self.colours for c in other.children if c.dep_ in _MODIFIER_DEPS):
                return False
        if tok.tag_ in ("NNS", "NNPS"):
            return True
        return any(c.dep_ in ("det", "nummod", "quantmod") and c.lower_ in self.counting
                   for c in tok.children)

    def rewrite(self, doc, head, phrase: str, facts: dict):
        """The tag for the noun phrase ``phrase`` headed by token ``head``: a new phrase, None
        (drop it), or :data:`KEEP`."""
        if phrase == "glass":
            return self._glass(head, facts)
        if phrase in self.kin:
            return self._kin(head, phrase, facts)
        if self.toy_possessor and head.dep_ == "poss" and phrase in self.person:
            owned = head.head
            words = {owned.lower_} | {c.lower_ for c in owned.children if c.dep_ == "compound"}
            if words & self.toy:
                return None
        return KEEP

    def _glass(self, head, facts: dict):
        if head.lower_ == "glasses":
            while head.dep_ in ("conj", "appos") and head.head.i != head.i:  # "a hat and glasses"
                head = head.head
            verb = head.head
            if head.dep_ == "dobj" and verb.pos_ in ("VERB", "AUX"):
                if verb.lemma_ in self.wear or (verb.lemma_ in self.have and facts["people"]):
                    return self.eyeglasses_tag
            if head.dep_ == "pobj" and verb.lower_ in self.with_preps and facts["people"] \
                    and verb.head.pos_ in _NOUN_POS and verb.head.lemma_.lower() in self.person:
                return self.eyeglasses_tag
        for drink in sorted(facts["drinks"]):
            return self.drinks[drink]
        return KEEP

    def _kin(self, head, phrase: str, facts: dict):
        if facts["people"] or not facts["animals"]:
            return KEEP
        owned = any(c.dep_ == "poss" and c.lower_ in self.possessives for c in head.children)
        if not (owned or facts["young"]):
            return KEEP
        before = [lm for i, lm in facts["animals"] if i < head.i]
        animal = before[-1] if before else facts["animals"][0][1]
        return f"{phrase} {animal}"
