"""The MLflow pyfunc wrapper: predictions, clear 400s on malformed requests, limits (pixels,
body size), clean error answers, and real servers (``mlflow models serve`` and ``ramflow serve``
on ``models:/ram-tagger@champion``): a round trip on corpus images and concurrent clients mixing
default and custom tag sets, each getting exactly its own answer.

The model is an untrained ``ram_tiny`` over the corpus vocabulary (what is tested is the
serving contract, not accuracy; the pipeline test serves its trained champion in process).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from _servers import free_port, running_server

mlflow = pytest.importorskip("mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402

from ram_model.serving import IMAGE_COLUMN, ServingConfig, encode_image, limit_app  # noqa: E402

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
    from ram_model.checkpoint import save_model
    from ram_model.registry import create_model
    from ram_model.serving import log_pyfunc

    root = tmp_path_factory.mktemp("serving")
    model = create_model("ram_tiny", pretrained=False, tag_names=TAGS, image_size=64)
    save_model(model, root / "model")
    env = StageEnv.from_params(root / "none.yaml", data_root=str(root))
    uri = log_pyfunc(root / "model", run_id=None, tracking_uri=env.tracking_uri(), example=corpus_images[:1])
    decision = register_and_gate(env, RegistryConfig(), uri, 0.5)
    assert decision.promoted and decision.version == "1"
    return env.tracking_uri(), uri


@pytest.fixture(scope="module")
def pyfunc(logged_model):
    from ram_model.tracking import mlflow_store

    with mlflow_store(logged_model[0]):
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
    """Predictions, custom tags, clear 400s, and the concurrent mix (:func:`_check_concurrent_mix`)."""
    import requests

    port = free_port()
    env = _server_env(logged_model, tmp_path)
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
        _check_concurrent_mix(url, corpus_images)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (tiny file: decoding it would be the bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("config,image,message", [
    (ServingConfig(), _png_header(12_000, 12_000), "144,000,000 pixels, more than the limit of 40,000,000"),
    (ServingConfig(max_image_pixels=10**12), _png_header(20_000, 20_000), "too large to decode"),  # PIL's bomb guard
    (ServingConfig(max_image_pixels=1000), None, "more than the limit of 1,000"),
    (ServingConfig(max_image_bytes=100), None, "more than 100"),
    (ServingConfig(max_custom_tags=1), None, "at most 1"),
], ids=["40-Mpx-default", "PIL-bomb-guard", "pixels-setting", "bytes-setting", "custom-tags-setting"])
def test_limits_answer_400_before_decoding(pyfunc, corpus_images, monkeypatch, config, image, message):
    monkeypatch.setattr(pyfunc.unwrap_python_model(), "config", config)
    frame = pd.DataFrame({IMAGE_COLUMN: [encode_image(image) if image else corpus_images[0]]})
    with pytest.raises(MlflowException) as err:
        pyfunc.predict(frame, params={"tags": ["cat", "dog"]})
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert message in err.value.message


def test_truncated_image_is_a_400(pyfunc, corpus_images):
    data = base64.b64decode(corpus_images[0])
    with pytest.raises(MlflowException) as err:
        pyfunc.predict(pd.DataFrame({IMAGE_COLUMN: [encode_image(data[: len(data) // 2])]}))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE" and "row 0" in err.value.message


@pytest.fixture(scope="module")
def test_app(pyfunc):
    """MLflow's scoring app for the champion behind ``limit_app`` (1 KiB bodies), in process."""
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, "false")  # init() sets it; restored afterwards
        with TestClient(limit_app(scoring_server.init(pyfunc), 1024), raise_server_exceptions=False) as client:
            yield client


