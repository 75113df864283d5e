"""DVC reruns exactly the stages downstream of a changed param.

The repo's dvc.yaml, .dvc/config and code are copied into a fresh git repo in tmp_path with
the tiny params. Fast test: stage commands replaced by a script whose outputs hash the stage's
params and input files (so the real dvc.yaml graph decides what reruns). Slow test: a real
tiny ``dvc repro`` of all stages, then a param change.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestration.pipeline import STAGES, downstream

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "orchestration" / "profiles" / "tiny.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAMFLOW_PARAMS", None)
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 120) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def make_copy(tmp_path: Path) -> Path:
    """dvc.yaml + .dvc/config + code + tiny params in a new git repo."""
    dst = tmp_path / "repo"
    dst.mkdir()
    for name in ("dvc.yaml", ".dvcignore", "pyproject.toml"):
        shutil.copy2(REPO / name, dst / name)
    (dst / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", dst / ".dvc" / "config")
    shutil.copy2(REPO / ".dvc" / ".gitignore", dst / ".dvc" / ".gitignore")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("data_engine", "ram_model", "orchestration"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=ignore)
    params = yaml.safe_load(TINY.read_text())
    params["paths"]["data_root"] = "data"
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dst / ".gitignore").write_text("/data/mlflow\n/data/.locks\n/dvc_remote/\n")
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


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


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_only_downstream(tmp_path):
    """A real tiny ``dvc repro`` (all 11 stages), then a param change reruns only downstream."""
    repo = make_copy(tmp_path)
    # the rerun's model may score below the first one: let the gate promote it anyway
    # (the gate itself is tested in test_orchestration.py)
    set_param(repo, "registry", "tolerance", 1.0)
    out = _run([str(BIN / "dvc"), "repro"], repo, timeout=1500)
    for spec in STAGES:
        assert f"Running stage '{spec.name}'" in out
        assert (repo / "data" / "reports" / f"{spec.name}.json").exists()
    assert dry_run_stages(repo) == []
    set_param(repo, "engine", "margin", 0.2)
    assert dry_run_stages(repo) == ["engine_cleaned_data", "engine_refined_data"]
    ran = ran_stages(_run([str(BIN / "dvc"), "repro"], repo, timeout=1500))
    assert "engine_cleaned_data" in ran and ran <= {"engine_cleaned_data"} | downstream("engine_cleaned_data")
