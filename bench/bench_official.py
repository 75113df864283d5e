"""ramflow's tag path vs a layer-by-layer form of the official RAM code, same weights, same run.

Baseline: ``bench/official_reference.py`` (the official code's structure: window partition,
explicit attention with the bias gathered per forward, BERT cross-attention with explicit
matmul / softmax / mask, label embeddings repeated per image). Candidates: the imported model
(``ram_model.official``) through its fast tag path (``ram_model.fast_tag``) in fp32 and bf16,
its plain module path (``--with-module``) and onnxruntime on the exported graph (``--onnx``).

Modes run interleaved (baseline, candidate, baseline, ...) ``--repeats`` times per batch size, so
load from other processes hits all of them alike; the table gives medians, the ratio of medians
and the median of the per-repeat ratios. Logit differences are measured against the baseline on
the same inputs, and (``--golden``) the fast path against the official code's golden logits.

    python bench/bench_official.py --repeats 3                 # weights regenerated in a temp dir
    python bench/bench_official.py --weights ram_seed0.pth --batches 1 8 --onnx
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _skip import skip_unless_present  # noqa: E402
from official_reference import golden_inputs, load_official  # noqa: E402

LOG = logging.getLogger("bench_official")
SHARED = REPO.parent / "shared"
GOLDEN_DIR = SHARED / "reference" / "official_ram" / "golden"


class PeakRss:
    """Peak resident memory (MiB) above the level at entry, sampled every 5 ms."""

    def __init__(self):
        self.peak = 0.0

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        self.base, self._stop = self.rss(), False
        self.peak = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def _weights(args: argparse.Namespace, tmp: Path) -> Path:
    if args.weights:
        return Path(args.weights)
    script = args.shared / "reference" / "official_ram" / "golden" / "official_weights.py"
    skip_unless_present(script, "pass --weights or --shared")
    out = tmp / f"ram_seed{args.seed}.pth"
    LOG.info("regenerating official-layout weights (seed %d) in %s", args.seed, tmp)
    subprocess.run([sys.executable, str(script), "ram", str(out), "--seed", str(args.seed)], check=True)
    return out


def build_modes(args: argparse.Namespace, weights: Path, tmp: Path) -> tuple[dict, dict]:
    """name -> callable(images) -> logits, and setup times / memory."""
    from ram_model.fast_tag import fast_tag_logits
    from ram_model.official.importer import build_from_official_state, read_official_checkpoint

    setup: dict = {}
    t = time.perf_counter()
    baseline = load_official(weights, "ram")
    setup["baseline_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = build_from_official_state(read_official_checkpoint(weights), "ram")
    setup["ramflow_import_s"] = time.perf_counter() - t
    modes = {"official_baseline": baseline}
    before = PeakRss.rss()
    probe = torch.zeros(1, 3, 384, 384)
    for dtype, name in ((torch.float32, "ramflow_fast_fp32"), (torch.bfloat16, "ramflow_fast_bf16")):
        if name.endswith("bf16") and not args.bf16:
            continue
        t = time.perf_counter()
        with torch.no_grad():
            fast_tag_logits(model, probe, dtype=dtype)  # builds and caches the packed path
        setup[f"{name}_build_and_first_call_s"] = time.perf_counter() - t
        modes[name] = (lambda d: (lambda x: fast_tag_logits(model, x, dtype=d)))(dtype)
    setup["fast_path_resident_mib"] = PeakRss.rss() - before
    if args.with_module:
        modes["ramflow_module_fp32"] = lambda x: model._decode_tags(model.encode_image(x)[0]).logits
    if args.onnx:
        from ram_model.onnx_export import export_tag_path, onnx_session

        t = time.perf_counter()
        path = export_tag_path(model, tmp / "ram.onnx", trace_batch=1)
        setup["onnx_export_s"] = time.perf_counter() - t
        session = onnx_session(path, threads=torch.get_num_threads())
        modes["onnxruntime_fp32"] = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    return modes, setup


def tag_path_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Floating-point operations of one forward (matmuls, convolutions, attention: what
    ``FlopCounterMode`` counts; elementwise work is not included). Parameters are frozen
    for the count: the counter's module hooks need tensors without autograd history."""
    from torch.utils.flop_counter import FlopCounterMode

    module.requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def gemm_peak_gflops(threads: int, repeats: int = 20) -> dict:
    """The best fp32 matmul rate this machine reaches at ``threads`` threads, on the shapes that
    dominate the tag path: the 4,585 tag queries through the decoder FFN ([4585, 768] x
    [768, 3072]) and Swin-L's MLP at stage 3 ([576, 768] x [768, 3072] per image)."""
    torch.set_num_threads(threads)
    out = {}
    for name, (m, k, n) in {"queries_ffn": (4585, 768, 3072), "swin_mlp": (576, 768, 3072)}.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        out[name] = 2 * m * k * n / best / 1e9
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_official_") as tmp:
        tmp = Path(tmp)
        weights = _weights(args, tmp)
        modes, setup = build_modes(args, weights, tmp)
        result = {"threads": args.threads, "torch": torch.__version__, "repeats": args.repeats, "setup": setup,
                  "batches": {}}
        golden = GOLDEN_DIR / "ram_seed0.pt" if args.golden is None else Path(args.golden)
        image_dir = args.shared / "data" / "coco_dev" / "images"
        if args.seed == 0 and golden.is_file() and image_dir.is_dir():
            ref = torch.load(golden, weights_only=True)["logits"]
            x = golden_inputs(image_dir)
            with torch.inference_mode():
                result["golden_max_abs_diff"] = {name: (modes[name](x) - ref).abs().max().item()
                                                 for name in modes if name.endswith("fp32")}
            LOG.info("vs golden logits: %s", result["golden_max_abs_diff"])
        flops = tag_path_flops(modes["official_baseline"], torch.zeros(1, 3, 384, 384))
        result["roofline"] = {"tag_path_gflop_per_image": flops / 1e9, "gemm_peak_gflops": gemm_peak_gflops(args.threads)}
        LOG.info("roofline: %s", result["roofline"])
        for batch in args.batches:
            x = torch.randn(batch, 3, 384, 384, generator=torch.Generator().manual_seed(batch))
            times = {name: [] for name in modes}
            peaks = {name: 0.0 for name in modes}
            outs = {}
            with torch.inference_mode():
                for name, fn in modes.items():  # warm-up (first-call allocations, oneDNN primitive caches)
                    outs[name] = fn(x)
                for rep in range(args.repeats):
                    for name, fn in modes.items():
                        with PeakRss() as mem:
                            t = time.perf_counter()
                            fn(x)
                            times[name].append(time.perf_counter() - t)
                        peaks[name] = max(peaks[name], mem.peak)
                    LOG.info("batch %d repeat %d: %s", batch, rep, {k: round(v[-1], 2) for k, v in times.items()})
            base = times["official_baseline"]
            rows = {}
            for name in modes:
                med = statistics.median(times[name])
                rows[name] = {
                    "median_s": med, "images_per_s": batch / med, "times_s": times[name],
                    "speedup_vs_baseline": statistics.median(base) / med,
                    "paired_speedup_median": statistics.median(b / t for b, t in zip(base, times[name])),
                    "max_abs_diff_vs_baseline": (outs[name].float() - outs["official_baseline"]).abs().max().item(),
                    "peak_extra_rss_mib": peaks[name],
                    # the baseline's counted FLOPs over this mode's time: the rate it works at
                    "effective_gflops": result["roofline"]["tag_path_gflop_per_image"] * batch / med,
                }
            result["batches"][str(batch)] = rows
    return result


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["# Official RAM tag path vs ramflow (Swin-L 384, fp32 unless named)", "",
             f"torch {result['torch']}, {result['threads']} threads, {result['repeats']} interleaved repeats "
             "per batch; speedup = baseline median / mode median; paired = median of per-repeat ratios.", "",
             "| batch | mode | median s | images/s | speedup | paired | max abs diff vs baseline | peak extra RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for batch, rows in result["batches"].items():
        for name, r in rows.items():
            lines.append(f"| {batch} | {name} | {r['median_s']:.2f} | {r['images_per_s']:.3f} | "
                         f"{r['speedup_vs_baseline']:.2f} | {r['paired_speedup_median']:.2f} | "
                         f"{r['max_abs_diff_vs_baseline']:.2e} | {r['peak_extra_rss_mib']:.0f} |")
    roof = result.get("roofline")
    if roof:
        peak = max(roof["gemm_peak_gflops"].values())
        lines += ["", f"Roofline: the tag path is {roof['tag_path_gflop_per_image']:.1f} GFLOP per image (matmuls, "
                  "convolutions and attention of the baseline, counted by torch's FlopCounterMode); the best fp32 "
                  "matmul rate measured here in this run: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in
                                                                roof["gemm_peak_gflops"].items()) + ".", "",
                  "| batch | mode | effective GFLOP/s | share of the matmul peak | fastest possible speedup at that peak |",
                  "|---|---|---|---|---|"]
        for batch, rows in result["batches"].items():
            base = rows["official_baseline"]["median_s"]
            bound = base / (roof["tag_path_gflop_per_image"] * int(batch) / peak)
            for name, r in rows.items():
                lines.append(f"| {batch} | {name} | {r['effective_gflops']:.0f} | {r['effective_gflops'] / peak:.0%} | "
                             f"{bound:.2f} |")
    lines += ["", "Setup: " + ", ".join(f"{k} {v:.1f}" for k, v in result["setup"].items())]
    if "golden_max_abs_diff" in result:
        lines.append("Max abs diff vs the official code's golden logits (seed 0, 4 inputs): "
                     + ", ".join(f"{k} {v:.2e}" for k, v in result["golden_max_abs_diff"].items()))
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="official-layout RAM checkpoint (default: regenerate with official_weights.py)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed when regenerating")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (reference files, COCO images)")
    ap.add_argument("--golden", help="golden logits file (default: shared's ram_seed0.pt, seed 0 only)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--with-module", action="store_true", help="also time the model's plain module path")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "official")
    args = ap.parse_args()
    result = bench(args)
    write_results(result, args.out)
    LOG.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