def test_app_refuses_large_bodies_with_413(test_app):
    declared = test_app.post("/invocations", content=b"x" * 2048, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "larger than the limit of 1,024 bytes" in declared.json()["message"]
    streamed = test_app.post("/invocations", content=iter([b"x" * 600, b"x" * 600]),  # chunked: no length
                             headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "limit" in streamed.json()["message"]
    assert test_app.get("/ping").status_code == 200


def test_unexpected_errors_answer_a_message_without_trace_or_paths(pyfunc, test_app, corpus_images, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom in /srv/someone/secret/ram_model/inference.py line 12")

    monkeypatch.setattr(pyfunc.unwrap_python_model().tagger, "scores", broken)
    with pytest.raises(MlflowException) as err:                      # in process
        pyfunc.predict(pd.DataFrame({IMAGE_COLUMN: corpus_images[:1]}))
    assert err.value.error_code == "INTERNAL_ERROR" and "/srv/someone" not in err.value.message
    body = {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [["abc"]]}}  # small enough for the 1 KiB cap
    monkeypatch.setattr("ram_model.serving.check_image", lambda text, row, config: b"")
    r = test_app.post("/invocations", json=body)                     # over HTTP
    assert r.status_code == 500, r.text
    payload = r.json()
    assert "stack_trace" not in payload and "Traceback" not in r.text and "/srv/someone" not in r.text
    assert payload["message"].startswith("internal error while tagging (RuntimeError)")


@pytest.fixture(scope="module")
def fast_and_plain(pyfunc):
    """The same scoring app twice, in process: with the fast route (its answers recorded) and
    without it (every request through MLflow's pandas path)."""
    from functools import partial

    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    from ram_model.serving import fast_answer

    answered: list[bool] = []
    fast = partial(fast_answer, pyfunc.unwrap_python_model())

    def recorded(body: bytes):
        answer = fast(body)
        answered.append(answer is not None)
        return answer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, "false")
        with TestClient(limit_app(scoring_server.init(pyfunc), 2**24, fast=recorded, timeout_s=60),
                        raise_server_exceptions=False) as fast_client, \
             TestClient(limit_app(scoring_server.init(pyfunc), 2**24), raise_server_exceptions=False) as plain:
            yield fast_client, plain, answered


def _split(images, **params):
    return {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[b] for b in images]},
            **({"params": params} if params else {})}


FAST_CASES = {  # name: (body builder over the corpus images, answered by the fast route)
    "split threshold 0": (lambda im: _split(im, threshold=0.0), True),
    "split per-class thresholds": (lambda im: _split(im), True),
    "split integer threshold": (lambda im: _split(im[:1], threshold=0), True),
    "split negative threshold": (lambda im: _split(im[:2], threshold=-1), True),
    "split custom tags, repeated": (lambda im: _split(im, tags=["cat", "windmill", "cat"], threshold=0.0), True),
    "split empty tag list": (lambda im: _split(im[:1], tags=[], threshold=0.3), True),
    "records custom tags": (lambda im: {"dataframe_records": [{IMAGE_COLUMN: b} for b in im],
                                        "params": {"tags": ["kite", "dog"], "threshold": 0.0}}, True),
    "inputs column dict": (lambda im: {"inputs": {IMAGE_COLUMN: im[:2]}, "params": {"threshold": 0.2}}, True),
    "bad base64": (lambda im: _split(["%%%"]), False),
    "not an image": (lambda im: _split([encode_image(b"hello")]), False),
    "empty string": (lambda im: _split([""]), False),
    "truncated image": (lambda im: _split([encode_image(base64.b64decode(im[0])[:60])]), False),
    "wrong column": (lambda im: {"dataframe_split": {"columns": ["img"], "data": [[im[0]]]}}, False),
    "extra column": (lambda im: {"dataframe_split": {"columns": [IMAGE_COLUMN, "x"], "data": [[im[0], 1]]}}, False),
    "no rows": (lambda im: _split([]), False),
    "threshold text": (lambda im: _split(im[:1], threshold="high"), False),
    "threshold out of range": (lambda im: _split(im[:1], threshold=7), False),
    "threshold bool": (lambda im: _split(im[:1], threshold=True), False),
    "tags not a list": (lambda im: _split(im[:1], tags="cat"), False),
    "blank tag": (lambda im: _split(im[:1], tags=["ok", " "]), False),
    "unknown param": (lambda im: _split(im[:1], top_k=3), False),
    "params null": (lambda im: {**_split(im[:1]), "params": None}, False),
    "a list": (lambda im: [im[0]], False),
    "two formats": (lambda im: {**_split(im[:1]), "dataframe_records": [{IMAGE_COLUMN: im[0]}]}, False),
}


