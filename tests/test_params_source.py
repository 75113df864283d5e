"""params.yaml is the single source of pipeline settings.

- every section validates under its config, and every config forbids unknown keys, so a
  misspelt key fails at load time with the section and the key named;
- each value in params.yaml equals its config class's default (the defaults exist for
  library use only), apart from the short, explained ``ALLOWED`` list below;
- ``key: null`` means None; a missing params file is an error;
- the training backend is the section's ``backend:`` (an old ``engine:`` key is told to rename);
  a launcher asking for another one fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from data_engine.corpus.config import CorpusConfig
from engine_rounds import EngineConfig
from ramflow_io.params import ParamsFileNotFoundError, load_params, stage_config
from orchestration.settings import (BackendConflictError, LauncherSettings, StageEnv, params_configs,
                                    training_backend, validate_params)
from ram_model.trainer import TrainStageConfig

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
PROFILES = sorted((REPO / "orchestration" / "profiles").glob("*.yaml"))
SECTION_CONFIGS: dict[str, type[BaseModel]] = params_configs()  # params.yaml section -> its config

# Values of params.yaml allowed to differ from the config default. (section or "*", key or "*") -> reason.
ALLOWED: dict[tuple[str, str], str] = {
    ("engine_refined", "*"): "the second engine round's settings over engine: (overrides by design)",
    ("*", "clean_mix"): "names a split of the pipeline's data layout: library training mixes nothing in",
    ("*", "missing_label_rejection"): "per label source (parsed 0.02, engine labels 0.015): library default off",
    ("*", "model_overrides"): "arguments of the named model: a default would be passed to any model",
    ("*", "open_set_tags"): "the embedded corpus' held-out classes: library evaluation has no open set",
    ("*", "init_from"): "the model a later stage continues from: library training starts from scratch",
    # the training defaults are the preliminary_model recipe; the later stages differ from it on purpose
    **{(s, "max_steps"): "continues the model before it: fewer steps than a training from scratch"
       for s in ("retrained_model", "refined_model")},
    **{(s, "caption"): "the served lineage (refined -> finetuned) learns and keeps the caption branch"
       for s in ("refined_model", "finetuned_model")},
    **{("finetuned_model", k): "the short fine-tune on the small clean split"
       for k in ("splits", "epochs", "lr", "warmup_steps", "checkpoint_every", "num_workers")},
}


def _allowed(section: str, key: str) -> bool:
    return any(k in ALLOWED for k in ((section, key), (section, "*"), ("*", key)))


def _plain(value: Any) -> Any:
    """A config value as params.yaml writes it (models as dicts, tuples as lists)."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def test_every_params_section_has_a_config():
    assert set(load_params(PARAMS)) == set(SECTION_CONFIGS)


def test_params_yaml_values_are_the_config_defaults():
    params = load_params(PARAMS)
    disagreements = []
    for section, cls in SECTION_CONFIGS.items():
        defaults = cls()
        for key, value in (params.get(section) or {}).items():
            if key not in cls.model_fields:
                disagreements.append(f"{section}.{key}: not a field of {cls.__name__}")
            elif _plain(getattr(defaults, key)) != value and not _allowed(section, key):
                disagreements.append(f"{section}.{key}: params.yaml {value!r}, "
                                     f"{cls.__name__} default {_plain(getattr(defaults, key))!r}")
    assert not disagreements, "params.yaml and the code defaults disagree:\n" + "\n".join(disagreements)


def test_the_allow_list_holds_only_real_differences():
    """An entry whose values have come to agree (or whose key is gone) is removed, not kept."""
    params = load_params(PARAMS)
    used = set()
    for section, cls in SECTION_CONFIGS.items():
        defaults = cls()
        for key, value in (params.get(section) or {}).items():
            if key in cls.model_fields and _plain(getattr(defaults, key)) != value:
                used |= {k for k in ((section, key), (section, "*"), ("*", key)) if k in ALLOWED}
    assert set(ALLOWED) == used, f"allow-list entries with nothing to allow: {sorted(set(ALLOWED) - used)}"


@pytest.mark.parametrize("params_file", [PARAMS, *PROFILES], ids=lambda p: p.name)
def test_every_section_validates_under_the_strict_configs(params_file):
    configs = validate_params(params_file)
    assert set(configs) == set(load_params(params_file))
    for section, cfg in configs.items():
        assert cfg == stage_config(SECTION_CONFIGS[section], section, params_file)


def test_a_section_no_stage_reads_fails(tmp_path):
    params = {**load_params(PARAMS), "finetune_model": {"epochs": 3}}
    with pytest.raises(ValueError, match=r"sections no stage reads: \['finetune_model'\]"):
        validate_params(_write(tmp_path, params))


