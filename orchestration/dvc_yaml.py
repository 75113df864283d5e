"""``dvc.yaml`` generated from the stage table (:data:`.pipeline.STAGES`).

Every DVC stage runs ``ramflow stage NAME`` (the function Dagster's asset runs) and lists: the
code it runs (the table's ``code``, as repo paths), the outputs of its upstream stages, its
params sections (``paths`` too for a stage without upstream: it decides where the data root is),
its outputs, its report as metrics and, for stages that draw, ``plots/NAME``. ``ramflow dvc-yaml
--write`` rewrites the file; ``--check`` (and tests/test_stage_table.py) fails when the committed
file is not the generated one, so a change to the pipeline is made in the table only.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from .pipeline import STAGES, StageSpec, code_paths, stage_spec

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ROOT = "${paths.data_root}"
HEADER = """\
# GENERATED from the stage table in orchestration/pipeline.py by `ramflow dvc-yaml --write`:
# edit the table, not this file (tests/test_stage_table.py fails when they differ).
# Each stage runs the same stage function as its Dagster asset through `ramflow stage NAME`.
# Paths are below ${paths.data_root} (params.yaml); every stage writes its metrics to
# reports/NAME.json. Run with the venv's bin on PATH: `dvc repro`.
"""


class _IndentedDumper(yaml.SafeDumper):
    """Lists indented under their key (``deps:\\n  - a``), as dvc.yaml is usually written."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def dvc_stage(spec: StageSpec, base: Path = REPO) -> dict[str, Any]:
    """One stage of dvc.yaml."""
    upstream_outs: list[str] = []
    for name in spec.upstream:
        upstream_outs += [o for o in stage_spec(name).outs if o not in upstream_outs]
    stage: dict[str, Any] = {
        "cmd": f"ramflow stage {spec.name}",
        "deps": list(code_paths(spec, base)) + [f"{ROOT}/{o}" for o in upstream_outs],
        "params": (["paths"] if not spec.upstream else []) + list(spec.params),
        "outs": [f"{ROOT}/{o}" if spec.kind != "registry" else {f"{ROOT}/{o}": {"cache": False}}
                 for o in spec.outs],
        "metrics": [{f"{ROOT}/reports/{spec.name}.json": {"cache": False}}],
    }
    if spec.plots:
        stage["plots"] = [{f"{ROOT}/plots/{spec.name}": {"cache": False}}]
    return stage


def render(base: Path = REPO) -> str:
    """The text of dvc.yaml for the code below ``base``."""
    blocks = [textwrap.indent(yaml.dump({s.name: dvc_stage(s, base)}, Dumper=_IndentedDumper, sort_keys=False,
                                        default_flow_style=False, width=120), "  ")
              for s in STAGES]  # one block per stage, a blank line between them
    return HEADER + "stages:\n" + "\n".join(blocks)


def differences(path: Path, base: Path = REPO) -> list[str]:
    """Unified diff lines between the file at ``path`` and the generated text (empty: equal)."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    return list(difflib.unified_diff(current.splitlines(), render(base).splitlines(), str(path), "generated",
                                     lineterm=""))


def write(path: Path, base: Path = REPO) -> bool:
    """Write the generated dvc.yaml atomically; True when it changed."""
    text = render(base)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return True


def _cmd(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if args.write:
        log.info("%s %s", path, "rewritten from the stage table" if write(path) else "already matches the table")
        return 0
    if not args.check:
        print(render(), end="")
        return 0
    diff = differences(path)
    if diff:
        print("\n".join(diff))
        print(f"{path} differs from the stage table: run `ramflow dvc-yaml --write`", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dvc-yaml", help="dvc.yaml from the stage table (print, --check or --write)")
    p.add_argument("--path", default=str(REPO / "dvc.yaml"), help="dvc.yaml to check or write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 (printing the diff) when the file differs")
    mode.add_argument("--write", action="store_true", help="rewrite the file from the table")
    p.set_defaults(func=_cmd)


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="python -m orchestration.dvc_yaml")
    register(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["dvc-yaml", *sys.argv[1:]])
    logging.basicConfig(level=logging.INFO)
    sys.exit(_args.func(_args))
