"""limner serve: the engine (queue, batching, cancelling, failures, memory bound) on a stand-in
pipeline whose images are known, then the JSON API and A1111's API in-process on the shipped
checkpoints (FastAPI's TestClient), with A1111's documented request bodies."""
import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from limner.errors import LimnerError
from limner.serve import CANCELLED, DONE, FAILED, Engine, Limits, Request, RequestError, served_models

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from limner.server import create_app, needs_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UNET, GAN = ROOT / "checkpoints" / "shapes-unet", ROOT / "checkpoints" / "shapes-gan"


class Defaults:
    steps, guidance = 4, 2.0


class FakePipe:
    """A pipeline whose image k is filled with (seed of k) mod 251; "bad" in a prompt is a
    LimnerError, "crash" a RuntimeError; each step waits `delay` seconds (a `gate` first)."""

    features = frozenset({"samplers"})
    defaults = Defaults()

    def __init__(self, delay=0.0, gate=None, weights=1000):
        self.model, self.delay, self.gate, self.calls = torch.nn.Linear(weights, 1), delay, gate, []

    def generate(self, prompts, seed=0, num=1, callback=None, steps=None, **options):
        self.calls.append((list(prompts), list(seed), num, options))
        if any("bad" in p for p in prompts):
            raise LimnerError("this prompt is bad")
        if any("crash" in p for p in prompts):
            raise RuntimeError("a bug")
        for i in range(steps or self.defaults.steps):
            if self.gate is not None:
                self.gate.wait(10)
            time.sleep(self.delay)
            if callback is not None:
                callback({"i": i, "steps": steps or self.defaults.steps})
        values = [(s + j) % 251 for s in seed for j in range(num)]
        return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4) / 125 - 1


def fake_engine(pipe=None, **kw):
    pipes = {}

    def load(path):
        pipes[str(path)] = FakePipe(**(pipe or {}))
        return pipes[str(path)]

    engine = Engine({"a": "A", "b": "B"}, load=load, **kw)
    engine.fake = pipes
    return engine


def pixel(png: bytes) -> int:
    return int(np.asarray(Image.open(io.BytesIO(png)))[0, 0, 0])


def started(job, step=0):
    """Wait until `job` runs (past `step`); a job that ended first fails the test with its error."""
    end = time.monotonic() + 60
    while (job.status == "queued" or (job.status == "running" and job.step < step)) and time.monotonic() < end:
        time.sleep(0.01)
    assert job.status == "running", (job.status, job.error)


def wait(job, timeout=60):
    assert job.done.wait(timeout), f"job {job.id} still {job.status}"
    return job


def test_queued_jobs_with_one_model_and_settings_are_drawn_as_one_batch_each_with_its_seed():
    gate = threading.Event()
    engine = fake_engine(pipe={"gate": gate})
    first = engine.submit(Request(["hold"], model="a", seed=1))
    started(first)
    jobs = [engine.submit(Request(["p", "q"], model="a", seed=s, count=2)) for s in (10, 20)]
    other = engine.submit(Request(["p"], model="a", seed=30, count=2, steps=3))  # other settings: its own call
    gate.set()
    for job in [first, *jobs, other]:
        assert wait(job).status == DONE, job.error
    calls = engine.fake["A"].calls
    assert [c[1] for c in calls] == [[1], [10, 10, 20, 20], [30]]  # a seed per prompt: the job's
    assert jobs[0].batch == jobs[1].batch == 8 and other.batch == 2
    assert [pixel(p) for p in jobs[1].images] == [20, 21, 20, 21]  # image j of a prompt: seed + j
    assert jobs[1].seeds == [20, 21, 20, 21] and jobs[1].prompts == ["p", "p", "q", "q"]
    engine.close()


def test_a_bad_request_in_a_batch_fails_alone_and_a_crash_never_stops_the_worker():
    gate = threading.Event()
    engine = fake_engine(pipe={"gate": gate})
    hold = engine.submit(Request(["hold"], model="a", seed=0))
    started(hold)
    good, bad = engine.submit(Request(["fine"], model="a", seed=5)), engine.submit(Request(["bad"], model="a"))
    gate.set()
    assert wait(good).status == DONE and pixel(good.images[0]) == 5
    assert wait(bad).status == FAILED and bad.error == "this prompt is bad" and bad.fault == "request"
    crash = wait(engine.submit(Request(["crash"], model="a")))
    assert crash.status == FAILED and crash.error == "RuntimeError: a bug" and crash.fault == "server"
    assert wait(engine.submit(Request(["after"], model="a", seed=7))).status == DONE  # the worker lives on
    engine.close()


