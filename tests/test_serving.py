"""The MLflow pyfunc wrapper: predictions, clear 400s on malformed requests, and a real
``mlflow models serve -m models:/ram-tagger@champion`` round trip on corpus images.

The model is an untrained ``ram_tiny`` over the corpus vocabulary (what is tested is the
serving contract, not accuracy; the pipeline test serves its trained champion in process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from _servers import free_port, running_server

mlflow = pytest.importorskip("mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402

from ram_model.serving import IMAGE_COLUMN, encode_image  # noqa: E402

BIN = Path(sys.executable).parent
TAGS = ["dog", "cat", "car", "tree", "red", "blue", "beach", "street", "person", "boat"]


@pytest.fixture(scope="module")
def corpus_images():
    from data_engine.corpus import CorpusConfig, iter_corpus

    items = list(iter_corpus(CorpusConfig(image_size=64, n_test=3), "test"))
    return [encode_image(item.image) for item in items]


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory, corpus_images):
    """A ram_tiny checkpoint logged as pyfunc in a sqlite store, registered as champion."""
    from orchestration.model_registry import register_and_gate
    from orchestration.settings import RegistryConfig, StageEnv
    from ram_model.checkpoint import save_checkpoint
    from ram_model.registry import create_model
    from ram_model.serving import log_pyfunc

    root = tmp_path_factory.mktemp("serving")
    model = create_model("ram_tiny", pretrained=False, tag_names=TAGS, image_size=64)
    save_checkpoint(model, root / "model")
    env = StageEnv.from_params(root / "none.yaml", data_root=str(root))
    uri = log_pyfunc(root / "model", run_id=None, tracking_uri=env.tracking_uri(), example=corpus_images[:1])
    decision = register_and_gate(env, RegistryConfig(), uri, 0.5)
    assert decision.promoted and decision.version == "1"
    return env.tracking_uri(), uri


@pytest.fixture(scope="module")
def pyfunc(logged_model):
    mlflow.set_tracking_uri(logged_model[0])
    return mlflow.pyfunc.load_model("models:/ram-tagger@champion")


def test_signature_and_input_example(pyfunc):
    meta = pyfunc.metadata
    assert [c.name for c in meta.get_input_schema().inputs] == [IMAGE_COLUMN]
    assert [c.name for c in meta.get_output_schema().inputs] == ["tags", "scores"]
    assert {p.name for p in meta.get_params_schema().params} == {"tags", "threshold"}
    assert meta.saved_input_example_info is not None


def test_predict_tags_scores_threshold_and_custom_tags(pyfunc, corpus_images):
    df = pd.DataFrame({IMAGE_COLUMN: corpus_images})
    everything = pyfunc.predict(df, params={"threshold": 0.0})
    assert list(everything.columns) == ["tags", "scores"] and len(everything) == 3
    for tags, scores in zip(everything["tags"], everything["scores"]):
        assert sorted(tags) == sorted(TAGS)                      # threshold 0 keeps every tag
        assert list(scores) == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
    strict = pyfunc.predict(df, params={"threshold": 1.0})
    assert all(len(t) == 0 for t in strict["tags"])            # sigmoid < 1: nothing passes 1.0
    custom = pyfunc.predict(df, params={"tags": ["windmill", "butterfly"], "threshold": 0.0})
    assert all(sorted(t) == ["butterfly", "windmill"] for t in custom["tags"])
    default = pyfunc.predict(df)                                # per-class calibrated thresholds
    assert all(set(t) <= set(TAGS) for t in default["tags"])


@pytest.mark.parametrize("frame,params,message", [
    ({IMAGE_COLUMN: ["%%%not-base64"]}, None, "not valid base64"),
    ({IMAGE_COLUMN: [encode_image(b"plain text, not an image")]}, None, "not a readable image"),
    ({IMAGE_COLUMN: [""]}, None, "non-empty base64"),
    ({"picture": ["abc"]}, None, "image"),
    (None, {"threshold": 3.0}, "threshold"),
    (None, {"tags": ["ok", " "]}, "tags"),
])
def test_bad_requests_raise_invalid_parameter(pyfunc, corpus_images, frame, params, message):
    df = pd.DataFrame(frame if frame is not None else {IMAGE_COLUMN: corpus_images[:1]})
    with pytest.raises(MlflowException) as err:
        pyfunc.predict(df, params=params)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert message in err.value.message


@pytest.mark.slow
def test_mlflow_models_serve_champion_round_trip(logged_model, corpus_images, tmp_path):
    import requests

    tracking_uri, _ = logged_model
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/ram-tagger@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, f"{url}/ping", tmp_path / "serve.log", env=env,
                        ready=lambda r: r.status_code == 200, stop_limit_s=30):
        def post(body):
            return requests.post(f"{url}/invocations", json=body, timeout=120)

        frame = {"columns": [IMAGE_COLUMN], "data": [[b] for b in corpus_images]}
        ok = post({"dataframe_split": frame, "params": {"threshold": 0.0}})
        assert ok.status_code == 200, ok.text
        preds = ok.json()["predictions"]
        assert len(preds) == 3 and all(sorted(p["tags"]) == sorted(TAGS) for p in preds)
        custom = post({"dataframe_split": frame, "params": {"tags": ["cat", "windmill"], "threshold": 0.0}})
        assert all(sorted(p["tags"]) == ["cat", "windmill"] for p in custom.json()["predictions"])

        bad = {
            "bad base64": ({"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [["%%%"]]}}, "not valid base64"),
            "not an image": ({"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[encode_image(b"hello")]]}},
                             "not a readable image"),
            "wrong column": ({"dataframe_split": {"columns": ["img"], "data": [[corpus_images[0]]]}}, "image"),
            "bad threshold type": ({"dataframe_split": frame, "params": {"threshold": "high"}}, "threshold"),
            "threshold out of range": ({"dataframe_split": frame, "params": {"threshold": 7}}, "threshold"),
            "tags not a list": ({"dataframe_split": frame, "params": {"tags": "cat"}}, "tags"),
        }
        for name, (body, message) in bad.items():
            r = post(body)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:500])
            assert message in r.json()["message"], (name, r.text[:500])
