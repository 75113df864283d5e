"""The unified label system (RAM, arXiv 2306.03514, sec. 3.1): tags -> stable integer ids.

Built from seed vocabularies (tag-name files in RAM's ``ram_tag_list.txt`` format: one name per
line) plus the tags parsed from the corpus that occur at least ``min_freq`` times. Synonyms
are merged by an editable synonyms file, WordNet (a tag joins a label when they share a noun
synset among their first senses) and hypernym rules ("man", "woman", "boy" -> person: a tag
whose first sense reaches one of the rule's WordNet synsets). Each label has an id (its
index; never reused or reordered: building on a previous label system appends), a category,
its synonyms and an optional threshold. Saved as ``label_system.json`` plus RAM-format
``ram_tag_list.txt`` / ``ram_tag_list_threshold.txt``.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from data_engine.parsing import CATEGORIES, RESOURCES, read_word_list
from data_engine.wordnet import load_wordnet
from ramflow_io.formats import LABEL_SYSTEM_JSON, read_label_system_json

log = logging.getLogger(__name__)

JSON_NAME = LABEL_SYSTEM_JSON
TAG_LIST_NAME = "ram_tag_list.txt"
THRESHOLD_NAME = "ram_tag_list_threshold.txt"
SEEDS_DIR = RESOURCES / "seeds"


class LabelSystemConfig(BaseModel):
    """Settings of the label-system stage (``label_system:`` in params.yaml)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    min_freq: int = 3
    # Seed vocabularies: names in resources/seeds ("coco80", "imagenet1k") or RAM-format paths.
    # imagenet1k is shipped but not on by default: its names are idiosyncratic ("beacon" for
    # lighthouse, "projectile" for rocket) and would capture tags of those synsets.
    seed_files: list[str] = ["coco80"]
    synonyms_file: Path = RESOURCES / "synonyms.txt"
    categories: list[str] = list(CATEGORIES)  # categories of corpus tags admitted as labels
    wordnet_synonyms: bool = True
    # WordNet synonym rule: a tag joins a label of the same category when they share a noun
    # synset that is the label's first sense and among the tag's first `max_sense_rank`
    # senses ("coach" -> bus: 5th sense), or among the first two senses of both
    # ("bloom" -> flower). Wider windows merge wrongly ("string" -> train).
    max_sense_rank: int = 5
    hypernym_rules: dict[str, list[str]] = {
        "person": ["adult.n.01", "juvenile.n.01", "male.n.02", "female.n.02"]}
    hypernym_max_depth: int = 4
    default_threshold: float = 0.68
    nltk_data: Path | None = None


@dataclass
class Label:
    id: int
    name: str
    category: str = "object"
    synonyms: list[str] = field(default_factory=list)
    threshold: float | None = None
    source: str = ""
    freq: int = 0


def _norm(tag: str) -> str:
    return " ".join(str(tag).lower().replace("_", " ").split())


