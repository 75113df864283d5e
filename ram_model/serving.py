"""MLflow pyfunc wrapper of a trained tagger (what ``mlflow models serve`` runs).

Request: a dataframe with one column ``image`` (base64 of an encoded image, JPEG/PNG/...);
params (optional): ``tags`` (a custom tag list: open-set tagging with those names instead of
the model's label system) and ``threshold`` (one threshold for every tag; negative = the
model's per-class thresholds). Response: per image ``tags`` (list of names) and ``scores``
(their probabilities, same order, highest first).

Bad requests raise :class:`mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``,
which the scoring server answers with HTTP 400 and the message; unexpected errors are logged
server-side and answered 500 with a short message (no trace, no paths).

Limits (:class:`ServingConfig`, from ``RAMFLOW_SERVING_*`` environment variables so that
``mlflow models serve`` and every worker of ``ramflow serve`` read the same values): decoded
pixels per image (checked from the header before decoding), encoded bytes per image, custom tags
per request. ``ramflow serve`` (:func:`serve`) runs MLflow's own scoring app behind
:func:`limit_app`, which also caps the request body before it is read (HTTP 413) and strips
stack traces from error answers, and answers well-formed JSON requests itself (fast route:
orjson, no pandas frame or schema pass, the model's tagging code called directly, the same bytes
MLflow would answer); every other request, and every failing one, goes to MLflow's app
unchanged, so errors keep MLflow's statuses and messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import orjson
import pandas as pd
import torch
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from ram_model.checkpoint import resolve_checkpoint
from ram_model.inference import Tagger
from ram_model.text_encoder import TagEmbeddingCache
from ram_model.tracking import mlflow_store
from ramflow_io.formats import list_shards
from ramflow_io.shards import iter_samples

log = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
ENV_PREFIX = "RAMFLOW_SERVING_"
ENV_MODEL_URI = "RAMFLOW_SERVING_MODEL_URI"


class ServingConfig(BaseModel):
    """Request limits and inference settings of the served model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded width x height per image")
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="encoded bytes per image")
    max_body_bytes: int = Field(64 * 2**20, ge=1, description="request body (ramflow serve only)")
    max_custom_tags: int = Field(1000, ge=1, description="names in the 'tags' param")
    batch_size: int = Field(8, ge=1, description="images decoded and scored together")
    embedding_cache_names: int = Field(20_000, ge=1, description="custom tag embeddings kept in memory")
    fast_route: bool = Field(True, description="ramflow serve answers well-formed JSON requests without "
                                               "MLflow's pandas pass (same answers; see limit_app)")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "ServingConfig":
        """Fields from ``RAMFLOW_SERVING_<FIELD>`` variables (defaults for the rest)."""
        environ = os.environ if environ is None else environ
        values = {name: environ[ENV_PREFIX + name.upper()] for name in cls.model_fields
                  if ENV_PREFIX + name.upper() in environ}
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        return {ENV_PREFIX + name.upper(): str(value) for name, value in self.model_dump().items()}

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
    outputs=Schema([ColSpec(Array(DataType.string), "tags"), ColSpec(Array(DataType.double), "scores")]),
    params=ParamSchema([
        ParamSpec("tags", DataType.string, [], shape=(-1,)),
        ParamSpec("threshold", DataType.double, -1.0),
    ]),
)