def test_cancel_a_queued_job_now_a_running_one_at_its_next_step_and_shutdown_ends_the_queue():
    engine = fake_engine(pipe={"delay": 0.05})
    running = engine.submit(Request(["x"], model="a", steps=200))
    started(running, 2)
    queued = engine.submit(Request(["y"], model="a", steps=2, seed=3))
    assert engine.cancel(queued.id).status == CANCELLED and queued.error == "cancelled before it ran"
    engine.cancel(running.id)
    assert wait(running).status == CANCELLED and running.step < 200 and not running.images
    assert wait(engine.submit(Request(["z"], model="a", steps=2))).status == DONE
    long = engine.submit(Request(["x"], model="a", steps=200))
    waiting = engine.submit(Request(["y"], model="a", steps=2))
    started(long, 1)
    engine.close()
    assert waiting.status == CANCELLED and waiting.error == "the server shut down before this job ran"
    assert long.status == CANCELLED and long.step < 200
    with pytest.raises(RequestError, match="shutting down") as info:
        engine.submit(Request(["x"], model="a"))
    assert info.value.status == 503


def test_models_past_the_memory_bound_are_dropped_least_recently_used_first():
    engine = fake_engine(memory=6000)  # each stand-in holds 1001 float32 weights: 4004 bytes
    wait(engine.submit(Request(["x"], model="a")))
    assert engine.state()["loaded"] == ["a"]
    wait(engine.submit(Request(["x"], model="b")))
    assert engine.state()["loaded"] == ["b"] and engine.state()["memory"] == 4004
    engine.close()


def test_requests_are_checked_against_the_limits_and_the_served_names():
    engine = fake_engine(limits=Limits(prompts=2, count=3, images=4, steps=50, prompt_chars=20, queued=1))
    cases = [
        (Request(["x"], model="/etc/passwd"), "unknown model '/etc/passwd': this server serves a, b"),
        (Request(["x"] * 3), "3 prompts: a request takes at most 2"),
        (Request(["x" * 21]), "the prompt has 21 characters: at most 20"),
        (Request(["x"], count=4), "count 4 is out of range: it must be from 1 to 3"),
        (Request(["x", "y"], count=3), "2 prompts x count 3 = 6 images: a request draws at most 4"),
        (Request(["x"], steps=51), "steps 51 is out of range: it must be from 1 to 50"),
        (Request(["x"], steps=True), "steps must be a whole number from 1 to 50, got True"),
        (Request(["  "]), "a prompt is empty"),
        (Request(["x"], guidance=float("nan")), "guidance must be a number, got nan"),
        (Request(["x"], seed=-2), "seed -2 is out of range"),
        (Request(["x"], sampler="eulr"), "unknown sampler 'eulr'. Did you mean: euler"),
        (Request(["x"], schedule="karas"), "unknown schedule 'karas'"),
        (Request(["x"], sampler="DPM++ 2M Karras", schedule="exponential"), "says schedule 'karras'"),
        (Request(["x"], mask=Image.new("L", (4, 4))), "a mask needs an init image"),
        (Request(["x"], strength=0.5), "strength sets how much of the init image is redrawn"),
        (Request(["x"], dtype="half"), "dtype 'half': give one of float32, fp32, bfloat16, bf16"),
    ]
    for request, message in cases:
        with pytest.raises(RequestError, match=None) as info:
            engine.submit(request)
        assert message in str(info.value) and info.value.status == 400
    job = engine.submit(Request(["x"], seed=None))
    assert job.request.model == "a" and 0 <= job.request.seed < 2**32  # default model, a random seed told
    wait(job)
    engine.close()


def test_served_models_names_checkpoints_and_refuses_two_of_one_name_or_a_missing_one(tmp_path):
    assert served_models([str(UNET), str(GAN)]) == {"shapes-unet": UNET, "shapes-gan": GAN}
    assert list(served_models([])) [:1] == ["shapes-unet"]  # none given: the demo's shipped checkpoints
    with pytest.raises(LimnerError, match="two checkpoints are both called 'shapes-unet'"):
        served_models([str(UNET), str(UNET)])
    with pytest.raises(LimnerError, match="no/such"):
        served_models(["no/such"])
    assert needs_key("0.0.0.0") and needs_key("192.168.1.4") and needs_key("example.org")
    assert not needs_key("127.0.0.1") and not needs_key("::1") and not needs_key("localhost")


