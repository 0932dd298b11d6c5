"""Sample the serving worker with py-spy while sequential requests run: stock vs the plugin at R = 1.

    pip install --target /tmp/pyspy py-spy      # any place; pass the binary with --py-spy
    PYTHONPATH=src /path/to/venv-vllm/bin/python benchmarks/vllm_serve_pyspy.py [--requests 60] [--py-spy PATH]

One ``vllm serve`` at a time (tiny test model; stock, then the plugin), warmed with one request per
image size; py-spy records the engine's worker process at 200 Hz while ``--requests`` streamed
requests go one after another. Printed per engine: the client's wall time and TTFT p50, and the
worker's samples per request (ms) in the image embedding (``_process_image_input``), its selection
part (stock's unpad, the plugin's ``image_tokens``), the rest of ``execute_model`` (language model),
and everything else. Process-level sampling sees what in-process timers miss (vLLM's own threads,
the engine loop); the embedding share is the plugin's cost, the other rows move with the load.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import tempfile
import time

from globalcom2.integrations.vllm import ARCHITECTURE, save_llava_hf_checkpoint
from globalcom2.integrations.vllm.server import (
    LLAVA_CHAT_TEMPLATE,
    Server,
    chat_body,
    data_url,
    free_port,
    image_bytes,
    serve_command,
)
from globalcom2.testing import demo_image, tiny_model, tiny_processor

SIZES = ((220, 300), (400, 150), (120, 500), (224, 224))  # (height, width)
RATE = 200


def _parts(path: str, n: int) -> dict[str, float]:
    parts: collections.Counter = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            k = int(count)
            if "_process_image_input" in stack:
                parts["embedding"] += k
                if "image_tokens" in stack or "_merge_image_patch_embeddings" in stack:
                    parts["embedding: selection / unpad"] += k
            elif "execute_model" in stack:
                parts["execute_model, rest"] += k
            else:
                parts["other"] += k
    return {k: v / RATE / n * 1000 for k, v in sorted(parts.items())}


def main(argv: list[str] | None = None) -> int:
    """Print the per-request sample shares of stock and the plugin at R = 1."""
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--py-spy", default="/tmp/pyspy/bin/py-spy")
    args = ap.parse_args(argv)
    hw = [SIZES[i % len(SIZES)] for i in range(args.requests)]
    urls = [data_url(image_bytes(demo_image(height=h, width=w, seed=5000 + i))) for i, (h, w) in enumerate(hw)]
    bodies = [chat_body("tiny", [u], "what is this ?", 16) for u in urls]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_llava_hf_checkpoint(tiny_model(seed=0, text_heads=2), tiny_processor(), os.path.join(tmp, "m"))
        template = os.path.join(tmp, "chat.jinja")
        with open(template, "w") as f:
            f.write(LLAVA_CHAT_TEMPLATE)
        plugin = {"architectures": [ARCHITECTURE], "globalcom2": {"retention_ratio": 1.0}}
        for name, ov in [("stock", None), ("plugin R=1", plugin)]:
            cmd = serve_command(ckpt, free_port(), served_name="tiny", overrides=ov, chat_template=template,
                                extra=["--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"])  # fmt: skip
            with Server(cmd, os.path.join(tmp, "server.log"), env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as s:
                s.wait_ready(900)
                url = s.url + "/v1/chat/completions"
                with httpx.Client(timeout=300) as c:
                    for i, (h, w) in enumerate(SIZES):  # warm-up
                        c.post(
                            url,
                            json=chat_body(
                                "tiny", [data_url(image_bytes(demo_image(height=h, width=w, seed=9000 + i)))], "x", 2
                            ),
                        )
                worker = next(p.pid for p in s._tree() if p.name() == "VLLM::Worker")
                out = os.path.join(tmp, "spy.txt")
                spy_cmd = [args.py_spy, "record", "-p", str(worker), "-r", str(RATE), "-f", "raw", "-o", out,
                           "-d", "3600", "--nonblocking"]  # fmt: skip
                spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(3)
                ttft, t0 = [], time.perf_counter()
                with httpx.Client(timeout=300) as c:
                    for b in bodies:
                        t = time.perf_counter()
                        first = None
                        with c.stream("POST", url, json={**b, "stream": True}) as r:
                            for line in r.iter_lines():
                                compact = line.replace(" ", "")
                                if first is None and '"token_ids":[' in compact and '"token_ids":[]' not in compact:
                                    first = time.perf_counter() - t
                        ttft.append(first)
                wall = time.perf_counter() - t0
                spy.send_signal(2)
                spy.wait(120)
                ttft.sort()
                shares = ", ".join(f"{k} {v:.1f}" for k, v in _parts(out, args.requests).items())
                p50 = ttft[len(ttft) // 2] * 1000
                print(f"{name}: {wall:.1f} s for {args.requests} requests, TTFT p50 {p50:.0f} ms; "
                      f"worker samples per request (ms): {shares}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