@pytest.mark.parametrize("name", list(FAST_CASES))
def test_fast_route_answers_exactly_like_mlflow(fast_and_plain, corpus_images, name):
    """Every request gets the same status and body from the fast route as from MLflow's path
    (byte for byte for 200s); well-formed requests are answered by the fast route, the rest
    (errors included) fall through to MLflow's app."""
    fast_client, plain, answered = fast_and_plain
    build, by_fast_route = FAST_CASES[name]
    content = json.dumps(build(corpus_images)).encode()
    answered.clear()
    got = fast_client.post("/invocations", content=content, headers={"content-type": "application/json"})
    want = plain.post("/invocations", content=content, headers={"content-type": "application/json"})
    assert answered == [by_fast_route]
    assert got.status_code == want.status_code, (got.text[:300], want.text[:300])
    assert got.headers["content-type"] == want.headers["content-type"]
    timing = got.headers.get("server-timing")  # the fast route reports its own time: "tag;dur=<ms>"
    assert (timing is not None) == by_fast_route
    if timing is not None:
        assert timing.startswith("tag;dur=") and float(timing.split("dur=")[1]) > 0
    if want.status_code == 200:
        assert got.content == want.content
    else:
        assert got.json() == want.json() and "stack_trace" not in got.json()


@pytest.mark.parametrize("content,content_type", [
    (b"{not json", "application/json"),
    (b'{"dataframe_split": {"columns": ["image"], "data": [["x"]]}, "params": {"threshold": NaN}}',
     "application/json"),
    (b"image\nabc\n", "text/csv"),
    (b"{}", "application/json; charset=latin-1"),
])
def test_fast_route_leaves_other_bodies_to_mlflow(fast_and_plain, content, content_type):
    fast_client, plain, answered = fast_and_plain
    answered.clear()
    got = fast_client.post("/invocations", content=content, headers={"content-type": content_type})
    want = plain.post("/invocations", content=content, headers={"content-type": content_type})
    assert not any(answered)
    assert (got.status_code, got.content) == (want.status_code, want.content)
    assert got.status_code >= 400


def test_fast_route_timeout_answers_like_mlflow(pyfunc, corpus_images):
    """A fast-route request past the timeout gets MLflow's own 504 answer."""
    import time

    from starlette.testclient import TestClient

    def slow(body: bytes):
        time.sleep(1.0)
        return b"{}"

    async def unused_app(scope, receive, send):
        raise AssertionError("the fast route answered: nothing reaches the app")

    client = TestClient(limit_app(unused_app, 2**24, fast=slow, timeout_s=0.05), raise_server_exceptions=False)
    r = client.post("/invocations", json=_split(corpus_images[:1]))  # no lifespan: no `with`
    assert r.status_code == 504 and r.content == b"Request processing time exceeded limit"


