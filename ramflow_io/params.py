"""Load ``params.yaml`` and turn one section into a stage's pydantic config.

Every stage (DVC, Dagster, CLI) reads its settings through :func:`stage_config`, so a
value changed in ``params.yaml`` means the same thing wherever the stage runs. The file is
the single source of pipeline settings: it must exist (a missing file is an error, never "all
defaults"), an explicit ``key: null`` means None, and every config forbids unknown keys, so
a misspelt key (``epoch: 3``) fails at load time with the section and the key named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)

PARAMS_ENV = "RAMFLOW_PARAMS"


class ParamsFileNotFoundError(FileNotFoundError):
    """The params file a stage was pointed at does not exist."""


def default_params_path() -> Path:
    """``$RAMFLOW_PARAMS`` if set, else ``params.yaml`` in the working directory."""
    return Path(os.environ.get(PARAMS_ENV, "params.yaml"))


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read the whole params file (``path``, else :func:`default_params_path`).

    Raises :class:`ParamsFileNotFoundError` when it does not exist: running a stage on code
    defaults because a path was mistyped would silently run another pipeline.
    """
    path = Path(path) if path is not None else default_params_path()
    if not path.is_file():
        raise ParamsFileNotFoundError(
            f"params file not found: {path} (pass --params, or set ${PARAMS_ENV}; "
            f"working directory {Path.cwd()})")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of stage sections, got {type(data).__name__}")
    return data


def params_section(params: Mapping[str, Any], section: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``params[section]`` as a dict; a missing or empty (``section:``) section is ``{}``."""
    values = params.get(section)
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{path or 'params'}: section {section!r} must be a mapping of keys, "
                         f"got {type(values).__name__}")
    return dict(values)


def validate_section(cls: type[ConfigT], section: str, values: Mapping[str, Any],
                     path: str | os.PathLike | None = None) -> ConfigT:
    """``cls.model_validate(values)``; a failure is re-raised as a ``ValidationError`` whose
    title names the params file, the section and the config class, and whose locations start
    with the section (``preliminary_model.epoch: Extra inputs are not permitted``)."""
    try:
        return cls.model_validate(dict(values))
    except ValidationError as err:
        where = f"{path}: " if path is not None else ""
        errors = [{**e, "loc": (section, *e["loc"])} for e in err.errors()]
        raise ValidationError.from_exception_data(
            title=f"{where}section {section!r} ({cls.__name__})", line_errors=errors) from err


def stage_config(
    cls: type[ConfigT],
    section: str,
    path: str | os.PathLike | None = None,
    **overrides: Any,
) -> ConfigT:
    """Validate ``params[section]`` with keyword ``overrides`` over it into ``cls``.

    Every override is applied as given, None included (``max_images=None`` sets None): a
    caller with optional command-line flags passes only the flags that were set (see
    :func:`given`).
    """
    path = Path(path) if path is not None else default_params_path()
    values = params_section(load_params(path), section, path)
    values.update(overrides)
    return validate_section(cls, section, values, path)


def given(**flags: Any) -> dict[str, Any]:
    """The command-line flags that were set (argparse leaves the others None), as overrides."""
    return {k: v for k, v in flags.items() if v is not None}