# --- the HTTP APIs on the shipped checkpoints ---------------------------------------------------


@pytest.fixture(scope="module")
def client():
    engine = Engine(served_models([str(UNET), str(GAN)]), limits=Limits(request_bytes=200_000))
    with TestClient(create_app(engine)) as c:
        c.engine = engine
        yield c


def done(client, job_id):
    for _ in range(1200):
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in ("done", "failed", "cancelled"):
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(png: bytes | str) -> np.ndarray:
    raw = base64.b64decode(png) if isinstance(png, str) else png
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)


def test_json_api_draws_pngs_with_their_settings_and_the_same_seed_redraws_them(client):
    body = {"prompt": ["a red circle at the top left", "a blue square at the center"], "seed": 40, "count": 2,
            "steps": 8}
    answer = client.post("/v1/images", json=body)
    assert answer.status_code == 202 and answer.json()["status"] in ("queued", "running")
    view = done(client, answer.json()["id"])
    assert view["status"] == "done" and view["progress"] == 1 and view["step"] == view["steps"] == 8
    assert [(i["prompt"], i["seed"]) for i in view["images"]] == [
        ("a red circle at the top left", 40), ("a red circle at the top left", 41),
        ("a blue square at the center", 40), ("a blue square at the center", 41)]
    # the model's defaults, as drawn
    assert view["settings"] == {"model": "shapes-unet", "seed": 40, "count": 2, "steps": 8, "sampler": "dpmpp_2m",
                                "schedule": "karras", "guidance": 3.0, "size": 32, "dtype": "float32"}
    png = client.get(view["images"][3]["url"])
    assert png.headers["content-type"] == "image/png"
    meta = Image.open(io.BytesIO(png.content))
    assert meta.size == (32, 32) and meta.text["prompt"] == "a blue square at the center"
    assert json.loads(meta.text["limner"])["seed"] == 41
    assert "Steps: 8, Sampler: dpmpp_2m, Schedule type: karras, CFG scale: 3.0, Seed: 41, Size: 32x32, " \
           "Model: shapes-unet" in meta.text["parameters"]
    alone = done(client, client.post("/v1/images", json={"prompt": "a blue square at the center", "seed": 41,
                                                           "steps": 8}).json()["id"])
    again = client.get(alone["images"][0]["url"]).content
    assert np.abs(pixels(again) - pixels(png.content)).max() <= 1  # alone or in a batch: the same image


