"""MLflow pyfunc wrapper of a trained tagger (what ``mlflow models serve`` runs).

Request: a dataframe with one column ``image`` (base64 of an encoded image, JPEG/PNG/...);
params (optional): ``tags`` (a custom tag list: open-set tagging with those names instead of
the model's label system) and ``threshold`` (one threshold for every tag; negative = the
model's per-class thresholds). Response: per image ``tags`` (list of names) and ``scores``
(their probabilities, same order, highest first).

Bad requests raise :class:`mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``,
which the scoring server answers with HTTP 400 and the message.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

log = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
MAX_IMAGE_BYTES = 20 * 2**20
MAX_CUSTOM_TAGS = 1000

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


def decode_image(text: Any, row: int):
    """Base64 text -> RGB PIL image; a clear 400 message when it is not one."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str) or not text.strip():
        raise _bad(f"row {row}: column '{IMAGE_COLUMN}' must be a non-empty base64 string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise _bad(f"row {row}: column '{IMAGE_COLUMN}' is not valid base64 ({err})") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise _bad(f"row {row}: image is {len(data)} bytes, more than {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise _bad(f"row {row}: the decoded bytes are not a readable image ({err})") from None
    return image.convert("RGB")


def _check_params(params: dict | None) -> tuple[list[str] | None, float | None]:
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
        if len(tags) > MAX_CUSTOM_TAGS:
            raise _bad(f"param 'tags' has {len(tags)} names, at most {MAX_CUSTOM_TAGS}")
        tags = [t.strip() for t in tags]
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
    """Loads the checkpoint artifact with :class:`ram_model.inference.Tagger`."""

    def load_context(self, context) -> None:
        from ram_model.inference import Tagger

        self.tagger = Tagger.from_checkpoint(context.artifacts["checkpoint"], device="cpu")

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if IMAGE_COLUMN not in model_input.columns:
            raise _bad(f"input needs a column '{IMAGE_COLUMN}' of base64 images; got columns "
                       f"{list(map(str, model_input.columns))}")
        tags, threshold = _check_params(params)
        images = [decode_image(v, i) for i, v in enumerate(model_input[IMAGE_COLUMN].tolist())]
        results = self.tagger.tag(images, tags=tags, threshold=threshold)
        rows = [{"tags": [t for t, _ in r], "scores": [float(s) for _, s in r]} for r in results]
        return pd.DataFrame(rows, columns=["tags", "scores"])


def example_images(data_root: str | Path, n: int = 2, split: str = "test") -> list[str]:
    """Base64 JPEGs of the first ``n`` images of a split (the logged input example)."""
    from data_engine.formats import list_shards
    from data_engine.shards import iter_samples

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
    from ram_model.checkpoint import resolve_checkpoint

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    checkpoint = resolve_checkpoint(model_dir)  # only the exported model file, not training checkpoints
    examples = list(example) if example is not None else example_images(data_root, 1) if data_root is not None else []
    example = (pd.DataFrame({IMAGE_COLUMN: examples}), {"threshold": 0.5}) if examples else None
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=RamTaggerModel(), artifacts={"checkpoint": str(checkpoint)},
            signature=SIGNATURE, input_example=example,
        )
    log.info("logged pyfunc %s", info.model_uri)
    return info.model_uri
