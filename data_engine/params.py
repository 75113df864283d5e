"""Load ``params.yaml`` and turn one section into a stage's pydantic config.

Every stage (DVC, Dagster, CLI) reads its settings through :func:`stage_config`, so a
value changed in ``params.yaml`` means the same thing wherever the stage runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

ConfigT = TypeVar("ConfigT", bound=BaseModel)

PARAMS_ENV = "RAMFLOW_PARAMS"


def default_params_path() -> Path:
    """``$RAMFLOW_PARAMS`` if set, else ``params.yaml`` in the working directory."""
    return Path(os.environ.get(PARAMS_ENV, "params.yaml"))


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read the whole params file; a missing file means "all defaults"."""
    path = Path(path) if path is not None else default_params_path()
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of stage sections, got {type(data).__name__}")
    return data


def stage_config(
    cls: type[ConfigT],
    section: str,
    path: str | os.PathLike | None = None,
    **overrides: Any,
) -> ConfigT:
    """Validate ``params[section]`` (plus keyword overrides) into ``cls``."""
    values = dict(load_params(path).get(section) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls.model_validate(values)
