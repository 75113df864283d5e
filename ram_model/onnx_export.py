"""``ramflow export-onnx``: the tag path (image -> logits or probabilities) as an ONNX graph.

The graph takes normalised images ``images [batch, 3, S, S]`` (``S`` = the model's image size,
the batch axis dynamic) and returns ``logits`` or ``probs`` ``[batch, C]`` over the model's tag
set at export time. The tag queries (``relu(wordvec_proj(label_embed))``) do not depend on the
image, so the exporter folds them into constants. A sidecar ``<out>.tags.json`` holds the tag
names, per-class thresholds and preprocessing (image size, mean, std), so a consumer needs no
ramflow code. Models above 2 GB are written with their weights in external data files next to
the graph (ONNX's protobuf limit).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from ram_model.registry import load_model

log = logging.getLogger(__name__)


class OnnxExportConfig(BaseModel):
    """Options of one export."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    checkpoint: Path = Field(description="ramflow checkpoint (folder or file) to export")
    out: Path = Field(description="output .onnx path")
    output: Literal["logits", "probs"] = Field("logits", description="raw logits or sigmoid probabilities")
    opset: int = Field(17, ge=14, description="ONNX opset (scaled_dot_product_attention needs >= 14)")
    trace_batch: int = Field(2, ge=1, description="batch size of the example input used to trace the graph")


class TagPathModule(nn.Module):
    """``images [B, 3, S, S]`` -> ``[B, C]`` logits (or probabilities) over the model's tag set,
    through the model's reference modules (the oneDNN fast path is CPU-runtime only)."""

    def __init__(self, model: nn.Module, probs: bool = False):
        super().__init__()
        self.model = model.eval()
        self.probs = probs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.model.encode_image(images)  # [B, 1 + hw, image_dim]
        logits = self.model._decode_tags(tokens).logits  # [B, C]
        return torch.sigmoid(logits) if self.probs else logits


def export_tag_path(model: nn.Module, out: str | os.PathLike, probs: bool = False, opset: int = 17,
                    trace_batch: int = 2) -> Path:
    """Write ``model``'s tag path to ``out`` (+ ``out.tags.json``); returns the graph path.

    Written to a temporary name first and renamed, so a failed export leaves no partial file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if model.num_tags == 0:
        raise ValueError("the model has no tag set to export")
    size = model.config.image_size
    wrapper = TagPathModule(model, probs).eval()
    example = torch.zeros(trace_batch, 3, size, size)
    name = "probs" if probs else "logits"
    tmp = out.with_name(out.name + ".tmp")
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), str(tmp), input_names=["images"], output_names=[name],
                          dynamic_axes={"images": {0: "batch"}, name: {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    if n_bytes > 1.8 * 2**30:  # keep the graph under protobuf's 2 GB: weights go to an external file
        import onnx  # lazy: optional onnx

        graph = onnx.load(str(tmp))
        onnx.save_model(graph, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data")
    os.replace(tmp, out)
    meta = {"output": name, "tag_names": list(model.tag_names), "thresholds": model.thresholds.tolist(),
            "image_size": size, "mean": list(model.config.mean), "std": list(model.config.std),
            "model": model.config.name}
    sidecar = out.with_name(out.name + ".tags.json")
    tmp_meta = sidecar.with_name(sidecar.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp_meta, sidecar)
    log.info("wrote %s (%d tags, output %s) and %s", out, len(meta["tag_names"]), name, sidecar.name)
    return out


def export_checkpoint(cfg: OnnxExportConfig) -> Path:
    """Load ``cfg.checkpoint`` and export its tag path."""
    model = load_model(cfg.checkpoint).eval()
    return export_tag_path(model, cfg.out, probs=cfg.output == "probs", opset=cfg.opset, trace_batch=cfg.trace_batch)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for an exported graph."""
    import onnxruntime as ort  # lazy: optional onnxruntime

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def cmd_export_onnx(args: argparse.Namespace) -> int:
    cfg = OnnxExportConfig(checkpoint=args.checkpoint, out=args.out, output="probs" if args.probs else "logits",
                           opset=args.opset)
    print(export_checkpoint(cfg))
    return 0


def register(subparsers) -> None:
    """Add ``export-onnx`` to the ``ramflow`` parser."""
    p = subparsers.add_parser("export-onnx", help="export a model's tag path (image -> logits) to ONNX")
    p.add_argument("checkpoint", help="ramflow checkpoint (folder or file), e.g. one written by import-official")
    p.add_argument("out", help="output .onnx path (a .tags.json sidecar is written next to it)")
    p.add_argument("--probs", action="store_true", help="output sigmoid probabilities instead of logits")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_export_onnx)