def test_ramflow_run_fails_on_a_misspelt_key_before_any_stage_runs(tmp_path):
    """A typo in the last stage's section stops ``ramflow run`` at once, not after the stages before it."""
    from orchestration.stage_cli import run_pipeline

    params = load_params(PARAMS)
    params["finetuned_model"]["epoch"] = 3
    root = tmp_path / "data"
    with pytest.raises(ValidationError, match=r"finetuned_model\.epoch"):
        run_pipeline(_write(tmp_path, params), data_root=str(root))
    assert not root.exists()


@pytest.mark.parametrize(("section", "key", "value"), [
    ("preliminary_model", "epoch", 3),
    ("engine", "generation_precison", 0.9),
    ("corpus", "n_pretrian", 10),
    ("paths", "data_rot", "x"),
    ("evaluation", "treshold", 0.5),
])
def test_an_unknown_key_fails_naming_the_section_and_the_key(tmp_path, section, key, value):
    params = load_params(PARAMS)
    params[section] = {**(params.get(section) or {}), key: value}
    path = _write(tmp_path, params)
    with pytest.raises(ValidationError) as err:
        stage_config(SECTION_CONFIGS[section], section, path)
    text = str(err.value)
    assert f"{section}.{key}" in text and "Extra inputs are not permitted" in text
    assert str(path) in text


@pytest.mark.parametrize("section", ["preliminary_model", "retrained_model", "refined_model", "finetuned_model"])
def test_a_training_section_still_saying_engine_is_told_to_rename_it(tmp_path, section):
    """The training key was ``engine:`` before it became ``backend:``: an old params file fails
    at validation with the section named and the rename spelled out."""
    params = load_params(PARAMS)
    params[section]["engine"] = params[section].pop("backend")
    path = _write(tmp_path, params)
    with pytest.raises(ValidationError) as err:
        validate_params(path)
    text = str(err.value)
    assert section in text and str(path) in text
    assert "'engine: torch' is now called 'backend: torch'" in text and "rename the key" in text


def test_a_model_saved_with_the_old_engine_key_still_reads(tmp_path):
    """``train_config.json`` of a model trained before the rename says ``engine``: a later
    fine-tune (the data engine's adaptation) reads it as ``backend``."""
    import json

    from ram_model.train_stage import CONFIG_FILE, saved_train_config

    old = {**TrainStageConfig().model_dump(mode="json"), "engine": "deepspeed"}
    del old["backend"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old), encoding="utf-8")
    config = saved_train_config(tmp_path)
    assert "engine" not in config and TrainStageConfig.model_validate(config).backend == "deepspeed"


def test_an_unknown_nested_key_fails_too(tmp_path):
    params = load_params(PARAMS)
    params["preliminary_model"]["clean_mix"]["repat"] = 4
    with pytest.raises(ValidationError, match=r"preliminary_model\.clean_mix\.repat"):
        stage_config(TrainStageConfig, "preliminary_model", _write(tmp_path, params))


@pytest.mark.parametrize(("section", "key"), [
    ("engine", "max_images"), ("evaluation", "threshold"), ("retrained_model", "init_from"),
    ("engine", "generation_precision"), ("preliminary_model", "max_steps"),
])
def test_an_explicit_null_means_none(tmp_path, section, key):
    params = load_params(PARAMS)
    params[section][key] = None
    assert getattr(stage_config(SECTION_CONFIGS[section], section, _write(tmp_path, params)), key) is None


def test_a_null_in_an_overlay_section_overrides_the_base(tmp_path):
    """``engine_refined: {generation_precision: null}`` over ``engine:`` sets None (it was dropped)."""
    from orchestration.stages import engine_config

    params = load_params(PARAMS)
    params["engine_refined"] = {"generation_precision": None, "max_images": None}
    params["engine"]["max_images"] = 50
    env = StageEnv.from_params(_write(tmp_path, params), data_root=str(tmp_path / "data"))
    first, second = engine_config("engine_cleaned_data", env), engine_config("engine_refined_data", env)
    assert first.generation_precision == params["engine"]["generation_precision"] and first.max_images == 50
    assert second.generation_precision is None and second.max_images is None


@pytest.mark.parametrize(("section", "key"), [("preliminary_model", "epochs"), ("engine", "batch_size"),
                                              ("corpus", "n_test"), ("paths", "data_root")])
def test_a_null_where_none_is_invalid_fails_naming_the_key(tmp_path, section, key):
    params = load_params(PARAMS)
    params[section][key] = None
    with pytest.raises(ValidationError, match=rf"{section}\.{key}"):
        stage_config(SECTION_CONFIGS[section], section, _write(tmp_path, params))