class LabelSystem:
    """Ordered labels with synonym-aware lookup. ``labels[i].id == i`` always."""

    def __init__(self, labels: Iterable[Label] = (), default_threshold: float = 0.68):
        self.labels: list[Label] = []
        self._lookup: dict[str, int] = {}
        self.default_threshold = default_threshold
        for lab in labels:
            self.add(lab.name, lab.category, lab.synonyms, lab.threshold, lab.source, lab.freq)

    # -- building -----------------------------------------------------------------------
    def add(self, name: str, category: str = "object", synonyms: Iterable[str] = (),
            threshold: float | None = None, source: str = "", freq: int = 0) -> int:
        """Append a label (or return the id it already has); synonyms are attached to it."""
        name = _norm(name)
        if name in self._lookup:
            idx = self._lookup[name]
        else:
            idx = len(self.labels)
            self.labels.append(Label(idx, name, category, [], threshold, source, freq))
            self._lookup[name] = idx
        for syn in synonyms:
            self.add_synonym(idx, syn)
        return idx

    def add_synonym(self, idx: int, synonym: str) -> bool:
        """Attach ``synonym`` to label ``idx`` unless that surface form is already taken."""
        syn = _norm(synonym)
        if not syn or syn in self._lookup:
            return False
        self._lookup[syn] = idx
        self.labels[idx].synonyms.append(syn)
        return True

    # -- lookup -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, tag: str) -> bool:
        return _norm(tag) in self._lookup

    def id_of(self, tag: str, backoff: bool = True) -> int | None:
        """Id of a tag, its synonym or (``backoff``) its longest known word-suffix.

        The suffix back-off maps a compound the system does not know to its head:
        "tennis player" -> "player" (-> person), "pizza box" -> "box".
        """
        words = _norm(tag).split()
        stop = len(words) if backoff else 1
        for k in range(stop):
            idx = self._lookup.get(" ".join(words[k:]))
            if idx is not None:
                return idx
        return None

    def to_ids(self, tags: Iterable[str]) -> list[int]:
        """Unique label ids of the tags that map, in first-appearance order."""
        out: dict[int, None] = {}
        for tag in tags:
            idx = self.id_of(tag)
            if idx is not None:
                out[idx] = None
        return list(out)

    def normalize(self, tags: Iterable[str]) -> list[str]:
        """Canonical names of the tags that map (unmapped tags are dropped)."""
        return [self.labels[i].name for i in self.to_ids(tags)]

    def category(self, idx: int) -> str:
        return self.labels[idx].category

    @property
    def thresholds(self) -> list[float]:
        """Per-label threshold (``default_threshold`` where none was set)."""
        return [self.default_threshold if lab.threshold is None else lab.threshold
                for lab in self.labels]

    def compounds(self) -> set[str]:
        """Multi-word names and synonyms (the parser keeps these together)."""
        return {form for form in self._lookup if " " in form}

    # -- files --------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write ``label_system.json`` and the RAM-format tag list and thresholds."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"version": 1, "default_threshold": self.default_threshold,
                   "labels": [asdict(lab) for lab in self.labels]}
        (out / JSON_NAME).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
        (out / TAG_LIST_NAME).write_text("".join(f"{n}\n" for n in self.names), encoding="utf-8")
        (out / THRESHOLD_NAME).write_text("".join(f"{t}\n" for t in self.thresholds),
                                          encoding="utf-8")
        return out / JSON_NAME

    @classmethod
    def load(cls, path: str | Path) -> LabelSystem:
        """Read a folder (JSON, else RAM text files), a ``.json`` file or a RAM tag list."""
        path = Path(path)
        if path.is_dir():
            path = path / JSON_NAME if (path / JSON_NAME).exists() else path / TAG_LIST_NAME
        if not path.exists():
            raise FileNotFoundError(f"no label system at {path}")
        if path.suffix == ".json":
            data = read_label_system_json(path)
            return cls([Label(**lab) for lab in data["labels"]], data.get("default_threshold", 0.68))
        thr = path.with_name(THRESHOLD_NAME)
        return cls.from_tag_list(path, thr if thr.exists() else None)

    @classmethod
    def from_tag_list(cls, tag_list: str | Path, thresholds: str | Path | None = None,
                      category: str = "object") -> LabelSystem:
        """A label system from RAM-format files (one tag per line; one float per line)."""
        names = [line.strip() for line in Path(tag_list).read_text(encoding="utf-8").splitlines()]
        thr: list[float | None] = [None] * len(names)
        if thresholds is not None:
            vals = [float(x) for x in Path(thresholds).read_text().split()]
            if len(vals) < len(names):
                raise ValueError(f"{thresholds}: {len(vals)} thresholds for {len(names)} tags")
            thr = vals[: len(names)]
        ls = cls()
        for name, t in zip(names, thr):
            if name:
                ls.add(name, category, threshold=t, source=Path(tag_list).name)
        return ls


# --------------------------------------------------------------------------- building

def read_synonyms(path: str | Path) -> dict[str, str]:
    """``synonym -> canonical`` from a ``canonical: syn, syn`` file."""
    out: dict[str, str] = {}
    for line in read_word_list(path):
        canon, _, rest = line.partition(":")
        for syn in rest.split(","):
            if _norm(syn):
                out[_norm(syn)] = _norm(canon)
    return out