def test_json_api_lists_and_event_stream_and_cancel(client):
    models = client.get("/v1/models").json()
    assert [(m["name"], m["default"], m["recipe"]) for m in models] == [("shapes-unet", True, "diffusion"),
                                                                         ("shapes-gan", False, "gan")]
    assert {"name": "euler_ancestral", "aliases": ["euler_a", "eulerancestraldiscretescheduler"]} in \
        client.get("/v1/samplers").json()
    assert "karras" in [s["name"] for s in client.get("/v1/schedules").json()]
    job = client.post("/v1/images", json={"prompt": "a green circle at the right", "steps": 30, "seed": 1}).json()
    events = []
    with client.stream("GET", job["events"]) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "done" and len(events[-1]["images"]) == 1
    steps = [e["step"] for e in events if e["status"] == "running"]
    assert steps == sorted(steps) and len(set(steps)) > 2  # progress moved in several steps
    long = client.post("/v1/images", json={"prompt": "a white square", "steps": 2000 // 4}).json()
    queued = client.post("/v1/images", json={"prompt": "a white square", "steps": 7}).json()
    assert client.delete(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
    client.delete(f"/v1/jobs/{long['id']}")
    view = done(client, long["id"])
    assert view["status"] == "cancelled" and view["step"] < 500 and view["images"] == []
    assert client.get(f"/v1/jobs/{long['id']}/images/0.png").status_code == 404
    assert client.get("/v1/jobs/nope").json() == {
        "detail": "no job 'nope': it never existed or was dropped from the last 500 finished jobs"}


def test_a_gan_model_answers_and_names_the_settings_it_does_not_take(client):
    view = done(client, client.post("/v1/images", json={"prompt": "a red circle", "model": "shapes-gan",
                                                         "seed": 2}).json()["id"])
    assert view["status"] == "done" and view["settings"]["truncation"] is not None
    view = done(client, client.post("/v1/images", json={"prompt": "a red circle", "model": "shapes-gan",
                                                         "steps": 9}).json()["id"])
    assert view["status"] == "failed" and view["fault"] == "request" and "steps does not apply here" in view["error"]


def test_bad_requests_get_one_paragraph_naming_the_value(client):
    def detail(path, body, status):
        answer = client.post(path, json=body)
        assert answer.status_code == status, answer.text
        return answer.json()["detail"]

    curl = client.post("/v1/images", content=b'{"prompt": "a red circle"}',  # `curl -d` labels JSON a form
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert curl.status_code == 202, curl.text
    assert detail("/v1/images", {"prompt": "x", "steps": "many"}, 422) == \
        "steps: Input should be a valid integer, unable to parse string as an integer (got 'many')"
    assert "path: Extra inputs are not permitted" in detail("/v1/images", {"prompt": "x", "path": "/etc"}, 422)
    assert detail("/v1/images", {"prompt": "x", "model": "../checkpoints/shapes-unet"}, 400) == \
        "unknown model '../checkpoints/shapes-unet': this server serves shapes-unet, shapes-gan"
    assert detail("/v1/images", {"prompt": "x", "init_image": "not base64!"}, 400) == \
        "init_image is not valid base64: send the image file's bytes base64-encoded"
    assert "cannot read image init_image" in detail("/v1/images", {"prompt": "x", "init_image": "aGVsbG8="}, 400)
    big = client.post("/v1/images", content=b"{" + b" " * 300_000 + b"}", headers={"content-type": "application/json"})
    assert big.status_code == 413 and "over 200000 bytes" in big.json()["detail"]
    chunks = (b" " * 10_000 for _ in range(30))  # no Content-Length: counted as it arrives
    big = client.post("/v1/images", content=chunks, headers={"content-type": "application/json"})
    assert big.status_code == 413 and "over 200000 bytes" in big.json()["detail"]
    assert "limner cannot honour restore_faces, enable_hr (hires. fix)" in detail(
        "/sdapi/v1/txt2img", {"prompt": "x", "restore_faces": True, "enable_hr": True}, 400)
    assert "limner draws square images" in detail("/sdapi/v1/txt2img", {"prompt": "x", "width": 32, "height": 48}, 400)
    assert "this model draws at the size it was trained at, 32" in detail(
        "/sdapi/v1/txt2img", {"prompt": "x", "width": 512, "height": 512}, 400)


def test_an_api_key_guards_the_api_but_not_the_page():
    engine = Engine(served_models([str(GAN)]))
    with TestClient(create_app(engine, api_key="s3cret")) as c:
        assert c.get("/v1/models").status_code == 401
        assert "needs its API key" in c.get("/sdapi/v1/sd-models").json()["detail"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/sdapi/v1/sd-models", auth=("user", "s3cret")).status_code == 200
        assert c.get("/").status_code == 200 and "<title>limner</title>" in c.get("/").text


# --- A1111's API, with the request bodies of its documentation ---------------------------------
# The wiki's API page posts {"prompt": ..., "steps": 5}; its /docs page's example body lists every
# field (its "string" placeholders filled in here with values a client sends).

A1111_FULL = {
    "enable_hr": False, "denoising_strength": 0, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "prompt": "a yellow triangle at the bottom right", "styles": [], "seed": 1234, "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "DPM++ 2M Karras",
    "batch_size": 2, "n_iter": 1, "steps": 10, "cfg_scale": 3, "width": 32, "height": 32, "restore_faces": False,
    "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "",
    "eta": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
    "override_settings_restore_afterwards": True, "script_args": [], "sampler_index": "Euler", "script_name": "",
    "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def test_a1111_txt2img_with_the_documented_bodies(client):
    short = client.post("/sdapi/v1/txt2img", json={"prompt": "a purple circle at the top", "steps": 5})
    assert short.status_code == 200, short.text
    assert len(short.json()["images"]) == 1 and json.loads(short.json()["info"])["steps"] == 5
    answer = client.post("/sdapi/v1/txt2img", json=A1111_FULL)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [1234, 1235] and info["sampler_name"] == "dpmpp_2m" and info["scheduler"] == "karras"
    assert info["cfg_scale"] == 3 and info["sd_model_name"] == "shapes-unet" and out["parameters"]["steps"] == 10
    assert "Seed: 1235" in info["infotexts"][1]
    # "DPM++ 2M Karras" is dpmpp_2m over the karras schedule: the same images through /v1
    view = done(client, client.post("/v1/images", json={"prompt": A1111_FULL["prompt"], "sampler": "dpmpp_2m",
                                                         "schedule": "karras", "steps": 10, "guidance": 3,
                                                         "seed": 1234, "count": 2}).json()["id"])
    for k in range(2):
        assert np.abs(pixels(out["images"][k]) - pixels(client.get(view["images"][k]["url"]).content)).max() <= 1
    title = "shapes-gan [0a1b2c3d]"  # A1111's titles carry a hash
    gan = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 5,
                                                  "override_settings": {"sd_model_checkpoint": title}})
    assert gan.status_code == 200 and json.loads(gan.json()["info"])["sd_model_name"] == "shapes-gan"


def test_a1111_img2img_and_inpainting_keep_what_the_mask_keeps(client):
    init = Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 1, 3)))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # redraw the left half
    body = {"init_images": [b64(init)], "prompt": "a red circle at the left", "seed": 9, "steps": 10,
            "mask": "data:image/png;base64," + b64(mask), "inpainting_fill": 0, "mask_blur": 4}
    kept = pixels(client.post("/sdapi/v1/img2img", json=body).json()["images"][0])
    init_px = np.asarray(init, dtype=np.int16)
    assert np.abs(kept[:, 16:] - init_px[:, 16:]).max() <= 1 and np.abs(kept[:, :16] - init_px[:, :16]).max() > 40
    flipped = pixels(client.post("/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": 1}).json()["images"][0])
    assert np.abs(flipped[:, :16] - init_px[:, :16]).max() <= 1
    redrawn = client.post("/sdapi/v1/img2img", json={"init_images": [b64(init)], "prompt": "a red circle",
                                                      "denoising_strength": 0.3, "seed": 2, "steps": 10})
    assert redrawn.status_code == 200 and json.loads(redrawn.json()["info"])["denoising_strength"] == 0.3
    refused = client.post("/sdapi/v1/img2img", json={**body, "denoising_strength": 0.5})
    assert refused.status_code == 400 and "denoising_strength below 1 with a mask" in refused.json()["detail"]


