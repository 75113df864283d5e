"""``make bench`` on a fresh clone: a benchmark whose input data is absent exits 77 (skipped,
bench/_skip.py) with the missing path and the flag that gives it, never a failure."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIPPED = 77


@pytest.mark.parametrize(("bench", "args", "missing"), [
    ("bench_coco_tags.py", ["--data", "{tmp}/coco_caption_objects.jsonl"], "--data"),
    ("bench_parse_quality.py", ["--harness", "{tmp}/parse_eval"], "--harness"),
    ("bench_parse_speed.py", ["--captions", "{tmp}/captions.json"], "--captions"),
    ("bench_official.py", ["--shared", "{tmp}/shared"], "--weights"),
    ("bench_engine.py", ["--root", "{tmp}/data"], "make run"),
    ("bench_ingest.py", ["{tmp}/coco_dev", "--embedded", "0"], "DATA"),
])
def test_a_benchmark_without_its_data_is_skipped(tmp_path, bench, args, missing):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "bench" / bench), *(a.format(tmp=tmp_path) for a in args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == SKIPPED, proc.stderr[-2000:]
    assert "skipped" in proc.stderr and str(tmp_path) in proc.stderr and missing in proc.stderr


def test_make_bench_counts_exit_77_as_skipped_and_anything_else_as_failed():
    """The Makefile's bench loop: the status bench/_skip.py uses is the one it lists as skipped."""
    spec = importlib.util.spec_from_file_location("bench_skip", REPO / "bench" / "_skip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    used = module.SKIPPED
    recipe = (REPO / "Makefile").read_text(encoding="utf-8").split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert used == SKIPPED and f"[ $$rc = {SKIPPED} ]" in recipe and "exit 1" in recipe
