"""MLflow's process-wide URIs are set only around the fluent calls that need them."""

from __future__ import annotations

import os

import mlflow
import pytest

from ram_model.tracking import STORE_ENV, mlflow_store, tracking_uri


@pytest.fixture
def clean_mlflow_uris(monkeypatch):
    for name in STORE_ENV:
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_the_store_is_set_inside_and_put_back_after(tmp_path, clean_mlflow_uris):
    default = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    with mlflow_store(uri):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == uri
        assert os.environ["MLFLOW_TRACKING_URI"] == uri
    assert mlflow.get_tracking_uri() == default
    assert mlflow.get_registry_uri() == default  # follows the tracking URI again
    assert not any(name in os.environ for name in STORE_ENV)
    # ramflow's own default is the data root's store again, not the last one registered to
    assert tracking_uri(tmp_path / "other") == f"sqlite:///{(tmp_path / 'other').resolve()}/mlflow/mlflow.db"


def test_a_store_set_by_the_user_survives_and_errors_restore_too(tmp_path, clean_mlflow_uris):
    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    mlflow.set_tracking_uri(mine)
    with pytest.raises(RuntimeError, match="boom"):
        with mlflow_store(f"sqlite:///{tmp_path / 'b.db'}"):
            raise RuntimeError("boom")
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == mine
    assert os.environ["MLFLOW_TRACKING_URI"] == mine and "MLFLOW_REGISTRY_URI" not in os.environ
    with mlflow_store(None):  # None: nothing changes
        assert mlflow.get_tracking_uri() == mine