def _check_concurrent_mix(url: str, corpus_images: list[str]) -> None:
    """8 clients, 60 default + 60 custom-tag requests interleaved: every answer equals the one the
    same request gets alone, no error status, and the default tag set is intact afterwards."""
    import requests

    variants = [None, ["windmill", "butterfly", "cat"], ["kite", "dog"]]
    jobs = [(i % 3, [None, variants[1 + (i // 2) % 2]][i % 2]) for i in range(120)]  # 60 default, 60 custom

    def post(image: int, tags):
        params = {"threshold": 0.0, **({"tags": tags} if tags else {})}
        body = {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[corpus_images[image]]]}, "params": params}
        r = requests.post(f"{url}/invocations", json=body, timeout=120)
        return r.status_code, (r.json()["predictions"][0] if r.ok else r.text[:300])

    alone = {(img, tuple(tags or ())): post(img, tags) for img, tags in {(i, tuple(t or ())) for i, t in jobs}}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: post(*job), jobs))
    after = [post(i, None) for i in range(3)]
    for (img, tags), (status, pred) in zip(jobs, answers):
        ref_status, ref = alone[(img, tuple(tags or ()))]
        assert status == 200 and ref_status == 200, (status, pred)
        assert pred["tags"] == ref["tags"], (tags, pred["tags"], ref["tags"])
        assert pred["scores"] == pytest.approx(ref["scores"], rel=1e-5, abs=1e-6)
        assert sorted(pred["tags"]) == sorted(tags or TAGS)
    assert all(status == 200 and sorted(p["tags"]) == sorted(TAGS) for status, p in after)


def _server_env(logged_model, tmp_path) -> dict:
    # both URIs: a registry URI another test left in the environment must not redirect models:/ lookups
    return dict(os.environ, MLFLOW_TRACKING_URI=logged_model[0], MLFLOW_REGISTRY_URI=logged_model[0],
                RAMFLOW_CACHE_DIR=str(tmp_path / "cache"),
                PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _raw_post(port: int, head: str, chunks: list[bytes]) -> str:
    """Send a request head and body chunks over a bare socket (stop early if the server answers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode())
        for part in chunks:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            answer += part
        return answer.decode("latin-1")


def _content_length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.mark.slow
def test_ramflow_serve_concurrency_and_body_limits(logged_model, corpus_images, tmp_path):
    """``ramflow serve --max-body-mb 1``: the concurrent mix; a 200 MB declared body is refused
    without being sent, a chunked body once 1 MiB has streamed in; errors carry no trace."""
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "ramflow"), "serve", "-m", "models:/ram-tagger@champion", "-p", str(port), "--max-body-mb", "1"]
    with running_server(cmd, f"{url}/ping", tmp_path / "serve.log", env=_server_env(logged_model, tmp_path),
                        ready=lambda r: r.status_code == 200, stop_limit_s=30):
        _check_concurrent_mix(url, corpus_images)
        declared = _raw_post(port, "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   f"Content-Length: {200 * 2**20}\r\n\r\n", [])  # no body byte is sent
        assert declared.startswith("HTTP/1.1 413") and "larger than the limit" in declared
        chunk = b"x" * 2**16
        chunked = _raw_post(port, "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  "Transfer-Encoding: chunked\r\n\r\n",
                            [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 20)  # 1.25 MiB
        assert chunked.startswith("HTTP/1.1 413") and "larger than the limit" in chunked
        frame = {"columns": [IMAGE_COLUMN], "data": [[b] for b in corpus_images]}
        ok = requests.post(f"{url}/invocations", json={"dataframe_split": frame, "params": {"threshold": 0.0}},
                           timeout=60)
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 3
        bad = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": [IMAGE_COLUMN],
                                                                             "data": [["%%%"]]}}, timeout=60)
        assert bad.status_code == 400 and "stack_trace" not in bad.json()
        assert bad.json()["message"].startswith("row 0: column 'image' is not valid base64")


def test_serving_config_from_environment():
    config = ServingConfig(max_image_pixels=1234, batch_size=2)
    env = config.to_env()
    assert env["RAMFLOW_SERVING_MAX_IMAGE_PIXELS"] == "1234"
    assert ServingConfig.from_env(env) == config
    assert ServingConfig.from_env({}) == ServingConfig()
    with pytest.raises(ValueError):
        ServingConfig.from_env({"RAMFLOW_SERVING_BATCH_SIZE": "0"})
