"""`limner serve`'s HTTP side (FastAPI; the `serve` extra): limner's JSON API under /v1, the
AUTOMATIC1111 web UI's API under /sdapi/v1 for the clients that speak it, and the web page at /.
The work is limner.serve.Engine's; this module turns requests into its Requests and its jobs
into answers. Every refusal is `{"detail": "<one paragraph>"}` with a 4xx status, as FastAPI and
A1111 answer."""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import json
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from . import __version__
from .errors import LimnerError
from .serve import DONE, FINISHED, Engine, Job, Request, RequestError, decode_image
from .server_models import A1111Img2Img, A1111Txt2Img, ImagesBody

PAGE = Path(__file__).parent / "web" / "index.html"


def needs_key(host: str) -> bool:
    """A host other than loopback exposes the server to the network: it needs an API key."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI app over `engine`; with `api_key`, every API route wants it (Authorization:
    Bearer KEY, X-API-Key, HTTP basic auth's password, or ?api_key= for the event stream)."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        engine.close()  # queued jobs end as cancelled, with the reason

    app = FastAPI(title="limner", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="limner's image generation server: the /v1 JSON API and A1111's /sdapi/v1.")
    app.state.engine = engine

    @app.exception_handler(LimnerError)
    async def limner_error(_, exc: LimnerError):
        return JSONResponse({"detail": str(exc)}, status_code=getattr(exc, "status", 400))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "the body"
            given = f" (got {err['input']!r:.60})" if "input" in err and err.get("type") != "missing" else ""
            parts.append(f"{where}: {err.get('msg', 'invalid')}{given}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or request.query_params.get("api_key")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        elif auth.lower().startswith("basic "):
            try:
                given = base64.b64decode(auth[6:]).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                given = None
        if not given or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise RequestError("this server needs its API key: send it as 'Authorization: Bearer KEY' or "
                               "'X-API-Key: KEY'", 401)

    guarded = [Depends(authorize)]

    @app.middleware("http")
    async def limit_body(request: HTTPRequest, call_next):
        limit = engine.limits.request_bytes
        length = request.headers.get("content-length")
        too_big = JSONResponse({"detail": f"the request body is over {limit} bytes, the server's limit "
                                          "(request_bytes); send smaller images"}, status_code=413)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return too_big
        if request.method in ("POST", "PUT", "PATCH") and length is None:  # chunked: count as it comes
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    return too_big
            request._body = bytes(body)
        kind = request.headers.get("content-type", "")
        if request.method == "POST" and (not kind or kind.startswith("application/x-www-form-urlencoded")):
            # every body here is JSON: `curl -d '{...}'` labels it a form, which would read as no object
            request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")]
        return await call_next(request)

    def job_view(job: Job) -> dict[str, Any]:
        view = job.view()
        for image in view["images"]:
            image["url"] = f"/v1/jobs/{job.id}/images/{image['index']}.png"
        view["events"] = f"/v1/jobs/{job.id}/events"
        return view

    # --- the page and limner's JSON API ------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/v1/models", dependencies=guarded)
    def models():
        """The models this server serves, by the names requests use (the first is the default)."""
        state = engine.state()
        return [{"name": name, "default": name == engine.default, "loaded": name in state["loaded"],
                 **engine.facts(name)} for name in engine.paths]

    @app.get("/v1/samplers", dependencies=guarded)
    def samplers():
        """Every registered sampler, with the other names it answers to."""
        return names_of("samplers")

    @app.get("/v1/schedules", dependencies=guarded)
    def schedules():
        """Every registered schedule (noise levels), with the other names it answers to."""
        return names_of("schedules")

    @app.get("/v1/limits", dependencies=guarded)
    def limits():
        """What one request may ask for."""
        return engine.limits.as_dict()

    @app.get("/v1/status", dependencies=guarded)
    def status():
        """Jobs queued and running, models loaded and their memory against the bound."""
        state = engine.state()
        return {**state, "running": [job_view(j) for j in state["running"]]}

    @app.post("/v1/images", status_code=202, dependencies=guarded)
    def images(body: ImagesBody):
        """Queue a generation job; answers at once with the job (follow `events` or poll its URL)."""
        fields = body.model_dump()
        fields["prompts"] = fields.pop("prompt")
        fields["init_image"] = decode_image(fields["init_image"], "init_image")
        fields["mask"] = decode_image(fields["mask"], "mask")
        return job_view(engine.submit(Request(**fields)))

    @app.get("/v1/jobs", dependencies=guarded)
    def jobs(limit: int = 50):
        """The latest jobs, newest first."""
        with engine.lock:
            latest = list(engine.jobs.values())[::-1][: max(0, limit)]
        return [job_view(j) for j in latest]

    @app.get("/v1/jobs/{job_id}", dependencies=guarded)
    async def job(job_id: str, wait: float = 0):
        """A job's status, progress (0 to 1), error and images; with ?wait=S (up to 60), the
        answer comes when the job finishes or S seconds pass (long polling)."""
        job = engine.job(job_id)
        await ended(job, min(max(wait, 0.0), 60.0))
        return job_view(job)

    @app.delete("/v1/jobs/{job_id}", dependencies=guarded)
    def cancel(job_id: str):
        """Cancel a job: a queued one ends now, a running one at its next step."""
        return job_view(engine.cancel(job_id))

    @app.get("/v1/jobs/{job_id}/events", dependencies=guarded)
    async def events(job_id: str):
        """Server-sent events: the job as JSON at every change, until it finishes."""
        job = engine.job(job_id)

        async def stream():
            last = None
            while True:
                view = job_view(job)
                now = (view["status"], view["step"], view["steps"])
                if now != last:
                    yield f"data: {json.dumps(view)}\n\n"
                    last = now
                if view["status"] in FINISHED:
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}/images/{index}.png", dependencies=guarded,
             responses={200: {"content": {"image/png": {}}}})
    def image(job_id: str, index: int):
        """One image of a finished job: a PNG with its prompt and settings in the metadata."""
        job = engine.job(job_id)
        if job.status != DONE or not 0 <= index < len(job.images):
            raise RequestError(f"job {job_id} has no image {index}: it is {job.status} with {len(job.images)} "
                               "images", 404)
        return Response(job.images[index], media_type="image/png")

    # --- AUTOMATIC1111's API ------------------------------------------------------------------

    async def finished(job: Job) -> Job:
        await ended(job)
        if job.status != DONE:
            status = (400 if job.fault == "request" else 500) if job.status == "failed" else 409
            raise RequestError(f"job {job.id} {job.status}: {job.error}", status)
        return job

    def a1111_answer(body, request: Request, job: Job) -> dict[str, Any]:
        s = job.settings  # as drawn: the model's defaults filled in
        return {"images": [base64.b64encode(png).decode() for png in job.images] if body.send_images else [],
                "parameters": body.model_dump(exclude={"init_images", "mask"}),
                "info": json.dumps({"prompt": request.prompts[0], "all_prompts": job.prompts,
                                    "negative_prompt": request.negative_prompt or "", "seed": request.seed,
                                    "all_seeds": job.seeds, "sampler_name": s.get("sampler"),
                                    "scheduler": s.get("schedule"), "steps": s.get("steps"),
                                    "cfg_scale": s.get("guidance"), "width": s.get("size"), "height": s.get("size"),
                                    "denoising_strength": s.get("strength"), "sd_model_name": job.request.model,
                                    "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                                    "infotexts": [_text(png, "parameters") for png in job.images]})}

    @app.post("/sdapi/v1/txt2img", dependencies=guarded, tags=["A1111"])
    async def txt2img(body: A1111Txt2Img):
        """A1111's text-to-image: waits for the images and answers them base64-encoded."""
        request = body.to_request(engine)
        job = await finished(engine.submit(request))
        return a1111_answer(body, request, job)

    @app.post("/sdapi/v1/img2img", dependencies=guarded, tags=["A1111"])
    async def img2img(body: A1111Img2Img):
        """A1111's image-to-image and inpainting (a mask)."""
        request = body.to_request(engine)
        job = await finished(engine.submit(request))
        return a1111_answer(body, request, job)

    @app.get("/sdapi/v1/samplers", dependencies=guarded, tags=["A1111"])
    def a1111_samplers():
        return [{"name": s["name"], "aliases": s["aliases"], "options": {}} for s in names_of("samplers")]

    @app.get("/sdapi/v1/schedulers", dependencies=guarded, tags=["A1111"])
    def a1111_schedulers():
        return [{"name": s["name"], "label": s["name"], "aliases": s["aliases"], "default_rho": None,
                 "need_inner_model": False} for s in names_of("schedules")]

    @app.get("/sdapi/v1/sd-models", dependencies=guarded, tags=["A1111"])
    def sd_models():
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
                for name in engine.paths]

    @app.get("/sdapi/v1/options", dependencies=guarded, tags=["A1111"])
    def options():
        return {"sd_model_checkpoint": engine.default}

    @app.get("/sdapi/v1/progress", dependencies=guarded, tags=["A1111"])
    def progress():
        """A1111's progress: of the oldest running job, with the queue's length."""
        state = engine.state()
        running = state["running"][0] if state["running"] else None
        eta = 0.0
        if running is not None and running.step and running.started:
            eta = (time.time() - running.started) / running.step * (running.steps - running.step)
        return {"progress": running.progress if running else 0.0, "eta_relative": round(eta, 3),
                "state": {"skipped": False, "interrupted": bool(running and running.cancel),
                          "job": running.id if running else "", "job_count": state["queued"] + len(state["running"]),
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(running.created))
                          if running else "0", "job_no": 0, "sampling_step": running.step if running else 0,
                          "sampling_steps": running.steps if running else 0},
                "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt", dependencies=guarded, tags=["A1111"])
    def interrupt():
        """Cancel the running jobs (A1111 stops its current one)."""
        for job in engine.state()["running"]:
            engine.cancel(job.id)
        return {}

    return app


async def ended(job: Job, seconds: float = float("inf")) -> None:
    """Wait, without holding the event loop, until `job` finishes or `seconds` pass."""
    end = time.monotonic() + seconds
    while not job.done.is_set() and time.monotonic() < end:
        await asyncio.sleep(0.02)


def names_of(kind: str) -> list[dict[str, Any]]:
    from .registry import registry

    reg = registry()
    return [{"name": name, "aliases": reg.aliases_of(kind, name)} for name in reg.names(kind)]


def _text(png: bytes, key: str) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.text.get(key, "")


def run(engine: Engine, host: str, port: int, api_key: str | None) -> None:
    """Serve until Ctrl-C; queued jobs then end as cancelled, with the reason."""
    import uvicorn

    if needs_key(host) and not api_key:
        raise LimnerError(f"--host {host} lets other machines reach this server: give an API key too "
                          "(--api-key or LIMNER_API_KEY), or bind 127.0.0.1")
    app = create_app(engine, api_key)
    print(f"limner serve: {', '.join(engine.paths)} (default {engine.default}) on http://{host}:{port}/  "
          f"(API: /v1, A1111: /sdapi/v1, schema: /openapi.json)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
