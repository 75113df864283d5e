"""The tag sets of the released models, shipped as data under ``ram_model/resources/official/``.

RAM and RAM++: 4,585 tags (``ram_tag_list.txt``), their Chinese names and per-class thresholds
(``ram_tag_list_threshold.txt``); no tag is deleted by default. Tag2Text: 3,429 tags
(``tag2text_ori_tag_list.txt``), threshold 0.68 except three classes at 0.7, and seven tags the
official code never outputs (they disturb captioning: ``delete_tag_index``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESOURCE_DIR = Path(__file__).resolve().parent.parent / "resources" / "official"

# official defaults (recognize-anything, ram/models/tag2text.py)
TAG2TEXT_THRESHOLD = 0.68
TAG2TEXT_CLASS_THRESHOLDS = {2701: 0.7, 2828: 0.7, 1167: 0.7}
TAG2TEXT_DELETE_TAG_INDEX = (127, 2961, 3351, 3265, 3338, 3355, 3359)
DELETED_THRESHOLD = 2.0  # above any probability: a deleted tag is never output (>= or >)

MODEL_NAMES = {"ram": "ram_official_swin_l_384", "ram_plus": "ram_plus_official_swin_l_384",
               "tag2text": "tag2text_official_swin_b_384"}


def unique_names(names: list[str]) -> list[str]:
    """ramflow needs unique tag names; Tag2Text's list repeats 114 (a noun and a verb or adjective
    sense, e.g. "perch"): the k-th repeat of a name becomes "name (k)" (k >= 2)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    if len(set(out)) != len(out):
        raise ValueError("tag names stay ambiguous after numbering repeats")
    return out


@dataclass(frozen=True)
class OfficialTagSet:
    """Tag names (English, Chinese when known), official thresholds and deleted tag indices.

    ``names`` are unique (see :func:`unique_names`); ``official_names`` are the list's own
    strings, which the official code prints."""

    names: tuple[str, ...]
    chinese: tuple[str, ...]
    thresholds: tuple[float, ...]
    delete_index: tuple[int, ...]
    official_names: tuple[str, ...] = ()

    def display_names(self) -> tuple[str, ...]:
        return self.official_names or self.names

    def official_tags(self, probs) -> list[str]:
        """Per row of probabilities ``[B, C]``: the official output string "a | b | c" (a tag is kept
        when its probability is strictly above its threshold and it is not deleted)."""
        import torch  # lazy: torch; resources loads light for the CLI

        keep = torch.as_tensor(probs) > torch.tensor(self.thresholds, dtype=torch.float32)
        if self.delete_index:
            keep[:, list(self.delete_index)] = False
        names = self.display_names()
        return [" | ".join(names[i] for i in torch.nonzero(row).flatten().tolist()) for row in keep]

    def served_thresholds(self) -> list[float]:
        """Thresholds as ramflow stores them: deleted tags get one no probability reaches."""
        out = list(self.thresholds)
        for i in self.delete_index:
            out[i] = DELETED_THRESHOLD
        return out


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (``splitlines``, as the official loader reads them)."""
    return path.read_text(encoding="utf-8").splitlines()


def official_tag_set(arch: str, resource_dir: Path = RESOURCE_DIR) -> OfficialTagSet:
    """The shipped tag set of ``arch`` ("ram", "ram_plus", "tag2text")."""
    if arch in ("ram", "ram_plus"):
        names = read_lines(resource_dir / "ram_tag_list.txt")
        chinese = read_lines(resource_dir / "ram_tag_list_chinese.txt")
        thresholds = [float(s.strip()) for s in read_lines(resource_dir / "ram_tag_list_threshold.txt")]
        if not len(names) == len(chinese) == len(thresholds):
            raise ValueError(f"RAM tag files disagree: {len(names)} names, {len(chinese)} Chinese names, "
                             f"{len(thresholds)} thresholds")
        return OfficialTagSet(tuple(names), tuple(chinese), tuple(thresholds), ())
    if arch == "tag2text":
        names = read_lines(resource_dir / "tag2text_ori_tag_list.txt")
        thresholds = [TAG2TEXT_THRESHOLD] * len(names)
        for index, value in TAG2TEXT_CLASS_THRESHOLDS.items():
            thresholds[index] = value
        return OfficialTagSet(tuple(unique_names(names)), (), tuple(thresholds), TAG2TEXT_DELETE_TAG_INDEX,
                              tuple(names))
    raise ValueError(f"unknown official arch {arch!r} (known: {', '.join(MODEL_NAMES)})")


def key_list(arch: str, resource_dir: Path = RESOURCE_DIR) -> dict[str, tuple[int, ...]]:
    """The released checkpoint's keys and shapes (``*_state_dict_keys.txt``: key, shape, dtype)."""
    rows = {}
    for line in read_lines(resource_dir / f"{arch}_state_dict_keys.txt"):
        if not line or line.startswith("#") or "\t" not in line:
            continue
        key, shape, _ = line.split("\t")
        rows[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return rows
