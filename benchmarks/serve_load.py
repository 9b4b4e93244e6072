"""limner serve under load (issue 30): 8 concurrent clients x 25 requests on the demo checkpoint.

`limner serve checkpoints/shapes-unet` runs as its own process, as a user starts it. Each client
posts one-image requests (each its own prompt and seed) to POST /v1/images, waits for the job (long polling:
GET /v1/jobs/ID?wait=60) and fetches its PNG. Checked: every job completes, none is lost or answered twice,
each PNG carries the prompt and seed its request sent. Measured: latency from post to PNG
(p50/p95), images/s over the whole run, and how many images each batched call drew; against
the anchor a user without the server has, a loop of `limner sample` calls (one image each,
timed before and after the load run: alternating sides).

    python benchmarks/serve_load.py      # writes benchmarks/results/serve-load.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "serve-load"
CHECKPOINT = ROOT / "checkpoints" / "shapes-unet"
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle")
PLACES = ("top left", "center", "bottom right", "top", "left", "right", "bottom")


def prompt(k: int) -> str:
    return f"a {COLOURS[k % 6]} {SHAPES[k // 6 % 3]} at the {PLACES[k // 18 % 7]}"


def limner_bin() -> str:
    return str(Path(sys.executable).with_name("limner"))


def sample_loop(calls: int, offset: int) -> list[float]:
    """Seconds per `limner sample` call (one image, a fresh process each: what a script without
    the server does)."""
    times = []
    with tempfile.TemporaryDirectory() as out:
        for k in range(calls):
            start = time.perf_counter()
            subprocess.run([limner_bin(), "sample", str(CHECKPOINT), "-p", prompt(offset + k), "--seed",
                            str(offset + k), "--out", out], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    return times


def in_process(batches=(1, 8), reps: int = 3) -> dict:
    """Images/s of the pipeline called directly at each batch size: the ceiling the server's
    batching works toward (run in a child process, so its threads leave the load run alone)."""
    code = f"""