def test_a_missing_params_file_is_an_error(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "params.yaml"
    with pytest.raises(ParamsFileNotFoundError, match=str(missing)):
        stage_config(CorpusConfig, "corpus", missing)
    monkeypatch.setenv("RAMFLOW_PARAMS", str(missing))
    with pytest.raises(FileNotFoundError, match="RAMFLOW_PARAMS"):
        load_params()


def test_library_use_needs_no_params_file(tmp_path, monkeypatch):
    """Configs built in code take their defaults; only reading params needs the file."""
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    monkeypatch.delenv("RAMFLOW_PARAMS", raising=False)
    assert TrainStageConfig(epochs=2).epochs == 2 and EngineConfig().batch_size == 32
    assert CorpusConfig(n_test=5).n_test == 5
    with pytest.raises(ParamsFileNotFoundError, match="params.yaml"):
        stage_config(CorpusConfig, "corpus")


def test_a_section_that_is_not_a_mapping_fails(tmp_path):
    path = _write(tmp_path, {"corpus": [1, 2]})
    with pytest.raises(ValueError, match="section 'corpus' must be a mapping"):
        stage_config(CorpusConfig, "corpus", path)


# --------------------------------------------------------------------------- training backend


@pytest.mark.parametrize(("params_backend", "mode", "expected"), [
    ("torch", None, "torch"), ("deepspeed", None, "deepspeed"), ("deepspeed", "deepspeed", "deepspeed"),
    ("torch", "deepspeed", None), ("deepspeed", "torch", None),
])
def test_training_backend_is_params_and_a_conflict_fails(params_backend, mode, expected):
    launcher = LauncherSettings(mode=mode)
    if expected is None:
        with pytest.raises(BackendConflictError, match=f"retrained_model.backend: {params_backend}"):
            training_backend("retrained_model", params_backend, launcher)
    else:
        assert training_backend("retrained_model", params_backend, launcher) == expected


@pytest.mark.parametrize(("params_backend", "mode"), [("torch", None), ("deepspeed", None), ("deepspeed", "deepspeed"),
                                                      ("torch", "deepspeed")])
def test_a_training_stage_runs_the_backend_params_set(tmp_path, monkeypatch, params_backend, mode):
    """The stage layer launches what ``<stage>.backend`` says; the launcher no longer replaces it."""
    from orchestration import stages
    from ram_model import train_stage as ts

    params = load_params(PARAMS)
    params["preliminary_model"]["backend"] = params_backend
    env = StageEnv.from_params(_write(tmp_path, params), data_root=str(tmp_path / "data"),
                               launcher=LauncherSettings(mode=mode))
    calls = []

    class Stop(Exception):
        pass

    def record(kind):
        def launch(cfg, *args, **kwargs):
            calls.append((kind, cfg.backend))
            raise Stop
        return launch

    monkeypatch.setattr(ts, "train_stage", record("in_process"))
    monkeypatch.setattr(ts, "launch_train_stage", record("torchrun"))
    monkeypatch.setattr(stages, "pipeline_run_id", lambda env: "parent")
    if mode is not None and mode != params_backend:
        with pytest.raises(BackendConflictError):
            stages.run_preliminary_model(env)
        assert calls == []
    else:
        with pytest.raises(Stop):
            stages.run_preliminary_model(env)
        assert calls == [("torchrun" if params_backend == "deepspeed" else "in_process", params_backend)]


def test_the_launcher_resource_leaves_the_backend_to_params():
    from orchestration.resources import TrainingLauncher

    assert TrainingLauncher().settings().mode is None
    assert TrainingLauncher(mode="deepspeed").settings().mode == "deepspeed"
    assert StageEnv.from_params(PARAMS).launcher.mode is None


@pytest.mark.parametrize(("params_backend", "flags", "expected"), [
    ("deepspeed", [], "deepspeed"), ("torch", [], "torch"), ("deepspeed", ["--backend", "torch"], "torch"),
])
def test_ramflow_train_takes_the_backend_from_params_unless_told(tmp_path, monkeypatch, params_backend, flags,
                                                                 expected):
    """``ramflow train``: the section's backend, an explicit ``--backend`` over it; ``--set k=null`` sets None."""
    from orchestration.cli import build_parser
    from ram_model import train_stage as ts

    params = load_params(PARAMS)
    params["retrained_model"]["backend"] = params_backend
    params["retrained_model"]["init_from"] = "models/preliminary_model"
    seen = []

    class Stop(Exception):
        pass

    def record(cfg, *args, **kwargs):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(ts, "train_stage", record)
    monkeypatch.setattr(ts, "launch_train_stage", record)
    args = build_parser().parse_args(["train", "retrained_model", "--params", str(_write(tmp_path, params)),
                                      "--data-root", str(tmp_path / "data"), *flags, "--set", "init_from=null"])
    with pytest.raises(Stop):
        args.func(args)
    (cfg,) = seen
    assert cfg.backend == expected and cfg.init_from is None
