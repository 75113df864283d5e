"""DVC reruns exactly the stages downstream of a changed param.

Fast(er) test: the repo's dvc.yaml, .dvc/config and code in a fresh git repo with the tiny
params, stage commands replaced by a script whose outputs hash the stage's params and input
files (so the real dvc.yaml graph decides what reruns). End-to-end test: on a private copy of
the session's tiny pipeline run (tests/conftest.py ``tiny_pipeline``, made by Dagster in the same
repo layout), ``dvc repro`` runs the real stage commands: the stages up to the preliminary model
reproduce the Dagster run's data byte for byte, and a param change reruns only downstream.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _pipeline import copy_pipeline, make_dvc_repo, subprocess_env

from orchestration.pipeline import STAGES, downstream

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, timeout: int = 120) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(BIN), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def make_copy(tmp_path: Path) -> Path:
    """dvc.yaml + .dvc/config + code + tiny params in a new git repo (``tmp_path/repo``)."""
    return make_dvc_repo(tmp_path / "repo")


def dry_run_stages(repo: Path) -> list[str]:
    out = _run([str(BIN / "dvc"), "repro", "--dry"], repo)
    return re.findall(r"Running stage '([^']+)'", out)


def set_param(repo: Path, section: str, key: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


FAKE_STAGE = """
import hashlib, json, sys
from pathlib import Path
import yaml

name = sys.argv[1]
params = yaml.safe_load(open("params.yaml"))
stage = yaml.safe_load(open("dvc.yaml"))["stages"][name]
root = params["paths"]["data_root"]
h = hashlib.sha256(json.dumps([params.get(p) for p in stage["params"]], sort_keys=True).encode())
for dep in stage["deps"]:
    path = Path(dep.replace("${paths.data_root}", root))
    if path.is_dir() and str(path).startswith(root):
        for f in sorted(path.rglob("*")):
            if f.is_file():
                h.update(f.read_bytes())
for kind in ("outs", "metrics", "plots"):
    for entry in stage.get(kind, []):
        path = Path((next(iter(entry)) if isinstance(entry, dict) else entry).replace("${paths.data_root}", root))
        if path.suffix == ".json":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"hash": h.hexdigest()}))
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "out.txt").write_text(h.hexdigest())
"""


def fake_stage_commands(repo: Path) -> None:
    """Replace each ``ramflow stage NAME`` by a cheap script whose outputs hash its inputs."""
    (repo / "fake_stage.py").write_text(FAKE_STAGE)
    text = (repo / "dvc.yaml").read_text()
    text = re.sub(r"cmd: ramflow stage (\w+)", rf"cmd: {sys.executable} fake_stage.py \1", text)
    (repo / "dvc.yaml").write_text(text)


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow  # a real dvc repro of 11 stages, twice
@pytest.mark.parametrize("section,key,value", [
    ("engine", "margin", 0.2),
    ("label_system", "min_freq", 2),
])
def test_param_change_reruns_only_downstream(tmp_path, section, key, value):
    """Real ``dvc repro`` of the real dvc.yaml graph, with stage bodies that only hash inputs."""
    repo = make_copy(tmp_path)
    fake_stage_commands(repo)
    assert ran_stages(_run([str(BIN / "dvc"), "repro"], repo)) == {s.name for s in STAGES}
    assert dry_run_stages(repo) == [], "everything is up to date after a repro"
    set_param(repo, section, key, value)
    changed = [s.name for s in STAGES if section in s.params]   # engine: both engine rounds
    assert dry_run_stages(repo) == changed
    assert ran_stages(_run([str(BIN / "dvc"), "repro"], repo)) == set(changed).union(*map(downstream, changed))


def _digests(root: Path, folders: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file below ``root/folder`` (``raw/summary.json`` without its absolute ``root``)."""
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                if path.relative_to(root).as_posix() == "raw/summary.json":
                    data = json.dumps({k: v for k, v in json.loads(data).items() if k != "root"}, sort_keys=True).encode()
                out[path.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


UP_TO_MODEL = ("raw_pairs", "parsed_tags", "label_system", "preliminary_model")


@pytest.mark.slow
def test_dvc_repro_reproduces_the_dagster_run_then_only_downstream(tiny_pipeline, tmp_path):
    """On a copy of the session's Dagster run: ``dvc repro preliminary_model`` runs its four stages
    through dvc.yaml's commands and writes the same data the Dagster run wrote; DVC then takes
    the run's other outputs as they are (``dvc commit``: every declared out exists) and is up to
    date; a param change reruns the changed stage and only stages downstream of it."""
    repo = copy_pipeline(tiny_pipeline, tmp_path)
    # the rerun's model may score below the first one: let the gate promote it anyway
    # (the gate itself is tested in test_orchestration.py)
    set_param(repo, "registry", "tolerance", 1.0)
    data_folders = ("raw", "parsed", "label_system", "labels")
    dagster_data = _digests(repo / "data", data_folders)
    dagster_model = json.loads((repo / "data" / "models" / "preliminary_model" / "train_result.json").read_text())
    assert dagster_data and dagster_model["mlflow_run_id"]

    out = _run([str(BIN / "dvc"), "repro", "preliminary_model"], repo, timeout=1500)
    assert ran_stages(out) == set(UP_TO_MODEL)
    assert _digests(repo / "data", data_folders) == dagster_data, "DVC and Dagster write the same data"
    dvc_model = json.loads((repo / "data" / "models" / "preliminary_model" / "train_result.json").read_text())
    assert dvc_model["mlflow_run_id"] != dagster_model["mlflow_run_id"], "trained again by the DVC stage"
    assert dvc_model["metrics"]["steps"] == dagster_model["metrics"]["steps"] >= 1

    _run([str(BIN / "dvc"), "commit", "--force"], repo)
    assert dry_run_stages(repo) == [], "everything is up to date after the commit"
    set_param(repo, "engine", "margin", 0.2)
    assert dry_run_stages(repo) == ["engine_cleaned_data", "engine_refined_data"]
    ran = ran_stages(_run([str(BIN / "dvc"), "repro"], repo, timeout=1500))
    assert "engine_cleaned_data" in ran and ran <= {"engine_cleaned_data"} | downstream("engine_cleaned_data")
    for name in ran:
        assert json.loads((repo / "data" / "reports" / f"{name}.json").read_text())["stage"] == name
    assert dry_run_stages(repo) == []