def test_a1111_lists_progress_and_schema(client):
    assert [m["title"] for m in client.get("/sdapi/v1/sd-models").json()] == ["shapes-unet", "shapes-gan"]
    names = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert names["dpmpp_2m"]["aliases"] == ["dpmsolvermultistepscheduler"] and "options" in names["euler"]
    assert "karras" in [s["name"] for s in client.get("/sdapi/v1/schedulers").json()]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-unet"
    job = client.post("/v1/images", json={"prompt": "a red square", "steps": 400}).json()
    for _ in range(400):
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] > 1:
            break
        time.sleep(0.02)
    assert progress["state"]["job"] == job["id"] and 0 < progress["progress"] < 1
    assert progress["state"]["sampling_steps"] == 400
    client.post("/sdapi/v1/interrupt")
    assert done(client, job["id"])["status"] == "cancelled"
    schema = client.get("/openapi.json").json()
    assert {"/v1/images", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/sdapi/v1/txt2img",
            "/sdapi/v1/img2img", "/sdapi/v1/progress"} <= set(schema["paths"])


def test_the_serve_command_refuses_an_open_host_without_a_key_then_serves(capsys, monkeypatch):
    import subprocess
    import sys

    from limner.cli import main

    monkeypatch.delenv("LIMNER_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(GAN), "--host", "0.0.0.0"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 lets other machines reach this server: give an API key too" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "no/such/checkpoint"])
    assert exit_info.value.code == 1 and "no/such/checkpoint" in capsys.readouterr().err

    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limner_bin = str(Path(sys.executable).with_name("limner"))
    server = subprocess.Popen([limner_bin, "serve", str(GAN), "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert [m["name"] for m in models] == ["shapes-gan"]
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert "limner serve: shapes-gan (default shapes-gan) on http://127.0.0.1:" in out and "Traceback" not in out