def _bad(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def encode_image(image_or_bytes) -> str:
    """Base64 text of an image (PIL image -> PNG bytes; bytes are encoded as they are)."""
    if isinstance(image_or_bytes, (bytes, bytearray)):
        data = bytes(image_or_bytes)
    else:
        buf = io.BytesIO()
        image_or_bytes.save(buf, format="PNG")
        data = buf.getvalue()
    return base64.b64encode(data).decode("ascii")


def check_image(text: Any, row: int, config: ServingConfig) -> bytes:
    """Base64 text -> encoded image bytes whose header was read and whose size is within the
    limits (nothing is decoded yet); a clear 400 message otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(f"row {row}: column '{IMAGE_COLUMN}' must be a non-empty base64 string, got {type(text).__name__}")
    if len(text) > config.max_image_bytes * 4 // 3 + 4:  # base64 of more than max_image_bytes
        raise _bad(f"row {row}: image is more than {config.max_image_bytes} bytes")
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise _bad(f"row {row}: column '{IMAGE_COLUMN}' is not valid base64 ({err})") from None
    if len(data) > config.max_image_bytes:
        raise _bad(f"row {row}: image is {len(data)} bytes, more than {config.max_image_bytes}")
    try:
        with warnings.catch_warnings():  # the size is checked below against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
    except UnidentifiedImageError:  # PIL's message names a buffer address: not for the client
        raise _bad(f"row {row}: the decoded bytes are not a readable image (unknown image format)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise _bad(f"row {row}: the decoded bytes are not a readable image ({err})") from None
    except Image.DecompressionBombError:  # PIL's own guard (over twice Image.MAX_IMAGE_PIXELS)
        raise _bad(f"row {row}: image is too large to decode (more than {config.max_image_pixels:,} pixels "
                   f"allowed)") from None
    if width * height > config.max_image_pixels:
        raise _bad(f"row {row}: image is {width}x{height} = {width * height:,} pixels, more than the limit of "
                   f"{config.max_image_pixels:,} ({ENV_PREFIX}MAX_IMAGE_PIXELS)")
    return data


def load_checked(item: tuple[int, bytes]):
    """``(row, bytes)`` from :func:`check_image` -> RGB PIL image (decoded now); 400 if the
    data is cut or corrupt past its header."""
    row, data = item
    try:
        with warnings.catch_warnings():  # size already checked; PIL's DecompressionBombError still applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise _bad(f"row {row}: the image could not be decoded ({err})") from None


def decode_image(text: Any, row: int, config: ServingConfig | None = None):
    """Base64 text -> RGB PIL image within the limits; a clear 400 message when it is not one."""
    config = config or ServingConfig()
    return load_checked((row, check_image(text, row, config)))


def _check_params(params: dict | None, config: ServingConfig) -> tuple[list[str] | None, float | None]:
    params = dict(params or {})
    unknown = set(params) - {"tags", "threshold"}
    if unknown:
        raise _bad(f"unknown params {sorted(unknown)}; allowed: 'tags' (list of strings), 'threshold' (0..1)")
    tags = params.get("tags")
    if tags is not None and len(tags) == 0:
        tags = None
    if tags is not None:
        if isinstance(tags, str) or not all(isinstance(t, str) and t.strip() for t in tags):
            raise _bad("param 'tags' must be a list of non-empty strings")
        if len(tags) > config.max_custom_tags:
            raise _bad(f"param 'tags' has {len(tags)} names, at most {config.max_custom_tags}")
        tags = list(dict.fromkeys(t.strip() for t in tags))  # repeated names are scored once
    threshold = params.get("threshold")
    if threshold is not None:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise _bad(f"param 'threshold' must be a number, got {threshold!r}") from None
        if np.isnan(threshold) or threshold > 1.0:
            raise _bad(f"param 'threshold' must be in [0, 1] (negative: per-class thresholds), got {threshold}")
        if threshold < 0:
            threshold = None
    return tags, threshold


class RamTaggerModel(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint artifact with :class:`ram_model.inference.Tagger`.

    ``predict`` runs in several threads at once under the scoring server: it never changes the
    model (custom tags are a per-call tag set), and decodes images one batch at a time.
    """

    def load_context(self, context) -> None:
        self.config = ServingConfig.from_env()
        self.tagger = Tagger.from_checkpoint(context.artifacts["checkpoint"], device="cpu",
                                             batch_size=self.config.batch_size,
                                             embedding_cache=TagEmbeddingCache(self.config.embedding_cache_names))

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        try:
            return self._predict(model_input, params)
        except MlflowException:
            raise
        except Exception as err:  # a bug or a resource failure: log it here, answer without internals
            log.exception("unexpected error while tagging")
            raise MlflowException(f"internal error while tagging ({type(err).__name__}); "
                                  "the server log has the details", error_code=INTERNAL_ERROR) from None

    def _predict(self, model_input, params: dict | None) -> pd.DataFrame:
        config = getattr(self, "config", None) or ServingConfig()
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if IMAGE_COLUMN not in model_input.columns:
            raise _bad(f"input needs a column '{IMAGE_COLUMN}' of base64 images; got columns "
                       f"{list(map(str, model_input.columns))}")
        rows = self.tag_rows(model_input[IMAGE_COLUMN].tolist(), params)
        return pd.DataFrame(rows, columns=["tags", "scores"])

    def tag_rows(self, images: list, params: dict | None) -> list[dict]:
        """Base64 images and request params -> one ``{"tags": [...], "scores": [...]}`` per image
        (what ``predict`` puts in its frame and the fast route of :func:`limit_app` answers)."""
        config = getattr(self, "config", None) or ServingConfig()
        tags, threshold = _check_params(params, config)
        if tags is not None and self.tagger.model.config.text_encoder == "none":
            raise _bad("param 'tags' is not supported by this model: its tag embeddings are learned, "
                       "no text encoder can add new names")
        # headers and sizes of every row first (a bad row fails before any inference), pixels per batch
        items = [(i, check_image(v, i, config)) for i, v in enumerate(images)]
        results = self.tagger.tag(items, tags=tags, threshold=threshold, loader=load_checked)
        return [{"tags": [t for t, _ in r], "scores": [float(s) for _, s in r]} for r in results]


def example_images(data_root: str | Path, n: int = 2, split: str = "test") -> list[str]:
    """Base64 JPEGs of the first ``n`` images of a split (the logged input example)."""
    out = []
    for sample in iter_samples(list_shards(data_root, split), decode=False):
        out.append(encode_image(sample.image))
        if len(out) >= n:
            break
    return out


def log_pyfunc(model_dir: str | Path, run_id: str | None, tracking_uri: str | None = None,
               data_root: str | Path | None = None, name: str = "model",
               example: Sequence[str] | None = None) -> str:
    """Log the model of ``model_dir`` (a model folder or checkpoint file) as a pyfunc model in
    ``run_id`` with signature and an input example (images of ``data_root``); returns its uri."""
    checkpoint = resolve_checkpoint(model_dir)  # only the exported model file, not training checkpoints
    examples = list(example) if example is not None else example_images(data_root, 1) if data_root is not None else []
    example = (pd.DataFrame({IMAGE_COLUMN: examples}), {"threshold": 0.5}) if examples else None
    with mlflow_store(tracking_uri), mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=RamTaggerModel(), artifacts={"checkpoint": str(checkpoint)},
            signature=SIGNATURE, input_example=example,
        )
    log.info("logged pyfunc %s", info.model_uri)
    return info.model_uri


