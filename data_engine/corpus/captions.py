"""Web-like captions with known truth: omissions, hallucinations, synonyms, filler words.

Every tag word in a caption sits at the head of an ordinary noun phrase ("two red kites",
"a striped umbrella", "the beach"), so a noun-chunk parser can recover exactly the
canonical tags recorded in ``mentioned``. Non-visual filler ("lovely", "my vacation",
"photo of") never contains a tag word, a synonym or a colour. There are no negations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_engine.corpus.vocab import OBJECTS_BY_NAME, SCENES_BY_NAME, ObjectClass

NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
VAGUE = ("some", "several")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large", "huge")}
PRE = ("Photo of", "A photo of", "Picture of", "Snapshot of", "Look at", "Check out", "Just")
INTERJECTIONS = ("Lovely!", "Amazing day!", "What a day!", "So beautiful.", "Best vacation ever!",
                 "Good times.", "Love it!", "Such a nice afternoon.", "Memories from my vacation.",
                 "Perfect weekend.", "Can't wait to come back!", "Wonderful trip.",
                 "Happy times.", "Nice view.", "Having fun!")
OPENERS = ("My vacation:", "Our trip:", "Weekend vibes:", "Today:", "Lovely afternoon:",
           "Summer memories:", "Great day:")
TAILS = ("lovely", "amazing", "so nice", "beautiful", "wonderful")
SAW = ("I saw {} today", "We found {}", "I love {}", "We spotted {}", "Came across {}")
NO_OBJECT = ("A lovely day {}.", "Just another day {}.", "What a view {}!", "Memories {}.",
             "Good times {}.", "So peaceful {}.")
NO_ANYTHING = ("Lovely day.", "Good times.", "Memories from my vacation.", "What a day!",
               "Perfect weekend.", "Best trip ever.")
RELATIONS = ("next to", "near", "beside", "with")


@dataclass
class Group:
    """One noun phrase about one class: ``count`` things, optional colour/pattern/size."""

    cls: ObjectClass
    count: int
    word: tuple[str, str]  # (singular, plural) used for this class
    color: str | None = None
    pattern: str | None = None
    size: str | None = None


@dataclass
class CaptionResult:
    caption: str
    mentioned: list[str]
    synonyms_used: list[list[str]] = field(default_factory=list)  # [canonical, word]
    hallucinated: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NoiseParams:
    omit_rate: float
    hallucinate_rate: float
    synonym_rate: float
    attribute_rate: float
    pattern_rate: float
    verb_rate: float
    filler_rate: float


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _word(cls: ObjectClass, rng: np.random.Generator, rate: float, used: list) -> tuple[str, str]:
    if cls.synonyms and rng.random() < rate:
        word = _pick(rng, cls.synonyms)
        used.append([cls.name, word[0]])
        return word
    return (cls.name, cls.plural)


def _phrase(g: Group, rng: np.random.Generator) -> str:
    """Noun phrase: determiner/number, size, colour, pattern, noun."""
    adjs = [w for w in (g.size and _pick(rng, SIZE_WORDS[g.size]), g.color, g.pattern) if w]
    noun = g.word[0] if g.count == 1 else g.word[1]
    body = " ".join(adjs + [noun])
    if g.count == 1:
        det = _article(body)
    elif rng.random() < 0.15:
        det = _pick(rng, VAGUE)
    else:
        det = NUMBERS.get(g.count, "many")
    return f"{det} {body}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _groups_for_present(name: str, objs: list[dict], rng: np.random.Generator,
                        p: NoiseParams, complete: bool, used: list) -> list[Group]:
    cls = OBJECTS_BY_NAME[name]
    word = _word(cls, rng, p.synonym_rate, used)
    with_color = complete or rng.random() < p.attribute_rate
    buckets: dict[str | None, list[dict]] = {}
    for o in objs:
        buckets.setdefault(o["color"] if with_color else None, []).append(o)
    groups = []
    for color, members in buckets.items():
        g = Group(cls, len(members), word, color)
        patterns = {m["pattern"] for m in members}
        if len(patterns) == 1 and "plain" not in patterns and rng.random() < p.pattern_rate:
            g.pattern = patterns.pop()
        if len(members) == 1 and members[0]["size"] != "medium" and rng.random() < 0.25:
            g.size = members[0]["size"]
        groups.append(g)
    return groups


def _scene_phrase(scene: str, rng: np.random.Generator, p: NoiseParams, used: list) -> str:
    sc = SCENES_BY_NAME[scene]
    noun = sc.name
    if sc.synonyms and rng.random() < p.synonym_rate:
        noun = _pick(rng, sc.synonyms)
        used.append([sc.name, noun])
    return _pick(rng, sc.phrases).format(noun)


def _compose(blocks: list[list[str]], plural_first: bool, sp: str, verb: str | None,
             rng: np.random.Generator, p: NoiseParams) -> str:
    """Pick a sentence template; ``blocks`` = phrases per class, ``sp`` = scene phrase or "".

    ``verb`` (a participle for the very last phrase) is only used where that phrase is
    directly followed by the scene phrase ("two dogs running on the beach"): a trailing
    participle or one before "and" makes small parsers read it as a noun.
    """
    if verb and sp:
        sp = f"{verb} {sp}"
    phrases = [ph for b in blocks for ph in b]
    obj = _join(phrases)
    be = "are" if plural_first else "is"
    filler = rng.random() < p.filler_rate
    r = rng.random()
    if len(blocks) >= 2 and r < 0.2:
        cut = int(rng.integers(1, len(blocks)))
        first = _join([ph for b in blocks[:cut] for ph in b])
        second = _join([ph for b in blocks[cut:] for ph in b])
        if rng.random() < 0.5 or verb:
            text = f"{first} {_pick(rng, RELATIONS)} {second} {sp}."
        else:
            text = f"{first} {sp}. Also {second}."
    elif r < 0.4:
        text = f"There {be} {obj} {sp}."
    elif r < 0.55 and sp and not verb:
        text = f"{sp[0].upper()}{sp[1:]} there {be} {obj}."
    elif r < 0.7:
        text = _pick(rng, SAW).format(f"{obj} {sp}".strip()) + "."
    else:
        text = f"{obj} {sp}."
    if filler:
        f = rng.random()
        if f < 0.3:
            text = f"{_pick(rng, PRE)} {text[0].lower()}{text[1:]}" if text.startswith(
                tuple(_all_dets())) else f"{text} {_pick(rng, INTERJECTIONS)}"
        elif f < 0.55:
            text = f"{text} {_pick(rng, INTERJECTIONS)}"
        elif f < 0.75:
            text = f"{_pick(rng, INTERJECTIONS)} {text[0].upper()}{text[1:]}"
        elif f < 0.9:
            text = f"{_pick(rng, OPENERS)} {text}"
        else:
            text = f"{text[:-1]}, {_pick(rng, TAILS)}!"
    return text


def _all_dets() -> list[str]:
    return ["a ", "an ", *(f"{n} " for n in NUMBERS.values()), *(f"{v} " for v in VAGUE), "many "]


def make_caption(rng: np.random.Generator, scene: str, objects: list[dict], p: NoiseParams,
                 hallucination_pool: list[str], complete: bool = False) -> CaptionResult:
    """Write one caption for an image holding ``objects`` in ``scene``.

    ``complete``: mention every object class with all its colours and the scene, no
    hallucination (the clean ``finetune`` split). Otherwise each present class and the
    scene are omitted with ``omit_rate``, and each mentioned class brings an absent one
    with probability ``h / (1 - h)``, so absent classes are a fraction ``h`` of mentions.
    """
    used: list[list[str]] = []
    by_class: dict[str, list[dict]] = {}
    for o in objects:
        by_class.setdefault(o["name"], []).append(o)
    blocks: list[list[Group]] = []
    for name, objs in by_class.items():
        if complete or rng.random() >= p.omit_rate:
            blocks.append(_groups_for_present(name, objs, rng, p, complete, used))
    hallucinated: list[str] = []
    if not complete and p.hallucinate_rate > 0 and blocks:
        odds = p.hallucinate_rate / (1.0 - p.hallucinate_rate)
        n_fake = int((rng.random(len(blocks)) < odds).sum())
        pool = [n for n in hallucination_pool if n not in by_class]
        for idx in rng.permutation(len(pool))[:n_fake]:
            cls = OBJECTS_BY_NAME[pool[int(idx)]]
            count = 1 if rng.random() < 0.8 else 2
            g = Group(cls, min(count, cls.max_count), _word(cls, rng, p.synonym_rate, used))
            if rng.random() < p.attribute_rate:
                g.color = _pick(rng, cls.colors)
            blocks.append([g])
            hallucinated.append(cls.name)
    order = rng.permutation(len(blocks))
    blocks = [blocks[int(i)] for i in order]
    sp = _scene_phrase(scene, rng, p, used) if (complete or rng.random() >= p.omit_rate) else ""
    if blocks:
        phrases = [[_phrase(g, rng) for g in b] for b in blocks]
        last = blocks[-1][-1].cls
        verb = _pick(rng, last.verbs) if last.verbs and rng.random() < p.verb_rate else None
        text = _compose(phrases, blocks[0][0].count > 1, sp, verb, rng, p)
    elif sp:
        text = _pick(rng, NO_OBJECT).format(sp)
    else:
        text = _pick(rng, NO_ANYTHING)
    text = " ".join(text.split()).replace(" .", ".").replace(" ,", ",")
    text = text[0].upper() + text[1:]
    if rng.random() < 0.12:
        text = text.lower()
    mentioned = {g.cls.name for b in blocks for g in b} | {g.color for b in blocks for g in b
                                                          if g.color}
    if sp:
        mentioned.add(scene)
    return CaptionResult(text, sorted(mentioned), used, sorted(hallucinated))