def seed_path(name: str) -> Path:
    """A seed vocabulary by resource name (``coco80``) or path."""
    p = Path(name)
    return p if p.suffix or p.exists() else SEEDS_DIR / f"{name}.txt"


class _WordNetMerger:
    """WordNet synonym and hypernym decisions (cached per tag)."""

    def __init__(self, cfg: LabelSystemConfig):
        self.wn = load_wordnet(cfg.nltk_data)
        self.cfg = cfg
        self._targets = {t: {self.wn.synset(s) for s in syns} for t, syns in cfg.hypernym_rules.items()}
        self._synset_to_label: dict[tuple[str, str], tuple[int, int]] = {}  # -> (label id, rank)

    def senses(self, tag: str, rank: int) -> list:
        return self.wn.synsets(tag.replace(" ", "_"), "n")[:rank]

    def index_label(self, name: str, idx: int, category: str) -> None:
        """Remember the label's first two senses (rank 1 or 2) for :meth:`synonym_of`."""
        for rank, s in enumerate(self.senses(name, 2), start=1):
            self._synset_to_label.setdefault((s.name(), category), (idx, rank))

    def synonym_of(self, tag: str, category: str, freq: list[int], n: int) -> int | None:
        """The most observed label sharing a synset with ``tag`` (seen at least ``n`` times).

        Requiring the label to be at least as frequent as the tag makes the more frequent
        form canonical and keeps observed tags off unobserved seed names.
        """
        best = None
        for rank, s in enumerate(self.senses(tag, self.cfg.max_sense_rank), start=1):
            hit = self._synset_to_label.get((s.name(), category))
            if hit is not None and (hit[1] == 1 or rank <= 2) and freq[hit[0]] >= n:
                if best is None or freq[hit[0]] > freq[best]:
                    best = hit[0]
        return best

    def hypernym_target(self, tag: str) -> str | None:
        """Rule target reached from the tag's first sense (not from a named instance)."""
        first = self.senses(tag, 1)
        if not first or first[0].instance_hypernyms():
            return None
        for path in first[0].hypernym_paths():
            near = path[-1 - self.cfg.hypernym_max_depth:]
            for target, synsets in self._targets.items():
                if any(s in synsets for s in near):
                    return target
        return None


def count_parsed_tags(parsed: Iterable[Path]) -> tuple[collections.Counter, dict[str, str]]:
    """Tag frequencies (per caption) and the most common category of each tag."""
    import pyarrow.parquet as pq  # lazy: pyarrow, only the label stages; `ramflow parse` starts without it

    freq: collections.Counter = collections.Counter()
    cats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in parsed:
        for batch in pq.ParquetFile(path).iter_batches(columns=["tags", "categories"]):
            for tags, categories in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                for tag, cat in zip(tags or [], categories or []):
                    freq[tag] += 1
                    cats[tag][cat] += 1
    major = {t: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for t, c in cats.items()}
    return freq, major


