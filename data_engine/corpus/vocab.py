"""The closed world of the embedded corpus: object classes, scenes and colours.

Canonical names are what a spaCy noun-chunk parser yields as lemma (singular, lowercase,
compound nouns as two words). Synonyms are true WordNet synonyms of the canonical name
(they share a noun synset; see :mod:`data_engine.corpus.wordnet_check`), so a generic
WordNet-based label system can merge them. No class is a WordNet hypernym of another.
"""

from __future__ import annotations

from dataclasses import dataclass

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 165, 55),
    "blue": (35, 85, 225),
    "purple": (135, 55, 185),
    "pink": (245, 135, 195),
    "brown": (125, 75, 35),
    "black": (28, 28, 28),
    "white": (246, 246, 246),
}
ALL_COLORS = tuple(COLORS)
PATTERNS = ("plain", "striped", "dotted")


@dataclass(frozen=True)
class ObjectClass:
    """One drawable object kind and how people write about it."""

    name: str
    plural: str
    colors: tuple[str, ...] = ALL_COLORS
    aspect: float = 1.0  # width / height of the drawing box
    zone: str = "any"  # "sky" | "ground" | "any": where its centre may fall
    max_rot: float = 10.0  # degrees of random rotation either way
    flip: bool = True  # may be mirrored left-right
    patternable: bool = False  # body may be striped or dotted
    verbs: tuple[str, ...] = ()  # participles that read naturally after the noun
    scenes: tuple[str, ...] = ()  # scenes where it is more likely (weight x3)
    synonyms: tuple[tuple[str, str], ...] = ()  # (singular, plural) WordNet synonyms
    max_count: int = 6


@dataclass(frozen=True)
class Scene:
    """A background type; ``phrases`` locate things in it, the first word set names it."""

    name: str
    phrases: tuple[str, ...]  # "{}" is replaced by the scene noun (canonical or synonym)
    synonyms: tuple[str, ...] = ()


_SKY = ("beach", "lake", "meadow", "desert", "snow", "night")
_WATER = ("beach", "lake")