import json, time, limner
pipe = limner.load_pipeline({str(CHECKPOINT)!r})
pipe.generate(["a red circle"] * 8, seed=list(range(8)))
out = {{}}
for n in {tuple(batches)!r}:
    start = time.perf_counter()
    for r in range({reps}):
        pipe.generate(["a red circle at the top"] * n, seed=list(range(n)))
    out[n] = round(n * {reps} / (time.perf_counter() - start), 2)
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=HERE)
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_run(clients: int, requests: int) -> dict:
    import httpx
    from PIL import Image

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([limner_bin(), "serve", str(CHECKPOINT), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        # one warm-up job loads the model: the load run measures serving, not the first load
        warm = httpx.post(url + "/v1/images", json={"prompt": prompt(0), "seed": 0}).json()
        while httpx.get(f"{url}/v1/jobs/{warm['id']}").json()["status"] != "done":
            time.sleep(0.05)
        results, errors = [], []
        lock = threading.Lock()

        def client(c: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                for r in range(requests):
                    k = 1000 + c * requests + r
                    start = time.perf_counter()
                    try:
                        job = http.post("/v1/images", json={"prompt": prompt(k), "seed": k})
                        job.raise_for_status()
                        job_id = job.json()["id"]
                        while (view := http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json())["status"] \
                                not in ("done", "failed", "cancelled"):
                            pass  # long polling: the answer comes when the job ends
                        png = http.get(view["images"][0]["url"]).content if view["status"] == "done" else b""
                        latency = time.perf_counter() - start
                        import io

                        meta = Image.open(io.BytesIO(png)).text if png else {}
                        row = {"k": k, "id": job_id, "status": view["status"], "latency": latency,
                               "batch": view["batch"], "prompt_ok": meta.get("prompt") == prompt(k),
                               "seed_ok": json.loads(meta.get("limner", "{}")).get("seed") == k}
                    except Exception as exc:  # counted, never hidden
                        row = {"k": k, "status": f"error: {exc}"}
                    with lock:
                        (results if row["status"] == "done" else errors).append(row)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)
    latencies = sorted(r["latency"] for r in results)
    ids = [r["id"] for r in results]
    return {"clients": clients, "requests_each": requests, "completed": len(results), "failed": len(errors),
            "errors": [e["status"] for e in errors][:5], "duplicate_ids": len(ids) - len(set(ids)),
            "wrong_prompt_or_seed": sum(not (r["prompt_ok"] and r["seed_ok"]) for r in results),
            "wall_s": round(wall, 2), "images_per_s": round(len(results) / wall, 2),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
            "mean_batch_images": round(statistics.mean(r["batch"] for r in results), 2)}


def render(data: dict) -> str:
    s, a = data["serve"], data["sample_loop"]
    return "\n".join([
        "# limner serve under load",
        "",
        f"Machine: {data['cpu']}, {data['threads']} threads. Checkpoint: checkpoints/shapes-unet (32x32, "
        f"its default sampler and 16 steps). Command: `python benchmarks/serve_load.py` ({data['date']}).",
        "",
        f"{s['clients']} concurrent clients x {s['requests_each']} one-image requests each, to one "
        "`limner serve` process: post, wait for the job (GET /v1/jobs/ID?wait=60), fetch the PNG.",
        "",
        "| | images | images/s | latency p50 | latency p95 |",
        "|---|---|---|---|---|",
        f"| limner serve, {s['clients']} clients | {s['completed']} of {s['clients'] * s['requests_each']} | "
        f"{s['images_per_s']} | {s['latency_p50_s']} s | {s['latency_p95_s']} s |",
        f"| loop of `limner sample` (one process per image, {a['calls']} calls) | {a['calls']} | "
        f"{a['images_per_s']} | {a['p50_s']} s | {a['p95_s']} s |",
        *[f"| the pipeline called in-process, no HTTP, batches of {n} | | {v} | | |"
          for n, v in data["in_process_images_per_s"].items()],
        "",
        f"Jobs failed: {s['failed']}; answered twice (duplicate ids): {s['duplicate_ids']}; PNGs whose prompt or "
        f"seed metadata was not their request's: {s['wrong_prompt_or_seed']}. Queued requests with the same "
        f"settings were drawn together: {s['mean_batch_images']} images per call on average (limit 16). "
        f"The `limner sample` loop was timed half before and half after the load run.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--sample-calls", type=int, default=6, help="limner sample calls, half before, half after")
    parser.add_argument("--render", action="store_true", help="only re-render the .md from the .json")
    args = parser.parse_args()
    if args.render:
        RESULTS.with_suffix(".md").write_text(render(json.loads(RESULTS.with_suffix(".json").read_text())))
        return
    from limner.bench import cpu_name

    ceiling = in_process()
    before = sample_loop(args.sample_calls // 2, 0)
    serve = load_run(args.clients, args.requests)
    after = sample_loop(args.sample_calls - args.sample_calls // 2, 100)
    calls = sorted(before + after)
    data = {"cpu": cpu_name(), "threads": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "serve": serve,
            "in_process_images_per_s": ceiling,
            "sample_loop": {"calls": len(calls), "seconds": [round(t, 2) for t in before + after],
                            "images_per_s": round(len(calls) / sum(calls), 3),
                            "p50_s": round(statistics.median(calls), 2),
                            "p95_s": round(calls[int(0.95 * (len(calls) - 1))], 2)}}
    RESULTS.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    RESULTS.with_suffix(".md").write_text(render(data))
    print(render(data))
    if serve["failed"] or serve["duplicate_ids"] or serve["wrong_prompt_or_seed"] or \
            serve["completed"] != args.clients * args.requests:
        sys.exit("the load run lost, failed or mixed up jobs: see the results file")


if __name__ == "__main__":
    main()