# ---------------------------------------------------------------------------- HTTP app (ramflow serve)
class _BodyTooLarge(Exception):
    pass


def _json_answer(status: int, error_code: str, message: str) -> tuple[dict, dict]:
    body = json.dumps({"error_code": error_code, "message": message}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, {"type": "http.response.body", "body": body}


def _clean_error_body(body: bytes) -> bytes:
    """An MLflow error answer without ``stack_trace`` and without the echoed request data."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict):
        return body
    payload.pop("stack_trace", None)
    message = payload.get("message")
    if isinstance(message, str) and message.startswith("Failed to predict data") and "\nError: " in message:
        payload["message"] = message.split("\nError: ", 1)[1]  # MLflow prefixes the whole input frame
    return json.dumps(payload).encode()


_FAST_FORMATS = ("dataframe_split", "dataframe_records", "inputs")
_JSON_TYPES = {b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8"}
_TIMEOUT_BODY = b"Request processing time exceeded limit"  # MLflow's own 504 answer


def fast_request(payload: Any) -> tuple[list[str], dict] | None:
    """``(images, params)`` of a decoded JSON request of the documented shape, or None for
    anything else (MLflow's app then answers it, errors included).

    Accepted: ``dataframe_split`` with columns ``["image"]``, ``dataframe_records`` with one key
    ``image`` per record, or ``inputs`` as ``{"image": [...]}``; at least one row, every value a
    string; optional ``params`` with only ``tags`` (list of strings) and ``threshold`` (number)."""
    if not isinstance(payload, dict):
        return None
    formats = [key for key in payload if key != "params"]
    if len(formats) != 1 or formats[0] not in _FAST_FORMATS:
        return None
    data = payload[formats[0]]
    if formats[0] == "dataframe_split":
        if not isinstance(data, dict) or set(data) != {"columns", "data"} or data["columns"] != [IMAGE_COLUMN]:
            return None
        rows = data["data"]
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 1 for r in rows):
            return None
        images = [r[0] for r in rows]
    elif formats[0] == "dataframe_records":
        if not isinstance(data, list) or not all(isinstance(r, dict) and list(r) == [IMAGE_COLUMN] for r in data):
            return None
        images = [r[IMAGE_COLUMN] for r in data]
    else:
        if not isinstance(data, dict) or list(data) != [IMAGE_COLUMN] or not isinstance(data[IMAGE_COLUMN], list):
            return None
        images = data[IMAGE_COLUMN]
    if not images or not all(isinstance(v, str) for v in images):
        return None
    params = payload.get("params", {})
    if not isinstance(params, dict) or set(params) - {"tags", "threshold"}:
        return None
    if "tags" in params and not (isinstance(params["tags"], list) and all(isinstance(t, str) for t in params["tags"])):
        return None
    threshold = params.get("threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        return None
    return images, params


def fast_answer(python_model: RamTaggerModel, body: bytes) -> bytes | None:
    """The 200 answer MLflow's app would give to ``body`` (``{"predictions": [...]}``, written
    with the same ``json`` settings), computed without pandas and schema passes; None when the
    request is not of :func:`fast_request`'s shape or fails in any way: MLflow's app then answers
    it, so every error keeps MLflow's status and message."""
    try:
        request = fast_request(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None
    if request is None:
        return None
    try:
        rows = python_model.tag_rows(*request)
    except Exception:  # noqa: BLE001 - answered (and logged) by MLflow's path
        return None
    return json.dumps({"predictions": rows}).encode()


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None once more than ``limit`` bytes came in or the client left."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
        if not message.get("more_body"):
            return b"".join(parts)


def _replay(body: bytes, receive):
    """A ``receive`` that hands ``body`` (already read) to the app, then the real channel."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_json(send, status: int, body: bytes, extra_headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"),
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})


def limit_app(app, max_body_bytes: int, fast: Callable[[bytes], bytes | None] | None = None,
              timeout_s: float | None = None):
    """ASGI wrapper: refuse bodies over ``max_body_bytes`` before reading them (declared
    ``Content-Length``) or while they stream in (bytes counted), with 413 and a message; error
    answers (status >= 400, JSON) lose their stack trace.

    Fast route (``fast``, e.g. :func:`fast_answer` bound to the model): a JSON ``POST
    /invocations`` is read whole and ``fast(body)`` runs in a worker thread (within
    ``timeout_s``, else MLflow's 504 answer); its bytes are the 200 answer. When it returns None
    the body is handed, unchanged, to ``app``."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        too_large = (413, "REQUEST_TOO_LARGE",
                     f"request body is larger than the limit of {max_body_bytes:,} bytes ({ENV_PREFIX}MAX_BODY_BYTES)")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            for message in _json_answer(*too_large):
                await send(message)
            return
        if (fast is not None and scope.get("method") == "POST" and scope.get("path") == "/invocations"
                and headers.get(b"content-type", b"").lower() in _JSON_TYPES):
            body = await _read_body(receive, max_body_bytes)
            if body is None:  # too large, or the client went away (then nobody reads the 413)
                for message in _json_answer(*too_large):
                    await send(message)
                return
            started = time.perf_counter()
            try:
                answer = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, fast, body),
                                                timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                return await _send_json(send, 504, _TIMEOUT_BODY)
            if answer is not None:  # Server-Timing: the tagging time as the server saw it, in ms
                timing = f"tag;dur={(time.perf_counter() - started) * 1000:.3f}".encode()
                return await _send_json(send, 200, answer, [(b"server-timing", timing)])
            receive = _replay(body, receive)
        state = {"read": 0, "over": False, "started": None, "parts": []}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > max_body_bytes:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def cleaning_send(message):
            if state["over"]:
                return  # the app's own answer to the interrupted read is replaced by the 413
            if message["type"] == "http.response.start" and message["status"] >= 400:
                state["started"] = message  # hold the error answer until its body is complete
                return
            if message["type"] == "http.response.body" and state["started"] is not None:
                state["parts"].append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = _clean_error_body(b"".join(state["parts"]))
                start = state["started"]
                hdrs = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": [*hdrs, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        try:
            await app(scope, limited_receive, cleaning_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not state["over"]:
                raise
        if state["over"]:
            for message in _json_answer(*too_large):
                await send(message)

    return wrapped


def scoring_app(model, config: ServingConfig):
    """MLflow's scoring app for a loaded pyfunc behind :func:`limit_app` (fast route on when
    ``config.fast_route`` and the pyfunc wraps a :class:`RamTaggerModel`)."""
    from mlflow.pyfunc import scoring_server  # lazy: FastAPI scoring server, only to serve

    python_model = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else None
    fast = (partial(fast_answer, python_model)
            if config.fast_route and isinstance(python_model, RamTaggerModel) else None)
    app = scoring_server.init(model)  # reads the same timeout variable for its own middleware
    return limit_app(app, config.max_body_bytes, fast=fast, timeout_s=MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())


def create_app(model_uri: str | None = None, config: ServingConfig | None = None):
    """MLflow's scoring app (``/invocations``, ``/ping``, ...) for the pyfunc at ``model_uri``
    (default ``$RAMFLOW_SERVING_MODEL_URI``) behind :func:`limit_app`."""
    from mlflow.pyfunc import scoring_server  # lazy: FastAPI scoring server, only to serve

    config = config or ServingConfig.from_env()
    uri = model_uri or os.environ[ENV_MODEL_URI]
    model = scoring_server.load_model_with_mlflow_config(uri)
    log.info("worker %d: %d torch threads, fast route %s", os.getpid(), torch.get_num_threads(),
             "on" if config.fast_route else "off")
    return scoring_app(model, config)


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1,
          config: ServingConfig | None = None, timeout_s: int | None = None) -> None:
    """Serve ``model_uri`` (``models:/ram-tagger@champion``, ``runs:/...`` or a folder) with
    ``workers`` uvicorn processes; the model is downloaded once and every worker loads it.
    ``timeout_s``: MLflow's per-request limit (HTTP 504 past it; its default is 60 s)."""
    import uvicorn  # lazy: uvicorn, only to serve

    config = config or ServingConfig.from_env()
    local = mlflow.artifacts.download_artifacts(model_uri) if "://" in model_uri or ":/" in model_uri else model_uri
    os.environ.update(config.to_env())  # the workers (and the pyfunc's load_context) read the same limits
    os.environ[ENV_MODEL_URI] = str(local)
    if timeout_s is not None:
        os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(timeout_s)
    log.info("serving %s on %s:%d with %d worker(s), limits %s", model_uri, host, port, workers, config)
    uvicorn.run("ram_model.serving:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="info")