OBJECTS: tuple[ObjectClass, ...] = (
    # sky and nature
    ObjectClass("sun", "suns", ("yellow", "orange", "red"), 1.0, "sky", 20, False,
                verbs=("shining",), scenes=("beach", "desert", "meadow"), max_count=1),
    ObjectClass("moon", "moons", ("yellow", "white", "orange"), 0.8, "sky", 25,
                verbs=("glowing",), scenes=("night",), max_count=1),
    ObjectClass("cloud", "clouds", ("white", "pink"), 1.6, "sky", 5,
                verbs=("drifting",), scenes=_SKY),
    ObjectClass("tree", "trees", ("green", "yellow", "orange", "red"), 0.8, "ground", 5,
                scenes=("meadow", "lake", "snow")),
    ObjectClass("flower", "flowers", ("red", "yellow", "pink", "purple", "white", "blue",
                "orange"), 0.6, "ground", 12, scenes=("meadow",),
                synonyms=(("blossom", "blossoms"), ("bloom", "blooms"))),
    ObjectClass("mushroom", "mushrooms", ("red", "brown", "white", "orange"), 1.0, "ground",
                10, scenes=("meadow",)),
    ObjectClass("cactus", "cactuses", ("green",), 0.7, "ground", 5, scenes=("desert",),
                max_count=1),
    ObjectClass("apple", "apples", ("red", "green", "yellow"), 0.9, "any", 20,
                scenes=("room", "meadow")),
    # animals
    ObjectClass("fish", "fish", ("orange", "yellow", "blue", "red", "purple", "pink", "green"),
                1.6, "any", 20, scenes=_WATER, patternable=True),  # "fish swimming" misparses
    ObjectClass("bird", "birds", ("red", "blue", "yellow", "black", "white", "brown"), 1.4,
                "sky", 20, verbs=("flying",), scenes=_SKY),
    ObjectClass("dog", "dogs", ("brown", "black", "white", "orange", "yellow"), 1.4, "ground",
                8, verbs=("running", "playing", "sitting"), scenes=("beach", "street", "meadow")),
    ObjectClass("cat", "cats", ("orange", "black", "white", "brown"), 0.8, "ground", 6,
                verbs=("sitting", "sleeping"), scenes=("room", "street")),
    ObjectClass("butterfly", "butterflies", ("orange", "blue", "yellow", "purple", "pink",
                "red"), 1.2, "any", 25, False, verbs=("flying",), scenes=("meadow",)),
    ObjectClass("snail", "snails", ("brown", "orange", "yellow", "pink"), 1.4, "ground", 5,
                verbs=("crawling",), scenes=("meadow",)),
    ObjectClass("crab", "crabs", ("red", "orange", "purple"), 1.5, "ground", 10, False,
                verbs=("crawling",), scenes=("beach",)),
    ObjectClass("turtle", "turtles", ("green", "brown", "yellow"), 1.5, "ground", 8,
                verbs=("crawling", "resting"), scenes=("beach", "lake")),
    # vehicles
    ObjectClass("car", "cars", aspect=2.0, zone="ground", max_rot=4, patternable=True,
                verbs=("parked", "driving"), scenes=("street",),
                synonyms=(("automobile", "automobiles"), ("auto", "autos"))),
    ObjectClass("bus", "buses", aspect=2.4, zone="ground", max_rot=3, scenes=("street",),
                verbs=("parked",), synonyms=(("coach", "coaches"),), max_count=2),
    ObjectClass("truck", "trucks", aspect=2.1, zone="ground", max_rot=3, scenes=("street",),
                verbs=("parked",), max_count=2),
    ObjectClass("bicycle", "bicycles", aspect=1.6, zone="ground", max_rot=5,
                scenes=("street", "meadow"), synonyms=(("bike", "bikes"),)),
    ObjectClass("boat", "boats", aspect=1.2, zone="any", max_rot=8, patternable=True,
                verbs=("sailing", "floating"), scenes=_WATER),
    ObjectClass("airplane", "airplanes", ("white", "red", "blue", "yellow", "black",
                "green", "orange"), 1.8, "sky", 15, verbs=("flying",),
                synonyms=(("plane", "planes"), ("aeroplane", "aeroplanes"))),
    ObjectClass("rocket", "rockets", ("white", "red", "blue", "yellow", "orange", "purple"),
                0.5, "sky", 20, False, verbs=("flying",), scenes=("night", "desert")),
    # buildings
    ObjectClass("house", "houses", aspect=1.0, zone="ground", max_rot=2, patternable=True,
                scenes=("street", "snow", "lake")),
    ObjectClass("tent", "tents", aspect=1.3, zone="ground", max_rot=3, patternable=True,
                scenes=("lake", "meadow", "desert", "snow")),
    ObjectClass("lighthouse", "lighthouses", ("red", "white", "blue", "yellow", "black"),
                0.45, "ground", 2, False, scenes=("beach", "lake"), max_count=1,
                synonyms=(("beacon", "beacons"),)),
    ObjectClass("windmill", "windmills", ("brown", "white", "red", "orange", "yellow"), 0.8,
                "ground", 3, False, scenes=("meadow",), max_count=2),
    # toys and things
    ObjectClass("balloon", "balloons", aspect=0.7, zone="sky", max_rot=15, patternable=True,
                verbs=("floating",)),
    ObjectClass("kite", "kites", aspect=0.75, zone="sky", max_rot=30, patternable=True,
                verbs=("flying",), scenes=("beach", "meadow")),
    ObjectClass("umbrella", "umbrellas", aspect=1.1, zone="any", max_rot=20, patternable=True,
                scenes=("beach", "street")),
    ObjectClass("teddy bear", "teddy bears", ("brown", "white", "pink", "yellow", "orange"),
                0.8, "any", 12, scenes=("room",), synonyms=(("teddy", "teddies"),)),
    ObjectClass("ice cream", "ice creams", ("pink", "white", "brown", "green", "yellow"),
                0.55, "any", 15, scenes=("beach",)),
    ObjectClass("light bulb", "light bulbs", ("yellow", "white", "orange"), 0.65, "any", 20,
                scenes=("room",), synonyms=(("bulb", "bulbs"),)),  # "lightbulbs" lemma fails
    ObjectClass("clock", "clocks", aspect=1.0, zone="any", max_rot=10, scenes=("room",)),
    ObjectClass("cup", "cups", aspect=1.2, zone="any", max_rot=8, patternable=True,
                scenes=("room",)),
    ObjectClass("bottle", "bottles", ("green", "brown", "blue", "red", "white", "purple"), 0.4,
                "any", 15, scenes=("room", "beach")),
    ObjectClass("chair", "chairs", aspect=0.7, zone="ground", max_rot=4, scenes=("room",)),
    ObjectClass("guitar", "guitars", ("brown", "red", "black", "orange", "yellow", "blue"),
                0.45, "any", 25, scenes=("room",)),
    ObjectClass("candle", "candles", ("red", "white", "yellow", "pink", "purple", "blue",
                "green"), 0.4, "any", 6, False, scenes=("room", "night"),
                synonyms=(("taper", "tapers"),)),
    ObjectClass("flag", "flags", aspect=1.1, zone="any", max_rot=5, patternable=True,
                verbs=("waving",), scenes=("beach", "street")),
    ObjectClass("heart", "hearts", ("red", "pink", "purple", "orange"), 1.0, "any", 20, False,
                patternable=True),
    # street furniture and snow
    ObjectClass("fire hydrant", "fire hydrants", ("red", "yellow"), 0.6, "ground", 4,
                scenes=("street",), synonyms=(("fireplug", "fireplugs"),)),
    ObjectClass("traffic light", "traffic lights", ("black", "yellow", "green"), 0.45,
                "ground", 3, False, scenes=("street",),
                synonyms=(("traffic signal", "traffic signals"), ("stoplight", "stoplights"))),
    ObjectClass("stop sign", "stop signs", ("red",), 0.6, "ground", 5, False,
                scenes=("street",)),
    ObjectClass("traffic cone", "traffic cones", ("orange",), 0.7, "ground", 5, False,
                scenes=("street",)),
    ObjectClass("snowman", "snowmen", ("white",), 0.6, "ground", 5, scenes=("snow",),
                max_count=2),
)
OBJECT_NAMES: tuple[str, ...] = tuple(o.name for o in OBJECTS)
OBJECTS_BY_NAME: dict[str, ObjectClass] = {o.name: o for o in OBJECTS}

