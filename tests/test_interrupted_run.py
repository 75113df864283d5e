"""Ctrl-C during ``ramflow run`` leaves no half-written stage, and a rerun continues from the
last finished stage.

``ramflow run`` on the TINY profile (fresh data root in tmp_path) runs in its own process
group; once the preliminary model has written its first checkpoint, the group gets SIGINT (what
a terminal's Ctrl-C sends). Then: the process has exited with a failure; every stage with a
report (the finished ones) has exactly the outputs it wrote; the interrupted stage and those
after it have no report, and the model folder has no result file (only complete checkpoints).
The rerun finishes the pipeline without touching the finished stages' files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _pipeline import TINY, subprocess_env

from orchestration.pipeline import STAGE_NAMES, report_path, stage_spec

BIN = Path(sys.executable).parent


def _params(tmp_path: Path) -> Path:
    """The TINY profile; the preliminary model trains long enough to be interrupted, resuming
    from its checkpoints as the shipped recipe does."""
    params = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    params["paths"]["data_root"] = str(tmp_path / "data")
    prelim = dict(params["preliminary_model"])
    prelim.update(max_steps=60, checkpoint_every=2)
    prelim.pop("resume", None)
    params["preliminary_model"] = prelim
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def _files(root: Path, stage: str) -> dict[str, int]:
    """mtime_ns of every file a stage wrote (its outs and its report)."""
    found = {report_path(root, stage).relative_to(root).as_posix(): report_path(root, stage).stat().st_mtime_ns}
    for out in stage_spec(stage).outs:
        for path in (root / out).rglob("*"):
            if path.is_file():
                found[path.relative_to(root).as_posix()] = path.stat().st_mtime_ns
    return found


def _run_cmd(tmp_path: Path, params: Path) -> list[str]:
    return [str(BIN / "ramflow"), "run", "--params", str(params), "--dagster-home", str(tmp_path / "dagster_home")]


@pytest.mark.slow  # two ramflow run subprocesses of the tiny pipeline
def test_ctrl_c_during_training_then_rerun_continues_from_the_last_finished_stage(tmp_path):
    from orchestration.stages import _tree_digest

    params, root = _params(tmp_path), tmp_path / "data"
    checkpoints = root / "models" / "preliminary_model" / "checkpoints"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(_run_cmd(tmp_path, params), cwd=tmp_path, env=subprocess_env(BIN), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 900  # start-up wait limit, not a timing check
            while not (checkpoints.is_dir() and any(checkpoints.glob("step_*"))):
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                if time.time() > deadline:
                    pytest.fail("no checkpoint of the preliminary model appeared")
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=120)  # exits on its own after Ctrl-C (the limit only stops a hang)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert rc != 0, first_log[-3000:]

    finished = [s for s in STAGE_NAMES if report_path(root, s).exists()]
    assert finished == ["raw_pairs", "parsed_tags", "label_system"], first_log[-3000:]
    for stage in finished:  # complete: exactly the outputs the stage recorded when it finished
        report = json.loads(report_path(root, stage).read_text())
        assert report["outputs"] == _tree_digest(root, stage_spec(stage).outs), stage
    model = root / "models" / "preliminary_model"
    assert not (model / "train_result.json").exists() and not (model / "model.pt").exists()
    for step in checkpoints.glob("step_*"):  # every checkpoint folder is a complete one
        assert (step / "trainer_state.json").is_file(), sorted(p.name for p in step.iterdir())
    assert not any(p.exists() for s in STAGE_NAMES[4:] for p in map(lambda o: root / o, stage_spec(s).outs))
    before = {stage: _files(root, stage) for stage in finished}

    rerun = subprocess.run(_run_cmd(tmp_path, params), cwd=tmp_path, env=subprocess_env(BIN),
                           capture_output=True, text=True, timeout=1800)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-5000:]
    assert "pipeline SUCCEEDED" in out
    for stage in finished:
        assert _files(root, stage) == before[stage], f"{stage} was recomputed"
        assert f"stage {stage} is up to date" in out
    assert all(report_path(root, s).exists() for s in STAGE_NAMES)
    result = json.loads((model / "train_result.json").read_text())
    assert result["metrics"]["steps"] == 60


def test_a_finished_stage_is_not_run_again_until_its_inputs_or_outputs_change(tmp_path):
    """run_stage's own rule, on the cheapest stage (raw_pairs of the TINY corpus)."""
    from orchestration.settings import StageEnv
    from orchestration.stages import run_stage

    params = _params(tmp_path)
    env = StageEnv.from_params(params)
    first = run_stage("raw_pairs", env)
    report = report_path(env.data_root, "raw_pairs")
    files = _files(env.data_root, "raw_pairs")
    again = run_stage("raw_pairs", env)
    assert again.details.get("up_to_date") and again.metrics == first.metrics
    assert _files(env.data_root, "raw_pairs") == files, "nothing rewritten"

    shard = next((env.data_root / "raw" / "test").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-512])  # an output changed since: the stage runs again
    assert not run_stage("raw_pairs", env).details.get("up_to_date")
    assert run_stage("raw_pairs", env).details.get("up_to_date")
    assert not run_stage("raw_pairs", env, overrides={"corpus": {"seed": 0}}).details.get("up_to_date")

    data = yaml.safe_load(params.read_text())
    data["corpus"]["seed"] = 1  # a param of the stage changed
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    mtime = report.stat().st_mtime_ns
    assert not run_stage("raw_pairs", env).details.get("up_to_date") and report.stat().st_mtime_ns != mtime
