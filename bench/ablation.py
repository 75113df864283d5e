"""Ablation of the data engine: what each engine step buys in test mAP.

Pipeline (all measured in this run, on one data root with ingested splits, parsed labels and
the label system):

1. preliminary model: trained on parsed caption labels (``labels/pretrain.parquet``), or
   reused from ``models/preliminary_model`` with ``--reuse-preliminary``;
2. ONE engine pass over ``pretrain`` serving four variants (:func:`run_engine_variants`):
   ``full`` (the ``engine:`` params: adaptation, generation, cleaning), ``generation_only``,
   ``cleaning_only`` (cleaning of the parsed labels) and ``caption_parsing`` (``full`` plus
   the tags parsed from the captioning branch's captions); with ``adapt_epochs`` the pass
   first fine-tunes the engine's model (``engine/engine_model``), which gets a row too;
3. retrain on the ``union_label_ids`` of ``full``, ``generation_only`` and ``cleaning_only``
   (the ``retrained_model`` recipe), and once more on ``full`` with the model's captioning branch
   off (``caption=false``: the Tag2Text joint task removed, RAM's "captioning" ablation);
   "engine off" retrains on the parsed labels with the same recipe, so that every retrained
   row has the same steps whatever the preliminary model's own budget was. The engine's
   ``caption_parsing`` variant is reported with its label precision/recall only;
4. fine-tune every retrained model on ``finetune`` (the ``finetuned_model`` recipe);
5. evaluate every model on ``test`` and write one table (markdown + JSON):
   preliminary, retrained (= "no fine-tune"), fine-tuned, and the ablations engine off,
   generation only, cleaning only, captioning branch off, with the engine's training-label
   precision/recall against truth next to each.

Training settings come from params.yaml (``preliminary_model``, ``retrained_model``,
``finetuned_model``); ``--train-set key=value`` / ``--finetune-set key=value`` override them
(e.g. ``--train-set epochs=2`` to keep the whole ablation near 30 minutes on 2 CPU cores).

Usage::

    .venv/bin/python bench/ablation.py --root data --out-dir bench/results/ablation \\
        --reuse-preliminary --train-set epochs=3 --finetune-set epochs=2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ramflow_io import formats  # noqa: E402
from engine_rounds import EngineConfig, run_engine_variants  # noqa: E402
from ramflow_io.params import stage_config  # noqa: E402

log = logging.getLogger("ablation")

VARIANTS: dict[str, dict] = {
    "full": {},
    "generation_only": {"cleaning": False},
    "cleaning_only": {"generation": False},
    "caption_parsing": {"captioning": True},
}

ROWS: list[tuple[str, str, str]] = [
    # (row name, model id, what it is)
    ("preliminary", "preliminary", "parsed caption labels, no engine, no fine-tune"),
    ("engine model", "engine_model", "preliminary adapted on the non-held-out half of finetune (engine only)"),
    ("retrained (no fine-tune)", "retrained_full", "full engine labels, no fine-tune"),
    ("fine-tuned", "finetuned_full", "full engine labels + fine-tune (the pipeline's model)"),
    ("ablation: engine off", "finetuned_engine_off", "parsed labels, retrain recipe + fine-tune"),
    ("ablation: generation only", "finetuned_generation_only", "generation, no cleaning + fine-tune"),
    ("ablation: cleaning only", "finetuned_cleaning_only", "cleaning of parsed labels + fine-tune"),
    ("ablation: captioning branch off", "finetuned_caption_off",
     "full engine labels, model trained without its caption branch + fine-tune"),
    ("engine with caption parsing", None, "labels only: full + tags parsed from generated captions"),
]
ENGINE_OF = {"retrained_full": "full", "finetuned_full": "full", "finetuned_generation_only": "generation_only",
             "finetuned_cleaning_only": "cleaning_only", "finetuned_caption_off": "full"}
RETRAINED = {  # retrained model -> (engine variant of its labels, extra training overrides)
    "full": ("full", {}),
    "generation_only": ("generation_only", {}),
    "cleaning_only": ("cleaning_only", {}),
    "caption_off": ("full", {"caption": False}),
}


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"override {pair!r} is not key=value")
        out[key] = yaml.safe_load(value)
    return out


def _train(stage: str, params, overrides: dict, root: Path, out_dir: Path, labels: Path, init_from: Path | None):
    from ram_model.train_stage import TrainStageConfig, train_stage

    cfg = stage_config(TrainStageConfig, stage, params, **overrides)
    t0 = time.perf_counter()
    result = train_stage(cfg, root, out_dir, labels, init_from, None)
    log.info("trained %s in %.0fs -> %s", out_dir.name, time.perf_counter() - t0, result.checkpoint)
    return out_dir, time.perf_counter() - t0


def _evaluate(models: dict[str, Path], root: Path, out_dir: Path) -> dict[str, dict]:
    """Test metrics per model (``mAP``, ``mAP_trained``, micro/macro P/R/F1). Each training stage
    already scored its model on ``test`` (``train_result.json``); only a folder without those
    figures is evaluated here."""
    from ram_model import evaluate as ev
    from ram_model.registry import load_model

    out = {}
    for name, path in models.items():
        result = Path(path) / "train_result.json"
        metrics = json.loads(result.read_text(encoding="utf-8")).get("metrics", {}) if result.exists() else {}
        test = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
        out[name] = test if "mAP" in test else ev.evaluate_split(load_model(path), root, "test")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    cols = ["row", "test_mAP", "test_mAP_trained", "test_F1", "label_precision", "label_recall", "train_s", "what"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    md = out_dir / "ablation.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    js = out_dir / "ablation.json"
    js.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return md, js


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("data"))
    ap.add_argument("--params", default=None)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results/ablation"))
    ap.add_argument("--reuse-preliminary", action="store_true", help="use models/preliminary_model if present")
    ap.add_argument("--preliminary", type=Path, help="use this trained preliminary model folder")
    ap.add_argument("--train-set", nargs="*", default=[], help="retrain overrides key=value")
    ap.add_argument("--finetune-set", nargs="*", default=[], help="fine-tune overrides key=value")
    ap.add_argument("--engine-set", nargs="*", default=[], help="engine overrides key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out, root = args.out_dir, args.root
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train_o, ft_o = parse_overrides(args.train_set), parse_overrides(args.finetune_set)
    models: dict[str, Path] = {}
    train_s: dict[str, float] = {}

    prelim = args.preliminary or formats.model_dir(root, "preliminary_model")
    if not ((args.reuse_preliminary or args.preliminary) and prelim.exists()):
        prelim, train_s["preliminary"] = _train("preliminary_model", args.params, train_o, root,
                                                out / "models" / "preliminary", formats.labels_path(root, "pretrain"),
                                                None)
    models["preliminary"] = prelim

    base = stage_config(EngineConfig, "engine", args.params, **parse_overrides(args.engine_set))
    variants = {name: base.model_copy(update=upd) for name, upd in VARIANTS.items()}
    engine = run_engine_variants(
        prelim, root, "pretrain", formats.labels_path(root, "pretrain"), formats.label_system_dir(root), variants,
        {n: out / "engine" / f"{n}.parquet" for n in variants}, {n: out / "engine_report" / n for n in variants})
    adapted = engine["full"].generation.get("adapted_model")
    if adapted:
        models["engine_model"] = Path(adapted)

    finetune_labels = formats.labels_path(root, "finetune")
    retrained = {}
    for name, (variant, extra) in {"engine_off": (None, {}), **RETRAINED}.items():
        labels = formats.labels_path(root, "pretrain") if variant is None else Path(engine[variant].out_path)
        models[f"retrained_{name}"], train_s[f"retrained_{name}"] = _train(
            "retrained_model", args.params, {**train_o, **extra}, root, out / "models" / f"retrained_{name}",
            labels, None)
        retrained[name] = (models[f"retrained_{name}"], extra)
    for name, (init, extra) in retrained.items():
        models[f"finetuned_{name}"], train_s[f"finetuned_{name}"] = _train(
            "finetuned_model", args.params, {**ft_o, **extra}, root, out / "models" / f"finetuned_{name}",
            finetune_labels, init)

    wanted = {mid for _, mid, _ in ROWS if mid}
    metrics = _evaluate({k: v for k, v in models.items() if k in wanted}, root, out / "evaluation")
    parsed_m = engine["full"].metrics.get("parsed", {})
    rows = []
    for row, mid, what in ROWS:
        m = metrics.get(mid, {}) if mid else {}
        if mid is None:  # an engine variant no model was retrained on
            eng = engine["caption_parsing"].metrics.get("cleaned", {})
        elif mid == "engine_model":  # fine-tuned on the clean split: no pretrain labels of its own
            eng = {}
        else:
            eng = engine[ENGINE_OF[mid]].metrics.get("cleaned", {}) if mid in ENGINE_OF else parsed_m
        rows.append({
            "row": row, "model": mid, "what": what,
            "test_mAP": m.get("mAP"), "test_mAP_trained": m.get("mAP_trained"),
            "test_F1": m.get("micro_f1", m.get("F1")),
            "label_precision": eng.get("precision"), "label_recall": eng.get("recall"),
            "train_s": train_s.get(mid),
        })
    md, js = write_table(rows, out)
    (out / "engine_variants.json").write_text(
        json.dumps({n: r.model_dump() for n, r in engine.items()}, indent=2), encoding="utf-8")
    print(md.read_text())
    print(f"total {time.perf_counter() - t_start:.0f}s; table: {md}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
