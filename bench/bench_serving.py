"""Serving under load: the model's own forward in process vs ``ramflow serve`` over HTTP.

One run, side by side:
- latency at 1 client: each round times the in-process forward (``tag_logits`` at batch 1 on a
  preprocessed tensor), the in-process ``Tagger.tag`` on the encoded image (decode + preprocess
  + forward), one request to the server with its fast route (``requests`` session and a bare
  ``http.client`` keep-alive connection) and one to a second server started with
  ``--no-fast-route`` (MLflow's pandas path), interleaved so machine load hits all alike;
- 8 concurrent clients on the same server (a mix of default and custom-tag requests): p50/p95,
  throughput, error answers and wrong answers (tags or scores that differ from what the same
  request gets in process);
- throughput at 8 clients with ``--workers 1`` vs ``--workers 2`` (two servers, one after the other).

The model is built in a temp dir with random weights (speed does not depend on them) and saved as
an MLflow pyfunc folder; nothing outside the repository is needed. Usage::

    python bench/bench_serving.py [--config ram_effnet_lite0@96] [--rounds 200] [--requests 240]
        [--out bench/results/serving]
"""

from __future__ import annotations

import argparse
import io
import http.client
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import requests
import torch

log = logging.getLogger("bench_serving")
TAGS = ["dog", "cat", "car", "tree", "red", "blue", "beach", "street", "person", "boat"]
CUSTOM = ["windmill", "cat", "kite"]


def build_pyfunc(spec: str, root: Path) -> Path:
    """A random-weight model of ``spec`` (``NAME@SIZE``) saved as a pyfunc folder under ``root``."""
    import mlflow

    from ram_model.checkpoint import save_model
    from ram_model.registry import create_model
    from ram_model.serving import SIGNATURE, RamTaggerModel

    name, _, size = spec.partition("@")
    overrides = {"image_size": int(size)} if size else {}
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(len(TAGS), 384), dim=-1)  # [C, text_dim]
    model = create_model(name, pretrained=False, tag_names=TAGS, tag_embeddings=emb, **overrides)
    save_model(model, root / "model")
    out = root / "pyfunc"
    mlflow.pyfunc.save_model(path=str(out), python_model=RamTaggerModel(), signature=SIGNATURE,
                             artifacts={"checkpoint": str(root / "model")})
    return out


