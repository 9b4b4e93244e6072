"""`limner serve`'s engine, apart from HTTP: checkpoints kept loaded (the least recently used
dropped past a memory bound), a job queue with one worker thread per model, and queued jobs
that share a model and settings drawn as one batch. Each prompt keeps its own seed
(limner.sampling.item_generators), so a job draws the same images alone or in any batch.
limner.server puts the JSON API, A1111's API and the web page on top of it.

    engine = Engine({"shapes": "checkpoints/shapes-unet"})
    job = engine.submit(Request(prompts=["a red circle at the top left"], seed=3))
    job.done.wait(); job.images[0]  # PNG bytes, settings in the metadata
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import secrets
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LimnerError

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})
RANDOM_SEEDS = 2**32  # a request without a seed gets one below this (and is told which)


class RequestError(LimnerError):
    """A request the server refuses, with the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """Raised from the per-step callback: every job of the batch was cancelled."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each refusal names its limit."""

    prompt_chars: int = 2000
    prompts: int = 16  # prompts per request
    count: int = 16  # images per prompt
    images: int = 64  # prompts x count per request
    steps: int = 500
    size: int = 2048  # pixels, square
    request_bytes: int = 32 * 2**20  # the whole HTTP body, init image and mask included
    queued: int = 1000  # jobs waiting at once
    batch: int = 16  # images drawn in one batched call

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Request:
    """One generation request, in limner's terms (sampler settings None = the checkpoint's)."""

    prompts: list[str]
    model: str | None = None  # None: the server's default model (its first)
    negative_prompt: str | None = None
    sampler: str | None = None
    schedule: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None: a random seed, reported with the job
    count: int = 1  # images per prompt
    size: int | None = None
    strength: float | None = None
    truncation: float | None = None
    dtype: str | None = None  # "bfloat16" where the hardware has it (limner.pipeline.precision)
    init_image: Any = None  # PIL images
    mask: Any = None

    OPTIONS = ("negative_prompt", "sampler", "schedule", "steps", "guidance", "size", "strength", "truncation",
               "dtype", "init_image", "mask")

    def options(self) -> dict[str, Any]:
        """The pipeline options given (None left out: the checkpoint's default)."""
        return {k: getattr(self, k) for k in self.OPTIONS if getattr(self, k) is not None}

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys are drawn in one call; one with an init image is drawn alone."""
        if self.init_image is not None or self.mask is not None:
            return None
        return self.model, self.count, tuple(sorted(self.options().items()))

    def settings(self) -> dict[str, Any]:
        """What the job was asked, as JSON (the images as whether they were given)."""
        out = {k: v for k, v in self.options().items() if k not in ("init_image", "mask")}
        out.update(model=self.model, seed=self.seed, count=self.count)
        if self.init_image is not None:
            out["init_image"] = True
        if self.mask is not None:
            out["mask"] = True
        return out


@dataclass
class Job:
    id: str
    request: Request
    status: str = QUEUED
    step: int = 0
    steps: int = 0
    error: str | None = None
    images: list[bytes] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # one per image
    prompts: list[str] = field(default_factory=list)  # one per image
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    batch: int = 0  # images in the call that drew this job
    settings: dict[str, Any] = field(default_factory=dict)  # as drawn: the model's defaults filled in
    fault: str | None = None  # a failed job's: "request" (its input) or "server"
    cancel: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def progress(self) -> float:
        if self.status == DONE:
            return 1.0
        return min(self.step / self.steps, 0.999) if self.steps else 0.0

    def view(self) -> dict[str, Any]:
        """The job as the API shows it (images as their index; the HTTP layer adds URLs)."""
        return {"id": self.id, "status": self.status, "progress": round(self.progress, 4), "step": self.step,
                "steps": self.steps, "error": self.error, "model": self.request.model,
                "settings": self.settings or self.request.settings(), "fault": self.fault,
                "created": self.created, "started": self.started,
                "finished": self.finished, "batch": self.batch,
                "images": [{"index": i, "prompt": p, "seed": s} for i, (p, s) in enumerate(zip(self.prompts,
                                                                                              self.seeds))]}


def infotext(prompt: str, settings: dict[str, Any], seed: int, size: int) -> str:
    """A1111's "parameters" text (what its PNG Info tab and other tools read back)."""
    lines = [prompt]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields_ = [("Steps", settings.get("steps")), ("Sampler", settings.get("sampler")),
               ("Schedule type", settings.get("schedule")), ("CFG scale", settings.get("guidance")),
               ("Seed", seed), ("Size", f"{size}x{size}"), ("Model", settings.get("model")),
               ("Denoising strength", settings.get("strength"))]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields_ if v is not None))
    return "\n".join(lines)