SCENES: tuple[Scene, ...] = (
    Scene("beach", ("on the {}", "at the {}", "on the {}")),
    Scene("night", ("at {}", "at {}", "in the {}"), ("nighttime",)),
    Scene("snow", ("in the {}", "out in the {}")),
    Scene("meadow", ("in a {}", "in the {}", "on the {}"), ("hayfield",)),
    Scene("street", ("on the {}", "in the {}", "down the {}")),
    Scene("lake", ("on the {}", "by the {}", "at the {}")),
    Scene("desert", ("in the {}", "out in the {}")),
    Scene("room", ("in my {}", "in the {}", "in a {}")),
)
SCENE_NAMES: tuple[str, ...] = tuple(s.name for s in SCENES)
SCENES_BY_NAME: dict[str, Scene] = {s.name: s for s in SCENES}


def vocabulary() -> list[dict]:
    """Every canonical tag: ``{"name", "category": object|scene|attribute, "synonyms"}``."""
    out = [{"name": o.name, "category": "object", "synonyms": [s for s, _ in o.synonyms]}
           for o in OBJECTS]
    out += [{"name": s.name, "category": "scene", "synonyms": list(s.synonyms)} for s in SCENES]
    out += [{"name": c, "category": "attribute", "synonyms": []} for c in COLORS]
    return out


def surface_forms() -> dict[str, str]:
    """Every word or compound that names a tag in a caption -> its canonical tag.

    Used to check that captions mention exactly ``truth["mentioned"]`` (tests) and by
    anyone wanting a parser-free baseline. Forms are lowercase.
    """
    forms: dict[str, str] = {}
    for o in OBJECTS:
        for sing, plur in ((o.name, o.plural), *o.synonyms):
            forms[sing] = forms[plur] = o.name
    for s in SCENES:
        for word in (s.name, *s.synonyms):
            forms[word] = s.name
    forms.update({c: c for c in COLORS})
    return forms
