"""The session's one tiny pipeline run, and copies of it for tests that change what they read.

:func:`run_tiny_pipeline` lays out a DVC repository (dvc.yaml, .dvc/config, the code, the TINY
profile as params.yaml, ``data_root: data``) and materializes every asset in it with the
in-process Dagster run ``ramflow run`` uses. tests/conftest.py runs it once per session
(``tiny_pipeline``); the Dagster, ``dvc repro``, serving and browser tests read it, and a test
that writes (a second registration, a param change, a UI backfill) works on
:func:`copy_pipeline`'s copy instead, so no test sees another's changes.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestration.pipeline import code_packages

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "orchestration" / "profiles" / "tiny.yaml"


@dataclass
class TinyPipeline:
    repo: Path           # the DVC repository (git init'ed) holding params.yaml and data/
    params: Path         # repo/params.yaml (TINY profile, data_root: data)
    result: Any          # dagster ExecuteInProcessResult
    parent: str          # the MLflow pipeline (parent) run id
    env: Any             # orchestration.settings.StageEnv (data_root = repo/data)
    instance: Any        # the ephemeral DagsterInstance the run used
    outputs: dict | None = None  # _golden.digest of data/ right after the run (later tests may rewrite it)

    @property
    def data_root(self) -> Path:
        return self.repo / "data"


def make_dvc_repo(dst: Path, **sections: dict) -> Path:
    """dvc.yaml + .dvc/config + code + the TINY params (``sections`` merged over it) in a new git repo."""
    dst.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", "pyproject.toml"):
        shutil.copy2(REPO / name, dst / name)
    (dst / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", dst / ".dvc" / "config")
    shutil.copy2(REPO / ".dvc" / ".gitignore", dst / ".dvc" / ".gitignore")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in code_packages():  # every package a stage's dvc.yaml code deps name (the stage table)
        shutil.copytree(REPO / pkg, dst / pkg, ignore=ignore)
    params = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    params["paths"]["data_root"] = "data"
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    (dst / ".gitignore").write_text("/data/mlflow\n/data/.locks\n/dvc_remote/\n", encoding="utf-8")
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def run_tiny_pipeline(tmp: Path) -> TinyPipeline:
    """Every asset of the TINY profile, one in-process Dagster run (what ``ramflow run`` does)."""
    import dagster as dg

    from orchestration.stage_cli import run_pipeline

    home = tmp / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    repo = make_dvc_repo(tmp / "repo")
    instance = dg.DagsterInstance.ephemeral()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        result, parent, env = run_pipeline(repo / "params.yaml", data_root=str(repo / "data"),
                                           instance=instance, raise_on_error=False)
    from _golden import digest

    outputs = digest(repo / "data") if result.success else None
    return TinyPipeline(repo, repo / "params.yaml", result, parent, env, instance, outputs)


def relocate_mlflow_store(db: Path, old: Path, new: Path) -> int:
    """Point a copied MLflow sqlite store at its new folder: every text cell that names ``old``
    (experiment artifact locations, run artifact uris, model version sources) names ``new``.
    Returns the number of cells changed."""
    changed = 0
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")') if "CHAR" in r[2].upper()
                    or "TEXT" in r[2].upper()]
            for col in cols:
                cur = con.execute(f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) WHERE instr("{col}", ?) > 0',
                                  (str(old), str(new), str(old)))
                changed += cur.rowcount
    return changed


def copy_pipeline(run: TinyPipeline, dst: Path) -> Path:
    """A private copy of the session's repository (code, params, data, MLflow store); returns
    the copy's repo folder. Its MLflow store points at the copy's own artifacts."""
    new = dst / "repo"
    shutil.copytree(run.repo, new, symlinks=True)
    db = new / "data" / "mlflow" / "mlflow.db"
    assert relocate_mlflow_store(db, run.data_root.resolve(), (new / "data").resolve()) > 0
    return new


def stage_env(repo: Path):
    """The StageEnv of a repository laid out by :func:`make_dvc_repo` (data below repo/data)."""
    from orchestration.settings import StageEnv

    return StageEnv.from_params(repo / "params.yaml", data_root=str(repo / "data"))


def subprocess_env(bin_dir: Path) -> dict[str, str]:
    """The environment the CLI subprocesses of these tests run with (venv bin first on PATH)."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAMFLOW_PARAMS", None)
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env