def build_label_system(parsed: list[Path], cfg: LabelSystemConfig, out_dir: Path,
                       previous: Path | None = None) -> LabelSystem:
    """Merge seeds, frequent parsed tags and synonyms into a label system; save it in out_dir.

    Deterministic: the same inputs give the same ids. With ``previous`` its labels keep their
    ids and new labels are appended. Tags below ``min_freq`` only join as synonyms.
    """
    ls = LabelSystem.load(previous) if previous else LabelSystem(default_threshold=cfg.default_threshold)
    n_before = len(ls)
    freq, major = count_parsed_tags(parsed)
    syn_file = read_synonyms(cfg.synonyms_file) if cfg.synonyms_file else {}
    scenes = set(read_word_list(RESOURCES / "scenes.txt"))
    for name in cfg.seed_files:
        path = seed_path(name)
        for line in path.read_text(encoding="utf-8").splitlines():
            if _norm(line) and _norm(line) not in syn_file:
                ls.add(line, "scene" if _norm(line) in scenes else "object", source=path.stem)
    for syn, canon in sorted(syn_file.items()):  # file synonyms of labels that exist already
        if canon in ls._lookup:
            ls.add_synonym(ls._lookup[canon], syn)
    wn = _WordNetMerger(cfg) if cfg.wordnet_synonyms else None
    if wn is not None:
        for lab in ls.labels:
            wn.index_label(lab.name, lab.id, lab.category)

    counts = collections.Counter()
    for tag, n in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])):
        cat = major[tag]
        if cat not in cfg.categories:
            continue
        if tag in ls._lookup:
            ls.labels[ls._lookup[tag]].freq += n
            continue
        frequent = n >= cfg.min_freq
        target, how = None, ""
        if tag in syn_file:
            canon = syn_file[tag]
            target = ls._lookup.get(canon)
            if target is None and frequent:
                target = ls.add(canon, cat, source="synonyms")
            how = "synonyms_file"
        elif wn is not None and cat in ("object", "scene"):
            hyper = wn.hypernym_target(tag)
            if hyper is not None:
                target = ls._lookup.get(hyper)
                if target is None and frequent:
                    target = ls.add(hyper, cat, source="hypernym")
                    wn.index_label(hyper, target, cat)
                how = "hypernym"
            else:
                target = wn.synonym_of(tag, cat, [lab.freq for lab in ls.labels], n)
                how = "wordnet"
        if target is not None:
            ls.add_synonym(target, tag)
            ls.labels[target].freq += n
            counts[f"merged_{how}"] += 1
        elif frequent:
            idx = ls.add(tag, cat, source="corpus", freq=n)
            if wn is not None and cat in ("object", "scene"):
                wn.index_label(tag, idx, cat)
            counts["new_labels"] += 1
        else:
            counts["below_min_freq"] += 1
    ls.save(out_dir)
    log.info("label system: %d labels (%d new, %d from previous) from %d distinct tags %s -> %s",
             len(ls), len(ls) - n_before, n_before, len(freq), dict(counts), out_dir)
    return ls


def assign_label_ids(parsed_path: Path, label_system: LabelSystem | Path, out_path: Path,
                     top_k: int = 30) -> dict:
    """Write ``labels/{split}.parquet`` (key, parse_label_ids, unmapped); return counts."""
    import pyarrow as pa  # lazy: pyarrow, only the label stages; `ramflow parse` starts without it
    import pyarrow.parquet as pq  # lazy: pyarrow, only the label stages; `ramflow parse` starts without it

    ls = label_system if isinstance(label_system, LabelSystem) else LabelSystem.load(label_system)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("key", pa.string()), ("parse_label_ids", pa.list_(pa.int32())),
                        ("unmapped", pa.list_(pa.string()))])
    unmapped_freq: collections.Counter = collections.Counter()
    n_rows = n_tags = n_mapped = n_empty = 0
    tmp = out_path.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in pq.ParquetFile(parsed_path).iter_batches(columns=["key", "tags"]):
            keys, ids_col, unm_col = [], [], []
            for key, tags in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                tags = tags or []
                ids: dict[int, None] = {}
                unmapped = []
                for tag in tags:
                    idx = ls.id_of(tag)
                    if idx is None:
                        unmapped.append(tag)
                    else:
                        ids[idx] = None
                n_rows += 1
                n_tags += len(tags)
                n_mapped += len(tags) - len(unmapped)
                n_empty += not ids
                unmapped_freq.update(unmapped)
                keys.append(key)
                ids_col.append(list(ids))
                unm_col.append(unmapped)
            writer.write_table(pa.table([keys, ids_col, unm_col], schema=schema))
    tmp.replace(out_path)
    return {"rows": n_rows, "tags": n_tags, "mapped_tags": n_mapped,
            "unmapped_tags": n_tags - n_mapped, "rows_without_labels": n_empty,
            "top_unmapped": unmapped_freq.most_common(top_k), "out": str(out_path)}
