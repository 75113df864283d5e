"""COCO-80 truth for real photos: map free-text tags to the 80 COCO object categories, and read
COCO-style datasets (captions + object labels).

The mapping follows the project's scoring harness (``../shared/tools/parse_eval``) so that
figures compare with it: a tag belongs to the category of the *longest* surface form
(``resources/coco80_synonyms.json``: category -> words and phrases used for it in captions) that
is a word-suffix of the tag ("tennis player" -> person, "dining room table" -> dining table,
"hot dog" -> hot dog, while "pizza box" is not pizza); words are compared after simple plural
stripping and a few irregular plurals.

Two dataset layouts are read:

* a JSON-lines file, one image per line with ``image_path`` (relative to the file's folder),
  ``captions`` and ``objects`` (COCO-80 names) - ``../shared/data/coco_dev`` uses it;
* the official files: a captions JSON (``images`` + ``annotations`` with ``caption``) and
  optionally an instances JSON (``annotations`` with ``category_id`` + ``categories``).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from data_engine.parsing import CaptionParser, ParseConfig

RESOURCES = Path(__file__).resolve().parent / "resources"
SYNONYMS_FILE = RESOURCES / "coco80_synonyms.json"

_WORD = re.compile(r"[a-z0-9]+")
_IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
    "geese": "goose", "oxen": "ox", "feet": "foot", "teeth": "tooth", "knives": "knife",
    "wives": "wife", "leaves": "leaf", "shelves": "shelf", "calves": "calf", "halves": "half",
    "skiis": "skis",
}


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words of ``text``."""
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=65536)
def singular_forms(word: str) -> tuple[str, ...]:
    """``word`` and the singulars it may be the plural of (sorted, ``word`` included)."""
    forms = {word}
    if word in _IRREGULAR:
        forms.add(_IRREGULAR[word])
    if len(word) > 4 and word.endswith("men"):
        forms.add(word[:-3] + "man")  # firemen -> fireman
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        forms.add(word[:-1])
        if word.endswith("es"):
            forms.add(word[:-2])
        if word.endswith("ies") and len(word) > 4:
            forms.add(word[:-3] + "y")
        if word.endswith("ves"):
            forms.update((word[:-3] + "f", word[:-3] + "fe"))
    return tuple(sorted(forms))


class Coco80Matcher:
    """Tag -> COCO-80 category by the longest matching word-suffix (see the module docstring)."""

    def __init__(self, table: dict[str, Sequence[str]]):
        table = {k: list(v) for k, v in table.items() if not k.startswith("_")}
        self.categories: list[str] = sorted(table)
        self._phrases: dict[tuple[str, ...], str] = {}
        for cat, forms in table.items():
            for form in [*forms, cat]:
                key = tuple(words(form))
                if not key:
                    continue
                if self._phrases.get(key, cat) != cat:
                    raise ValueError(f"surface form {form!r} maps to both {self._phrases[key]!r} and {cat!r}")
                self._phrases[key] = cat
        self._longest = max(len(k) for k in self._phrases)
        self.match_tag = functools.lru_cache(maxsize=200_000)(self._match_tag)

    @classmethod
    def default(cls) -> Coco80Matcher:
        """The table shipped in ``resources/coco80_synonyms.json``."""
        return cls(json.loads(SYNONYMS_FILE.read_text(encoding="utf-8")))

    def _lookup(self, seq: tuple[str, ...]) -> str | None:
        for combo in itertools.product(*(singular_forms(w) for w in seq)):
            cat = self._phrases.get(combo)
            if cat is not None:
                return cat
        return None

    def _match_tag(self, tag: str) -> str | None:
        seq = words(tag)
        for n in range(min(len(seq), self._longest), 0, -1):
            cat = self._lookup(tuple(seq[-n:]))
            if cat is not None:
                return cat
        return None

    def categories_of(self, tags: Iterable[str]) -> set[str]:
        """COCO-80 categories of a tag list (tags that match none are dropped)."""
        return {c for c in (self.match_tag(t) for t in tags) if c is not None}


# --------------------------------------------------------------------------- datasets


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a coco_dev-style JSON-lines file; ``image_path`` made absolute against its folder.

    Rows without captions or without an ``image_path`` raise: the file is a dataset, not a
    stream to filter."""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("image_path") or not isinstance(row.get("captions"), list):
            raise ValueError(f"{path}:{i + 1}: needs image_path and a captions list")
        row["image_path"] = str(path.parent / row["image_path"])
        row.setdefault("objects", [])
        rows.append(row)
    return rows


def read_instances(instances_json: str | Path) -> dict[Any, list[str]]:
    """``image_id -> sorted COCO-80 names`` from an official instances JSON."""
    data = json.loads(Path(instances_json).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    out: dict[Any, set[str]] = {img["id"]: set() for img in data.get("images", [])}
    for ann in data.get("annotations", []):
        name = names.get(ann.get("category_id"))
        if name is not None:
            out.setdefault(ann.get("image_id"), set()).add(name)
    return {k: sorted(v) for k, v in out.items()}


def truth_by_key(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """``file-name stem -> objects``: the key ingest gives a COCO image (see ``iter_coco``)."""
    return {Path(r.get("file_name") or r["image_path"]).stem: sorted(r.get("objects") or []) for r in rows}


def rows_to_captions_json(rows: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Write an official-style captions JSON for ``rows`` (``file_name`` relative to ``out``'s folder).

    Lets the ingest's COCO source read a JSON-lines dataset without copying images."""
    out = Path(out)
    images, anns = [], []
    for r in rows:
        rel = Path(r["image_path"]).resolve()
        try:
            file_name = str(rel.relative_to(out.parent.resolve()))
        except ValueError:
            file_name = str(rel)
        images.append({"id": r["image_id"], "file_name": file_name})
        anns.extend({"id": len(anns), "image_id": r["image_id"], "caption": c} for c in r["captions"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": anns}), encoding="utf-8")
    tmp.replace(out)
    return out


def parsed_categories(captions_per_image: Sequence[Sequence[str]], matcher: Coco80Matcher,
                      parser=None) -> list[list[str]]:
    """Per image: the COCO-80 categories its captions' parsed tags map to (union over captions)."""
    if parser is None:
        parser = CaptionParser(ParseConfig(n_process=1))
    flat = [c for caps in captions_per_image for c in caps]
    owner = [i for i, caps in enumerate(captions_per_image) for _ in caps]
    per_image: list[set[str]] = [set() for _ in captions_per_image]
    for i, parsed in zip(owner, parser.parse_batch(flat)):
        per_image[i] |= matcher.categories_of(parsed.tags)
    return [sorted(s) for s in per_image]