def test_image(px: int) -> bytes:
    """A seeded ``px x px`` JPEG (smooth noise, so it compresses like a photo)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (px // 8, px // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((px, px), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@contextmanager
def server(pyfunc: Path, port: int, workers: int, log_path: Path, env: dict, fast: bool = True):
    """``ramflow serve`` (``python -m orchestration.cli serve``) until the block ends."""
    cmd = [sys.executable, "-m", "orchestration.cli", "serve", "-m", str(pyfunc), "-p", str(port),
           "-w", str(workers), "--timeout", "600",  # the first long custom list may take minutes on a busy CPU
           *([] if fast else ["--no-fast-route"])]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
                try:
                    if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(1)
            yield f"http://127.0.0.1:{port}"
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(image_b64: str, tags: list[str] | None) -> dict:
    params = {"threshold": 0.0, **({"tags": tags} if tags else {})}
    return {"dataframe_split": {"columns": ["image"], "data": [[image_b64]]}, "params": params}


def post(session: requests.Session, url: str, payload: dict) -> tuple[float, int, dict | None]:
    start = time.perf_counter()
    r = session.post(f"{url}/invocations", json=payload, timeout=120)
    elapsed = time.perf_counter() - start
    return elapsed, r.status_code, (r.json()["predictions"][0] if r.ok else None)


def raw_post(conn: http.client.HTTPConnection, payload: bytes, server_ms: list | None = None
             ) -> tuple[float, int, dict | None]:
    """One keep-alive request with the standard library client (less client-side time than
    requests); ``server_ms`` collects the tagging time the server reports (``Server-Timing``)."""
    start = time.perf_counter()
    conn.request("POST", "/invocations", body=payload, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    elapsed = time.perf_counter() - start
    timing = r.getheader("server-timing") or ""
    if server_ms is not None and "dur=" in timing:
        server_ms.append(float(timing.split("dur=")[1]) / 1000.0)
    return elapsed, r.status, (json.loads(data)["predictions"][0] if r.status == 200 else None)


def worker_threads(log_path: Path) -> list[str]:
    """The torch thread counts the server workers logged at start."""
    return re.findall(r"(\d+) torch threads", log_path.read_text())


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def same(pred: dict | None, expected: list[tuple[str, float]]) -> bool:
    return (pred is not None and pred["tags"] == [t for t, _ in expected]
            and np.allclose(pred["scores"], [s for _, s in expected], rtol=1e-4, atol=1e-5))


class Answer(NamedTuple):
    seconds: float    # request latency
    status: int       # HTTP status
    right: bool       # the prediction equals the in-process one


def concurrent_load(url: str, payloads: list[tuple[dict, list]], clients: int) -> dict:
    """Send every payload with ``clients`` threads; latencies, throughput, errors, wrong answers."""
    sessions = [requests.Session() for _ in range(clients)]

    def one(i: int):
        payload, expected = payloads[i]
        elapsed, status, pred = post(sessions[i % clients], url, payload)
        return Answer(elapsed, status, same(pred, expected))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(len(payloads))))
    wall = time.perf_counter() - start
    lat = [r.seconds for r in results]
    return {"clients": clients, "requests": len(results), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
            "throughput_rps": len(results) / wall, "errors": sum(r.status != 200 for r in results),
            "wrong_answers": sum(r.status == 200 and not r.right for r in results)}


def long_tag_list(url: str, b64: str, n: int) -> dict:
    """A request with ``n`` new tag names, first (embedded) and repeated (cached), and the
    latency of default requests sent while the first one is being embedded."""
    names = [f"object number {i}" for i in range(n)]
    session = requests.Session()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, requests.Session(), url, body(b64, names))
        during = []
        while not first.done():
            elapsed, status, _ = post(session, url, body(b64, None))
            during.append(elapsed)
        first_s, first_status, _ = first.result()
    again_s, again_status, _ = post(session, url, body(b64, names))
    return {"tags": n, "first_s": first_s, "repeated_s": again_s, "statuses": [first_status, again_status],
            "default_requests_during_first": len(during),
            "default_p50_ms_during_first": pct(during, 50) if during else None}


def run(args: argparse.Namespace) -> dict:
    from ram_model.inference import Tagger, load_image, preprocess
    from ram_model.serving import encode_image

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pyfunc = build_pyfunc(args.config, root)
        # the same torch thread count in the bench process and in every server worker
        env = dict(os.environ, RAMFLOW_CACHE_DIR=str(root / "cache"), OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
        os.environ["RAMFLOW_CACHE_DIR"] = env["RAMFLOW_CACHE_DIR"]
        tagger = Tagger.from_checkpoint(root / "model", batch_size=1)
        data = test_image(args.image_px)
        b64 = encode_image(data)
        x = preprocess([load_image(data)], tagger.model.data_config)  # [1, 3, S, S]
        expected = {None: tagger.tag([data], threshold=0.0)[0],
                    tuple(CUSTOM): tagger.tag([data], threshold=0.0, tags=CUSTOM)[0]}
        mixed = [(body(b64, CUSTOM if i % 2 else None), expected[tuple(CUSTOM) if i % 2 else None])
                 for i in range(args.requests)]
        out: dict = {"config": args.config, "image_px": args.image_px, "torch_threads": torch.get_num_threads(),
                     "rounds": args.rounds}
        out["load_average_start"] = list(os.getloadavg())
        with server(pyfunc, free_port(), 1, root / "serve1.log", env) as url, \
                server(pyfunc, free_port(), 1, root / "plain.log", env, fast=False) as plain_url:
            session, plain_session = requests.Session(), requests.Session()
            conn = http.client.HTTPConnection(url.split("//")[1])
            raw = json.dumps(body(b64, None)).encode()
            for _ in range(5):  # warm-up: first requests load lazily-built parts (text encoder)
                post(session, url, body(b64, None)), post(session, url, body(b64, CUSTOM))
                post(plain_session, plain_url, body(b64, None)), raw_post(conn, raw)
            times: dict[str, list[float]] = {k: [] for k in ("forward", "tag", "fast", "fast_raw", "plain", "inner")}
            bad = {"fast": 0, "fast_raw": 0, "plain": 0}
            with torch.inference_mode():
                for _ in range(5):
                    tagger.model.tag_logits(x)
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    tagger.model.tag_logits(x)
                    t1 = time.perf_counter()
                    tagger.tag([data], threshold=0.0)
                    t2 = time.perf_counter()
                    times["forward"].append(t1 - t0), times["tag"].append(t2 - t1)
                    for key, (elapsed, status, pred) in [("fast", post(session, url, body(b64, None))),
                                                         ("fast_raw", raw_post(conn, raw, times["inner"])),
                                                         ("plain", post(plain_session, plain_url, body(b64, None)))]:
                        times[key].append(elapsed)
                        bad[key] += status != 200 or not same(pred, expected[None])
            conn.close()
            out["torch_threads_server_workers"] = worker_threads(root / "serve1.log") + worker_threads(root / "plain.log")
            out["in_process_forward"] = {"p50_ms": pct(times["forward"], 50), "p95_ms": pct(times["forward"], 95)}
            out["in_process_tag_bytes"] = {"p50_ms": pct(times["tag"], 50), "p95_ms": pct(times["tag"], 95)}
            # the server's own time for the request (Server-Timing: decode, forward, answer in its worker
            # thread); the rest of the round trip is HTTP, the event loop and the client
            out["server_reported_tag"] = {"p50_ms": pct(times["inner"], 50), "p95_ms": pct(times["inner"], 95)}
            for key, name in [("fast", "server_1_client"), ("fast_raw", "server_1_client_http_client"),
                              ("plain", "server_1_client_mlflow_path")]:
                out[name] = {"p50_ms": pct(times[key], 50), "p95_ms": pct(times[key], 95), "bad_answers": bad[key]}
            fwd, tag_p50 = out["in_process_forward"]["p50_ms"], out["in_process_tag_bytes"]["p50_ms"]
            out["ratio_server_p50_to_forward_p50"] = out["server_1_client"]["p50_ms"] / fwd
            out["ratio_server_http_client_p50_to_forward_p50"] = out["server_1_client_http_client"]["p50_ms"] / fwd
            out["ratio_mlflow_path_p50_to_forward_p50"] = out["server_1_client_mlflow_path"]["p50_ms"] / fwd
            out["ratio_server_p50_to_tag_bytes_p50"] = out["server_1_client"]["p50_ms"] / tag_p50
            out["ratio_tag_bytes_p50_to_forward_p50"] = tag_p50 / fwd
            out["server_8_clients_1_worker"] = concurrent_load(url, mixed, 8)
            out["custom_1000_tags"] = long_tag_list(url, b64, args.long_tags)
        with server(pyfunc, free_port(), 2, root / "serve2.log", env) as url:
            session = requests.Session()
            for _ in range(5):
                post(session, url, body(b64, None)), post(session, url, body(b64, CUSTOM))
            out["server_8_clients_2_workers"] = concurrent_load(url, mixed, 8)
        out["load_average_end"] = list(os.getloadavg())
        out["throughput_ratio_2_vs_1_workers"] = (out["server_8_clients_2_workers"]["throughput_rps"]
                                                  / out["server_8_clients_1_worker"]["throughput_rps"])
    return out


def markdown(res: dict) -> str:
    lines = [f"# Serving benchmark ({res['config']}, one {res['image_px']} px JPEG per request, "
             f"{res['torch_threads']} torch threads)", "",
             "| measure | p50 ms | p95 ms | throughput req/s | errors | wrong answers |", "|---|---|---|---|---|---|"]
    for key, label in [("in_process_forward", "in-process forward, batch 1"),
                       ("in_process_tag_bytes", "in-process Tagger.tag on the JPEG bytes"),
                       ("server_reported_tag", "server's own time (Server-Timing) for the http.client requests"),
                       ("server_1_client", "server, 1 client (1 worker; fast route; requests)"),
                       ("server_1_client_http_client", "server, 1 client (1 worker; fast route; http.client)"),
                       ("server_1_client_mlflow_path", "server, 1 client (1 worker; --no-fast-route; requests)"),
                       ("server_8_clients_1_worker", "server, 8 clients, 1 worker"),
                       ("server_8_clients_2_workers", "server, 8 clients, 2 workers")]:
        r = res[key]
        thr = f"{r['throughput_rps']:.1f}" if "throughput_rps" in r else ""
        lines.append(f"| {label} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {thr} | {r.get('errors', '')} | "
                     f"{r.get('wrong_answers', r.get('bad_answers', ''))} |")
    fwd = res["in_process_forward"]["p50_ms"]
    lines += ["", f"- server p50 at 1 client / in-process forward p50: "
              f"{res['ratio_server_http_client_p50_to_forward_p50']:.2f}x with a keep-alive http.client connection; "
              f"{res['ratio_server_p50_to_forward_p50']:.2f}x with a requests session as the client (the requests "
              "library's own time per call is the difference); MLflow's path (requests): "
              f"{res['ratio_mlflow_path_p50_to_forward_p50']:.2f}x",
              f"- the server's own time per request (Server-Timing) / in-process forward p50: "
              f"{res['server_reported_tag']['p50_ms'] / fwd:.2f}x",
              f"- in-process Tagger.tag p50 / in-process forward p50: {res['ratio_tag_bytes_p50_to_forward_p50']:.2f}x",
              f"- server p50 at 1 client / in-process Tagger.tag p50: {res['ratio_server_p50_to_tag_bytes_p50']:.2f}x",
              f"- throughput at 8 clients, 2 workers / 1 worker: {res['throughput_ratio_2_vs_1_workers']:.2f}x"]
    t = res["custom_1000_tags"]
    lines += [f"- a request with {t['tags']} new tag names: {t['first_s']:.2f} s the first time (embedding; "
              f"HTTP {t['statuses'][0]}), {t['repeated_s']:.3f} s repeated (cached; HTTP {t['statuses'][1]}); "
              f"{t['default_requests_during_first']} default requests "
              f"answered meanwhile (p50 {t['default_p50_ms_during_first'] or 0:.1f} ms)",
              f"- torch threads: {res['torch_threads']} in process, {', '.join(res['torch_threads_server_workers'])} "
              "in the server workers (as they logged)",
              f"- load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in res['load_average_start'])}; "
              f"at end: {', '.join(f'{v:.2f}' for v in res['load_average_end'])}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ram_effnet_lite0@96", help="model config NAME@SIZE")
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=200, help="1-client rounds (forward, tag, request each)")
    parser.add_argument("--requests", type=int, default=240, help="requests per 8-client run (half custom tags)")
    parser.add_argument("--long-tags", type=int, default=1000, help="names in the long custom list")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in process and per server worker")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.config.replace("@", "_")
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    (out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