def decode_image(data: Any, what: str):
    """A PIL image from base64 (A1111's form, a data: URL allowed); errors name the field."""
    import base64
    import binascii

    from .pipeline import open_image

    if data is None:
        return None
    if not isinstance(data, str) or not data:
        raise RequestError(f"{what} must be a base64-encoded PNG or JPEG (a data: URL is fine)")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64: send the image file's bytes base64-encoded") from None
    try:
        return open_image(io.BytesIO(raw), what)
    except LimnerError as exc:
        raise RequestError(str(exc)) from None


def served_models(paths: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """{name: path} of the checkpoints to serve, each checked to be one limner reads (a name is
    its folder's or file's name without the extension); none given: the demo's shipped ones."""
    from .recipes import describe

    if not paths:
        from .config import load_config
        from .demo import DEFAULT_CONFIG, DemoConfig, find_shipped

        shipped = [find_shipped(c) for c in load_config(DEFAULT_CONFIG, DemoConfig).checkpoints]
        paths = [str(p) for p in shipped if p is not None]
        if not paths:
            raise LimnerError("no CHECKPOINT given and no shipped checkpoint found (checkpoints/ of the limner "
                              "checkout): name the checkpoints to serve")
    named: dict[str, Path] = {}
    for path in paths:
        describe(path)  # a missing or unreadable checkpoint is named now, not at the first request
        name = Path(path).name
        name = name.rsplit(".", 1)[0] if Path(path).is_file() else name
        if name in named:
            raise LimnerError(f"two checkpoints are both called {name!r} ({named[name]} and {path}): requests name "
                              "models by folder or file name; rename one")
        named[name] = Path(path)
    return named


def drawn_with(pipe, settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with what the request left to the model filled in from the pipeline's defaults
    (those of its settings that it has: a diffusion model's sampler, a GAN's truncation)."""
    out = dict(settings)
    for key in Request.OPTIONS:
        value = getattr(pipe.defaults, key, None)
        if key not in out and value is not None and not callable(value):
            out[key] = getattr(value, "name", value)  # a component's config: its name
    return out


def model_bytes(pipe) -> int:
    """The bytes of a pipeline's weights and buffers (what the memory bound counts)."""
    tensors = [*pipe.model.parameters(), *pipe.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def default_memory() -> int:
    """Half of this machine's memory: the default bound on loaded models."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


class Engine:
    """Models by name, a queue and a worker per model, finished jobs kept for `history`."""

    def __init__(self, checkpoints: dict[str, str | Path], memory: int | None = None, limits: Limits = Limits(),
                 history: int = 500, load: Callable[[str | Path], Any] | None = None):
        if not checkpoints:
            raise LimnerError("limner serve needs at least one checkpoint to serve")
        if load is None:
            from .recipes import load_pipeline as load
        self.paths, self.default = dict(checkpoints), next(iter(checkpoints))
        self.memory, self.limits, self.history, self.load = memory or default_memory(), limits, history, load
        self.lock = threading.Condition()
        self.queues: dict[str, collections.deque[Job]] = {name: collections.deque() for name in self.paths}
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.pipes: collections.OrderedDict[str, Any] = collections.OrderedDict()  # least recently used first
        self.sizes: dict[str, int] = {}
        self.busy: set[str] = set()
        self.workers: dict[str, threading.Thread] = {}
        self.closed = False
        self.counts = collections.Counter()  # jobs by final status, batches
        self._facts: dict[str, dict[str, Any]] = {}

    # --- what clients call -----------------------------------------------------------------

    def submit(self, request: Request) -> Job:
        """Check `request` (RequestError names what is wrong) and queue it; returns its job."""
        self.check(request)
        job = Job(uuid.uuid4().hex, request)
        with self.lock:
            if self.closed:
                raise RequestError("the server is shutting down: it takes no new jobs", 503)
            if sum(len(q) for q in self.queues.values()) >= self.limits.queued:
                raise RequestError(f"the queue is full ({self.limits.queued} jobs waiting): try again later", 503)
            self.jobs[job.id] = job
            self.queues[request.model].append(job)
            if request.model not in self.workers:
                worker = threading.Thread(target=self._work, args=(request.model,), daemon=True,
                                          name=f"limner-{request.model}")
                self.workers[request.model] = worker
                worker.start()
            self.lock.notify_all()
        return job

    def job(self, job_id: str) -> Job:
        with self.lock:
            if job_id not in self.jobs:
                raise RequestError(f"no job {job_id!r}: it never existed or was dropped from the last "
                                   f"{self.history} finished jobs", 404)
            return self.jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        """A queued job ends now; a running one at its batch's next step (when every job of the
        batch is cancelled) or when the batch ends (its images are not kept). A finished job is
        left as it is."""
        job = self.job(job_id)
        with self.lock:
            if job.status == QUEUED:
                self.queues[job.request.model].remove(job)
                self._finish(job, CANCELLED, "cancelled before it ran")
            elif job.status == RUNNING:
                job.cancel = True
        return job

    def facts(self, name: str) -> dict[str, Any]:
        """What a served model is, read from its files once (limner.recipes.describe), never loading it."""
        if name not in self._facts:
            from .recipes import describe

            try:
                found = describe(self.paths[name])
            except LimnerError as exc:
                found = {"error": str(exc)}
            model = found.get("model", {}) if isinstance(found.get("model"), dict) else {}
            keep = {k: found[k] for k in ("recipe", "format", "family", "step", "error") if k in found}
            self._facts[name] = {**keep, **({"image_size": model["image_size"]} if "image_size" in model else {})}
        return self._facts[name]

    def state(self) -> dict[str, Any]:
        """Queued and running jobs, loaded models: what /v1/status and A1111's progress read."""
        with self.lock:
            running = [j for j in self.jobs.values() if j.status == RUNNING]
            return {"queued": sum(len(q) for q in self.queues.values()), "running": running,
                    "loaded": list(self.pipes), "memory": sum(self.sizes[n] for n in self.pipes),
                    "memory_bound": self.memory, "finished": dict(self.counts)}

    def close(self, timeout: float = 30.0) -> None:
        """Stop: queued jobs end as cancelled with the reason, running ones stop at their next
        step; workers are joined (up to `timeout` seconds)."""
        with self.lock:
            self.closed = True
            for queue in self.queues.values():
                while queue:
                    self._finish(queue.popleft(), CANCELLED, "the server shut down before this job ran")
            for job in self.jobs.values():
                if job.status == RUNNING:
                    job.cancel = True
            self.lock.notify_all()
        end = time.monotonic() + timeout
        for worker in list(self.workers.values()):
            worker.join(max(0.0, end - time.monotonic()))

    # --- checks ----------------------------------------------------------------------------

    def check(self, r: Request) -> None:
        """Every field of a request against its type and the limits, names against the registry."""
        lim = self.limits
        if r.model is None:
            r.model = self.default
        if not isinstance(r.model, str) or r.model not in self.paths:
            raise RequestError(f"unknown model {r.model!r}: this server serves {', '.join(self.paths)}")
        prompts = [r.prompts] if isinstance(r.prompts, str) else r.prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("prompt must be a text or a list of 1 or more texts")
        if len(prompts) > lim.prompts:
            raise RequestError(f"{len(prompts)} prompts: a request takes at most {lim.prompts}")
        for text, what in [(p, "prompt") for p in prompts] + [(r.negative_prompt or "", "negative_prompt")]:
            if len(text) > lim.prompt_chars:
                raise RequestError(f"the {what} has {len(text)} characters: at most {lim.prompt_chars}")
        if any(not p.strip() for p in prompts):
            raise RequestError("a prompt is empty: give the text of the picture")
        r.prompts = prompts
        r.count = _whole(r.count, "count", 1, lim.count)
        if len(prompts) * r.count > lim.images:
            raise RequestError(f"{len(prompts)} prompts x count {r.count} = {len(prompts) * r.count} images: a "
                               f"request draws at most {lim.images}")
        if r.steps is not None:
            r.steps = _whole(r.steps, "steps", 1, lim.steps)
        if r.size is not None:
            r.size = _whole(r.size, "size", 8, lim.size)
        from .sampling import MAX_SEED

        if r.seed is None or (not isinstance(r.seed, bool) and r.seed == -1):  # A1111's -1: random
            r.seed = secrets.randbelow(RANDOM_SEEDS)
        r.seed = _whole(r.seed, "seed", 0, MAX_SEED - (r.count - 1))
        r.guidance = _number(r.guidance, "guidance", 0, 100)
        r.strength = _number(r.strength, "strength", 0, 1, low_open=True)
        r.truncation = _number(r.truncation, "truncation", 0, 1)
        from .pipeline import PRECISIONS

        if r.dtype is not None and r.dtype not in PRECISIONS:
            raise RequestError(f"dtype {r.dtype!r}: give one of {', '.join(PRECISIONS)}")
        if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
            raise RequestError("negative_prompt must be a text")
        if r.mask is not None and r.init_image is None:
            raise RequestError("a mask needs an init image: the picture whose masked part is redrawn")
        if r.strength is not None and r.mask is not None:
            raise RequestError("strength has no effect with a mask: inpainting redraws the masked part from pure "
                               "noise and keeps the rest; drop one of them")
        if r.strength is not None and r.init_image is None:
            raise RequestError("strength sets how much of the init image is redrawn; it needs an init image")
        self._check_names(r)

    @staticmethod
    def _check_names(r: Request) -> None:
        from .registry import registry
        from .sampling import split_sampler_name

        for what in ("sampler", "schedule"):
            name = getattr(r, what)
            if name is not None and (not isinstance(name, str) or not name.strip()):
                raise RequestError(f"{what} must be a name (GET /v1/{what}s lists them), got {name!r}")
        try:  # names as registered, so that "DPM++ 2M Karras" and dpmpp_2m + karras batch together
            schedule = None if r.schedule is None else registry().component("schedules", r.schedule).spec.name
            if r.sampler is not None:
                sampler, implied = split_sampler_name(r.sampler)
                if implied and schedule and schedule != implied:
                    raise RequestError(f"sampler {r.sampler!r} says schedule {implied!r} but schedule is "
                                       f"{r.schedule!r}: give one of them")
                r.sampler, schedule = registry().component("samplers", sampler).spec.name, schedule or implied
            r.schedule = schedule
        except RequestError:
            raise
        except LimnerError as exc:
            raise RequestError(str(exc)) from None

    # --- the workers ------------------------------------------------------------------------

    def _work(self, name: str) -> None:
        """One model's worker: take the oldest job and those queued behind it that share its
        settings, draw them in one call, finish each. A failure ends those jobs, never the worker."""
        while True:
            with self.lock:
                while not self.queues[name] and not self.closed:
                    self.lock.wait()
                if self.closed and not self.queues[name]:
                    return
                batch = self._take(self.queues[name])
                for job in batch:
                    job.status, job.started = RUNNING, time.time()
                self.busy.add(name)
            try:
                self._attempt(name, batch)
                for job in batch:  # a batch refused for its input: each job alone, so one bad prompt fails one job
                    if job.status == RUNNING and job.fault == "request":
                        job.error, job.fault = None, None
                        self._attempt(name, [job])
            finally:
                with self.lock:
                    self.busy.discard(name)
                    self._evict()

    def _attempt(self, name: str, batch: list[Job]) -> None:
        """Draw `batch`; every way it can fail ends its jobs with the reason."""
        try:
            self._draw(name, batch)
        except Cancelled:
            self._end(batch, CANCELLED, "cancelled while it ran")
        except LimnerError as exc:  # the request's settings, as the pipeline checks them
            self._end(batch, FAILED, str(exc), fault="request", final=len(batch) == 1)
        except Exception as exc:  # a bug or an out-of-memory: the job says so, the worker goes on
            traceback.print_exc(file=sys.stderr)
            self._end(batch, FAILED, f"{type(exc).__name__}: {exc}")

    def _take(self, queue: collections.deque[Job]) -> list[Job]:
        """The oldest job and every later one with its batch key, up to the batch limit."""
        first = queue.popleft()
        batch, key = [first], first.request.batch_key()
        if key is None:
            return batch
        per_prompt = first.request.count
        room = self.limits.batch - len(first.request.prompts) * per_prompt
        for job in list(queue):
            images = len(job.request.prompts) * per_prompt
            if job.request.batch_key() == key and images <= room:
                queue.remove(job)
                batch.append(job)
                room -= images
        return batch

    def _draw(self, name: str, batch: list[Job]) -> None:
        from .images import png_bytes, to_pil

        pipe = self.pipeline(name)
        first = batch[0].request
        prompts = [p for job in batch for p in job.request.prompts]
        seeds = [job.request.seed for job in batch for _ in job.request.prompts]
        options = first.options()
        if "samplers" in pipe.features:
            options["callback"] = lambda info: self._step(batch, info)
        images = to_pil(pipe.generate(prompts, seed=seeds, num=first.count, **options))
        settings = {**drawn_with(pipe, first.settings()), "model": name, "size": images[0].width}
        settings.pop("seed")
        start = 0
        for job in batch:
            n = len(job.request.prompts) * first.count
            if not job.cancel:
                job.prompts = [p for p in job.request.prompts for _ in range(first.count)]
                job.seeds = [job.request.seed + k % first.count for k in range(n)]
                job.images = [png_bytes(im, {"prompt": p, "parameters": infotext(p, settings, s, im.width),
                                             "limner": json.dumps({**settings, "seed": s})})
                              for im, p, s in zip(images[start:start + n], job.prompts, job.seeds)]
            start += n
        with self.lock:
            self.counts["batches"] += 1
            for job in batch:
                job.batch = len(images)
                if job.cancel:
                    self._finish(job, CANCELLED, "cancelled while it ran")
                else:
                    job.step, job.settings = job.steps, {**settings, "seed": job.request.seed}
                    self._finish(job, DONE)

    def _step(self, batch: list[Job], info: dict[str, Any]) -> None:
        for job in batch:
            job.step, job.steps = info["i"] + 1, max(info.get("steps", 0), info["i"] + 1)
        if self.closed or all(job.cancel for job in batch):
            raise Cancelled

    def _end(self, batch: list[Job], status: str, error: str, fault: str = "server", final: bool = True) -> None:
        """Under the lock, end the unfinished jobs of `batch`; final=False marks a request fault
        of a batch of several without finishing, for `_work` to draw each job alone."""
        with self.lock:
            for job in batch:
                if job.status in FINISHED:
                    continue
                if job.cancel:
                    self._finish(job, CANCELLED, "cancelled while it ran")
                    continue
                job.fault = fault if status == FAILED else None
                if final:
                    self._finish(job, status, error)
                else:
                    job.error = error

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        """Under the lock: the job's last state, and the oldest finished jobs past `history` dropped."""
        job.status, job.error, job.finished = status, error, time.time()
        self.counts[status] += 1
        job.done.set()
        finished = [j for j in self.jobs.values() if j.status in FINISHED]
        for old in finished[: max(0, len(finished) - self.history)]:
            del self.jobs[old.id]

    # --- models -----------------------------------------------------------------------------

    def pipeline(self, name: str):
        """The model's pipeline, loaded on first use and marked most recently used."""
        with self.lock:
            if name in self.pipes:
                self.pipes.move_to_end(name)
                return self.pipes[name]
        pipe = self.load(self.paths[name])  # outside the lock: other models go on drawing
        with self.lock:
            self.pipes[name], self.sizes[name] = pipe, model_bytes(pipe)
            self._evict()
        return pipe

    def _evict(self) -> None:
        """Under the lock: drop least recently used idle models while the loaded ones pass the bound."""
        for name in list(self.pipes):
            if sum(self.sizes[n] for n in self.pipes) <= self.memory:
                break
            if name not in self.busy and not self.queues[name]:
                del self.pipes[name]


def _whole(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise RequestError(f"{what} must be a whole number from {low} to {high}, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{what} {value} is out of range: it must be from {low} to {high}")
    return value


def _number(value: Any, what: str, low: float, high: float, low_open: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{what} must be a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise RequestError(f"{what} {value} is out of range: it must be {'above' if low_open else 'from'} {low:g} "
                           f"{'and at most' if low_open else 'to'} {high:g}")
    return float(value)
