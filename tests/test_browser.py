"""``dagster dev`` + headless Chromium: open the asset graph, "Materialize all" on the TINY
profile, and wait until the backfill's runs all succeed.

The server works on a private copy of the session's tiny pipeline run (tests/conftest.py
``tiny_pipeline``): every asset is materialized again from the UI, and the training stages,
whose inputs are unchanged, reuse their models instead of training them a second time.

Chromium is the system one (/usr/bin/chromium) driven by PyPI ``playwright``; nothing is
downloaded. The server runs in its own process group and is stopped with SIGTERM to it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from _servers import free_port, running_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ASSETS = {"raw_pairs", "parsed_tags", "label_system", "preliminary_model", "engine_cleaned_data",
          "retrained_model", "engine_refined_data", "refined_model", "finetuned_model", "evaluation_report",
          "registered_model"}

STATUS_QUERY = """
query ($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { id status } }
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
    ... on Runs { results { runId status } }
  }
  assetNodes { assetKey { path } assetMaterializations(limit: 1) { timestamp } }
}
"""
BACKFILLS_QUERY = "{ partitionBackfillsOrError { ... on PartitionBackfills { results { id status } } } }"


def _gql(url: str, query: str, variables: dict | None = None) -> dict:
    r = requests.post(f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
    r.raise_for_status()
    return r.json()["data"]


@pytest.fixture
def dagster_dev(tiny_pipeline, tmp_path):
    """``dagster dev`` on a free port with DAGSTER_HOME in tmp_path and the TINY params, over a
    copy of the session's tiny pipeline run."""
    from _pipeline import copy_pipeline

    repo = copy_pipeline(tiny_pipeline, tmp_path)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["paths"]["data_root"] = str(repo / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    port = free_port()
    env = dict(os.environ, DAGSTER_HOME=str(home), RAMFLOW_PARAMS=str(tmp_path / "params.yaml"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(BIN / "dagster"), "dev", "-m", "orchestration.definitions", "-h", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, f"{url}/server_info", tmp_path / "dagster_dev.log", env=env, cwd=REPO):
        yield url, tmp_path


@pytest.mark.browser
@pytest.mark.slow
def test_materialize_all_from_the_asset_graph(dagster_dev):
    from playwright.sync_api import sync_playwright

    url, tmp_path = dagster_dev
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/asset-groups", timeout=180_000)
            materialize = page.get_by_role("button", name="Materialize all")
            materialize.wait_for(timeout=180_000)
            for name in ("raw_pairs", "registered_model"):
                assert page.get_by_text(name, exact=True).first.is_visible()
            skip = page.get_by_role("button", name="Skip")  # first-visit community dialog
            try:
                skip.wait_for(timeout=15_000)
                skip.click()
            except Exception:  # noqa: BLE001 - the dialog is shown once per instance only
                pass
            materialize.click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_role("button", name="All", exact=True).click()  # all shard partitions
            dialog.get_by_role("button", name="Launch backfill").click()
            dialog.wait_for(state="hidden", timeout=60_000)
            page.screenshot(path=str(tmp_path / "launched.png"))

            backfills = _gql(url, BACKFILLS_QUERY)["partitionBackfillsOrError"]["results"]
            assert len(backfills) == 1
            backfill = backfills[0]["id"]
            deadline = time.time() + 2400
            while True:
                data = _gql(url, STATUS_QUERY, {"id": backfill})
                status = data["partitionBackfillOrError"]["status"]
                runs = data["runsOrError"]["results"]
                if any(r["status"] in ("FAILURE", "CANCELED") for r in runs):
                    pytest.fail(f"a backfill run failed: {runs}")
                if status.startswith("COMPLETED") or status in ("FAILED", "CANCELED"):
                    break
                if time.time() > deadline:  # start-up / run wait limit, not a timing check
                    pytest.fail(f"backfill {backfill} still {status}: {runs}")
                time.sleep(10)
            assert status in ("COMPLETED", "COMPLETED_SUCCESS"), status
            assert runs and all(r["status"] == "SUCCESS" for r in runs), runs
            materialized = {"/".join(n["assetKey"]["path"]) for n in data["assetNodes"] if n["assetMaterializations"]}
            assert materialized == ASSETS

            page.goto(f"{url}/runs", timeout=120_000)
            page.get_by_text("Success").first.wait_for(timeout=120_000)
            page.screenshot(path=str(tmp_path / "runs.png"))
        finally:
            browser.close()
