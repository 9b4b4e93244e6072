"""The `limner` command line. Plugins add commands through `limner_register_commands`."""
from __future__ import annotations

import functools
import json
import math
import sys
import textwrap

import click

from . import __version__
from .config import in_range, range_text
from .errors import LimnerError
from .registry import Registry, registry


def uses_cores(command):
    """Mark a work command: before it runs, torch's thread count is fitted to the cores other
    processes leave free (limner.threads)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from .threads import fit_to_load

        fit_to_load()
        return command(*args, **kwargs)

    return run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="limner")
def cli() -> None:
    """limner: text-conditioned image generation from swappable components."""


def plugin_rows(reg: Registry) -> list[dict]:
    """One row per loaded plugin that provides anything: distribution, version, components
    (a name two plugins claim is listed under both, marked "(clash)")."""
    table = reg.by_provider()
    for (kind, key), comps in reg.clashes.items():
        for comp in comps:
            names = table.setdefault(comp.provider.plugin, {}).setdefault(kind, [])
            names[:] = [n for n in names if n != key] + [f"{key} (clash)"]
    rows = []
    for plugin, kinds in table.items():
        provided = dict(kinds)
        commands = _commands_of(reg, plugin)
        if commands:
            provided["commands"] = commands
        if provided:
            prov = reg.providers[plugin]
            aliases = {kind: {n: reg.aliases_of(kind, n) for n in names if reg.aliases_of(kind, n)}
                       for kind, names in kinds.items() if kind != "commands"}
            rows.append({"plugin": plugin, "distribution": prov.distribution, "version": prov.version,
                         "components": provided, "aliases": {k: v for k, v in aliases.items() if v}})
    return rows


def _commands_of(reg: Registry, plugin: str) -> list[str]:
    impls = [i for i in reg.pm.hook.limner_register_commands.get_hookimpls() if i.plugin_name == plugin]
    scratch = click.Group()
    for impl in impls:
        impl.function(cli=scratch)
    return sorted(scratch.commands)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--aliases", "-a", "show_aliases", is_flag=True,
              help="Also show the other names each component answers to (ComfyUI's, diffusers', ...).")
def plugins(as_json: bool, show_aliases: bool) -> None:
    """List installed plugins and the components each provides."""
    reg = registry()
    rows = plugin_rows(reg)
    failures = [{"plugin": f.plugin, "distribution": f.distribution, "error": f.error} for f in reg.failures]
    clashes = [{"kind": kind, "name": key, "providers": [str(c.provider) for c in comps]}
               for (kind, key), comps in reg.clashes.items()]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failures": failures, "clashes": clashes}, indent=2))
        return
    for row in rows:
        click.echo(f"{row['plugin']}  ({row['distribution']} {row['version']})")
        for kind, names in row["components"].items():
            also = row["aliases"].get(kind, {}) if show_aliases else {}
            names = [f"{n} ({', '.join(also[n])})" if n in also else n for n in names]
            text = textwrap.fill(", ".join(names), width=88, initial_indent=f"  {kind + ':':<20}",
                                 subsequent_indent=" " * 22)
            click.echo(text)
    for f in reg.failures:
        click.echo(f"FAILED {f}", err=True)
    if reg.clashes:
        from .registry import clash_message

        click.echo(f"CLASH {clash_message(reg.clashes)}", err=True)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override train.steps.")
@uses_cores
def train(config: str, steps: int | None) -> None:
    """Train a diffusion model, GAN or VAE from a TOML config (resumes the run if it has a checkpoint).

    Multi-process: `accelerate launch -m limner.cli train CONFIG` or `torchrun --nproc_per_node N ...`.
    """
    from .recipes import train as run_training

    trainer = run_training(config, {"train.steps": steps} if steps is not None else None)
    if trainer.acc.num_processes > 1:
        leave_without_teardown(0)


def leave_without_teardown(code: int) -> None:
    """End a multi-process run once its files are written, skipping the interpreter's teardown:
    gloo's worker threads outlive destroy_process_group (torch 2.13 keeps the process group alive
    from C++), and freeing them while Python finalizes can abort a rank (SIGABRT, "terminate
    called without an active exception"; pytorch/pytorch#190489) after a run that succeeded."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Number(click.ParamType):
    """A finite float within [low, high] (an open end where asked): click's FloatRange lets
    nan and inf through."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        bounds = {"gt" if self.low_open else "ge": self.low, "le": self.high}
        if not in_range(number, **bounds):
            self.fail(f"{value} is not {range_text(**bounds)}", param, ctx)
        return number


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, help="A prompt (repeat for more).")
@click.option("--negative-prompt", "-n", "negative", default=None,
              help="Diffusion: what guidance steers away from, for every prompt (default: the empty prompt).")
@click.option("--sampler", default=None, help="Sampler name (default: the checkpoint's).")
@click.option("--schedule", default=None, help="Schedule name (default: the checkpoint's).")
@click.option("--steps", type=click.IntRange(1, 10_000), default=None,
              help="Sampling steps, 1 to 10000 (default: the checkpoint's).")
@click.option("--sigmas", default=None,
              help="Diffusion: the noise levels themselves, falling, comma-separated (e.g. 14.6,3.1,0.6,0); "
                   "replaces --schedule and --steps.")
@click.option("--guidance", type=Number(low=0), default=None,
              help="Classifier-free guidance scale, >= 0 (default: the checkpoint's).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="Seed of the noise, 0 to 2^64-1: same seed, same images.")
@click.option("--num", type=click.IntRange(1, 1000), default=1, show_default=True, help="Images per prompt, 1 to 1000.")
@click.option("--size", type=click.IntRange(8, 4096), default=None,
              help="Latent diffusion: the images' side in pixels (default: the model's own).")
@click.option("--out", type=click.Path(file_okay=False), default="out/samples", show_default=True,
              help="Folder for the PNGs, the grid and prompts.jsonl (added to, never overwritten).")
@click.option("--init-image", type=click.Path(dir_okay=False), default=None, help="Image-to-image start.")
@click.option("--strength", type=Number(low=0, high=1, low_open=True), default=None,
              help="How much of --init-image to redraw, in (0, 1] [default: 0.6].")
@click.option("--mask", type=click.Path(dir_okay=False), default=None, help="Inpainting mask: white = redraw.")
@click.option("--truncation", type=Number(low=0), default=None,
              help="GAN/VAE: pull samples toward their prompt's typical image (1 = off) [default: the checkpoint's].")
@click.option("--prediction", type=click.Choice(["eps", "v"]), default=None,
              help="What a model file of another tool predicts, where its metadata does not say (SD 2's 768-v: v).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:STRENGTH]",
              help="Apply a LoRA file (kohya/A1111 or diffusers/PEFT layout) at STRENGTH (default 1); repeatable.")
@click.option("--compile", "compile_", is_flag=True,
              help="Diffusion: torch.compile the denoiser first (~30 s once; pays off over many images).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "fp32", "bf16"]), default=None,
              help="Diffusion: compute in bfloat16 on a CPU with native bf16 (default: the checkpoint's).")
@uses_cores
def sample(checkpoint, prompts, negative, sampler, schedule, steps, sigmas, guidance, seed, num, size, out,
           init_image, strength, mask, truncation, prediction, loras, compile_, dtype):
    """Draw images from a trained checkpoint (diffusion, GAN or VAE): one PNG per image, named
    after its prompt and numbered on from the folder's earlier images, a labelled grid, and a line
    of settings in prompts.jsonl. Nothing already in --out is overwritten."""
    from pathlib import Path

    from .files import RECORDS, FolderLock, append_record
    from .images import check_writable, make_grid, next_output_index, output_name, save_atomic, to_pil
    from .pipeline import open_image
    from .recipes import load_pipeline

    if strength is not None and init_image is None:
        raise LimnerError("--strength sets how much of --init-image is redrawn; it has no effect without "
                          "--init-image")
    if strength is not None and mask is not None:
        raise LimnerError("--strength has no effect with --mask: inpainting redraws the masked part from pure "
                          "noise and keeps the rest; drop one of them")
    if any(not p.strip() for p in prompts):
        raise LimnerError("--prompt is empty: give the text of the picture (an empty prompt is what guidance "
                          "steers away from)")
    if sigmas is not None:
        from .sampling import explicit_sigmas

        try:
            sigmas = [float(v) for v in sigmas.split(",")]
        except ValueError:
            raise LimnerError(f"--sigmas takes comma-separated numbers (e.g. 14.6,3.1,0.6,0), got {sigmas!r}") from None
        explicit_sigmas(sigmas)  # checked before the checkpoint loads
    folder = Path(out)
    check_writable(folder)  # before minutes of sampling, not after
    from .lora import parse_spec

    lora_specs = [parse_spec(spec) for spec in loras]
    pipe = load_pipeline(checkpoint, prediction=prediction, lora=lora_specs, dtype=dtype)
    if compile_:
        if "compile" not in pipe.features:
            raise LimnerError(f"--compile is for diffusion checkpoints; {checkpoint} is a GAN or VAE")
        pipe.compile()
    given = dict(sampler=sampler, schedule=schedule, steps=steps, sigmas=sigmas, guidance=guidance, strength=strength,
                 init_image=open_image(init_image), mask=open_image(mask), truncation=truncation,
                 negative_prompt=negative, size=size)
    given = {k: v for k, v in given.items() if v is not None}
    tensors = pipe.generate(list(prompts), seed=seed, num=num, progress=True, **given)
    images = to_pil(tensors)
    settings = {"checkpoint": str(checkpoint), "seed": seed, "num": num,
                **{k: v for k, v in given.items() if k not in ("init_image", "mask")},
                **({"init_image": str(init_image)} if init_image else {}), **({"mask": str(mask)} if mask else {}),
                **({"prediction": prediction} if prediction else {}),
                **({"lora": [f"{path}:{weight:g}" for path, weight in lora_specs]} if lora_specs else {})}
    kept = None
    if init_image is not None and "init_image" in pipe.features:  # how much of the init image survived
        kept = pipe.kept_psnr(tensors, given["init_image"], given.get("mask"))
        settings["kept_psnr_db"] = "inf" if math.isinf(kept) else round(kept, 2)
    written: list[Path] = []
    with FolderLock(folder, "sample", wait=True, note=False):  # samplers into one folder take turns numbering files
        try:
            first = next_output_index(folder)
            records = []
            for i, image in enumerate(images):
                prompt = prompts[i // num]
                name = output_name(first + i, prompt)
                written.append(save_atomic(image, folder / name, {"prompt": prompt, "index_of_prompt": str(i % num),
                                                                 "limner": json.dumps(settings)}, replace=False))
                records.append({"file": name, "prompt": prompt, "image_of_prompt": i % num})
            labels = [f"seed {seed + k}" for k in range(num)] if num > 1 else []  # image k of a prompt: seed + k
            grid = f"grid-{first:03d}.png"
            written.append(save_atomic(make_grid(images, ncols=num, row_labels=list(prompts), col_labels=labels),
                                       folder / grid, replace=False))
            append_record(folder / RECORDS, {"settings": settings, "grid": grid, "images": records})
        except BaseException:  # a full disk, Ctrl-C: no half run is left behind
            for path in written:
                path.unlink(missing_ok=True)
            raise
    count = f"{len(images)} image{'s' if len(images) != 1 else ''}"
    click.echo(f"Wrote {count} ({records[0]['file']} .. {records[-1]['file']}), {grid} and a line of {RECORDS} "
               f"to {folder}")
    if kept is not None:
        region = "outside the mask" if mask else "the whole image (image-to-image)"
        click.echo(f"PSNR against the init image, {region}: "
                   + ("identical (inf dB)" if math.isinf(kept) else f"{kept:.2f} dB"))


@cli.command(name="eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--prompts", type=click.IntRange(min=1), default=None,
              help="How many held-out prompts [default: the run's eval.prompts].")
@click.option("--sampler", default=None, help="Diffusion: sampler name (default: the checkpoint's).")
@click.option("--steps", type=click.IntRange(1, 10_000), default=None, help="Diffusion: sampling steps, 1 to 10000.")
@click.option("--guidance", type=Number(low=0), default=None, help="Diffusion: classifier-free guidance scale, >= 0.")
@click.option("--metrics", default=None,
              help="Comma-separated metrics (e.g. fid,kid,inception_score,ssim) [default: the run's metric].")
@click.option("--reconstruct", is_flag=True,
              help="VAE: score reconstructions of the held-out images (encode + decode) instead of samples.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON here, and as a markdown table beside it (.md).")
@uses_cores
def evaluate(checkpoint, prompts, sampler, steps, guidance, metrics, reconstruct, out):
    """Score a checkpoint on its run's held-out prompts with the run's metric, or --metrics."""
    from pathlib import Path

    from .files import check_own_file, write_text_atomic
    from .images import check_writable
    from .recipes import evaluate_checkpoint

    if out:  # checked before minutes of sampling: only a report limner wrote is replaced
        for path, what in ((Path(out), "report"), (Path(out).with_suffix(".md"), "report table")):
            check_own_file(path, lambda data: b"held-out prompts" in data or b'"scores"' in data, f"eval {what}")
        check_writable(Path(out).parent)
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    if metrics is not None and not names:
        raise LimnerError(f"--metrics names no metric: {metrics!r}; give e.g. fid,kid (see limner plugins)")
    sampling = {k: v for k, v in dict(sampler=sampler, steps=steps, guidance=guidance).items() if v is not None}
    report = evaluate_checkpoint(checkpoint, prompts, metrics=names, reconstruct=reconstruct, **sampling)
    if out:
        write_text_atomic(Path(out), json.dumps(report, indent=1, allow_nan=False) + "\n")
        rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in report["scores"].items())
        write_text_atomic(Path(out).with_suffix(".md"),
                          f"{report['checkpoint']} (step {report['step']}), {report['prompts']} held-out prompts\n\n"
                          f"| metric | value |\n|---|---:|\n{rows}\n")
    what = "reconstructions of" if reconstruct else "samples of"
    click.echo(f"{report['checkpoint']} (step {report['step']}), {report['metric']} on {what} {report['prompts']} "
               "held-out prompts:")
    for key, value in report["scores"].items():
        click.echo(f"  {key:<18} {value:.4g}")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "-m", required=True,
              help="The captioner: a registered name (see `limner plugins`: shapes, fashion_mnist) or a folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON ({file: caption}) instead of lines.")
@uses_cores
def caption(images, model, as_json):
    """Say what each image shows (image -> text), one line per image."""
    from .captioning import caption as caption_images

    texts = caption_images(list(images), model)
    if as_json:
        click.echo(json.dumps(dict(zip(images, texts)), indent=1))
        return
    for path, text in zip(images, texts):
        click.echo(f"{path}: {text}")


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def inspect(path: str, as_json: bool) -> None:
    """Say what a checkpoint, model file or folder is: recipe or family, parts and their size."""
    from .recipes import describe

    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                shown = ", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else v
                click.echo(f"  {k}: {shown}")
        else:
            click.echo(f"{key}: {value}")


@cli.command()
@click.argument("run", type=click.Path())
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--full-precision", is_flag=True, help="Keep float32 weights (default: float16).")
@click.option("--force", is_flag=True, help="Replace DEST when it is a checkpoint limner wrote (never other files).")
def export(run: str, dest: str, full_precision: bool, force: bool) -> None:
    """Copy a run's latest checkpoint as a small release: config + EMA weights + the files its
    model reads (a GGUF language model, say). DEST must be a new or empty folder."""
    from .checkpoint import ATTACHED, export_checkpoint

    path = export_checkpoint(run, dest, half=not full_precision, force=force)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6
    attached = sum(p.stat().st_size for p in (path / ATTACHED).rglob("*") if p.is_file()) / 1e6
    click.echo(f"Wrote {path} ({size:.1f} MB" + (f", and {attached:.1f} MB of files its model reads in "
                                                 f"{ATTACHED}/, hard-linked where they could be)" if attached else ")"))


@cli.command()
@click.argument("checkpoints", nargs=-1, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to listen on.")
@click.option("--api-key", envvar="LIMNER_API_KEY", default=None,
              help="Key every API request must carry (Authorization: Bearer KEY) [env: LIMNER_API_KEY].")
@click.option("--memory", type=Number(low=0, low_open=True), default=None,
              help="GB of loaded models kept before the least recently used is dropped [default: half the RAM].")
@uses_cores
def serve(checkpoints, host, port, api_key, memory):
    """Serve checkpoints over HTTP: limner's JSON API (/v1), A1111's API (/sdapi/v1) and a web
    page at /, with models kept loaded and a job queue. Without CHECKPOINTs: the shipped ones."""
    from .serve import Engine, served_models

    try:
        from .server import run
    except ImportError as exc:
        raise LimnerError(f"limner serve needs FastAPI and uvicorn (missing: {exc.name}): "
                          "pip install 'limner[serve]'") from None
    engine = Engine(served_models(checkpoints), memory=None if memory is None else int(memory * 2**30))
    run(engine, host, port, api_key)


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Demo config (default: the built-in one).")
@click.option("--out", type=click.Path(file_okay=False), default="out/demo", show_default=True,
              help="Where to write the grid.")
@uses_cores
def demo(config_path: str | None, out: str) -> None:
    """Show what is installed, draw prompts x samplers from the shipped model, score it."""
    from .demo import run_demo

    run_demo(config_path, out)


@cli.command()
@click.option("-k", "select", default=None, help="Only benchmarks matching this pytest -k expression.")
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True,
              help="Folder for the JSON and markdown results.")
@click.option("--quick", is_flag=True, help="Fewer rounds: a smoke run, not numbers to quote.")
@click.option("--anchors", is_flag=True,
              help="limner beside diffusers and k-diffusion on the same work (needs limner[bench]).")
def bench(select: str | None, out: str, quick: bool, anchors: bool) -> None:
    """Run the benchmark suite (or, with --anchors, the side-by-side) and render the results as markdown."""
    from pathlib import Path

    from .bench import render_file, run_anchors, run_benchmarks

    if anchors:
        if select:
            raise LimnerError("-k selects pytest benchmarks; --anchors runs one fixed side-by-side: use one of them")
        md = run_anchors(Path(out), quick).with_suffix(".md")
    else:
        md = render_file(run_benchmarks(select, Path(out), quick))
    click.echo(md.read_text())
    click.echo(f"Wrote {md} and {md.with_suffix('.json')}")


def _add_plugin_commands() -> None:
    try:
        registry().pm.hook.limner_register_commands(cli=cli)
    except LimnerError as exc:  # e.g. a name clash: still let `limner plugins` say so
        click.echo(f"warning: plugin commands not loaded: {exc}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `limner` script: user errors print one paragraph and exit 1."""
    from .registry import working_folder_entries

    for entry in working_folder_entries():  # `python -m limner.cli` in a downloaded folder: import nothing from it
        while entry in sys.path:
            sys.path.remove(entry)
    _add_plugin_commands()
    try:
        cli.main(args=argv, prog_name="limner", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LimnerError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # a full or read-only disk, a vanished folder: the temp files are already removed
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"Error: cannot read or write{where}: {exc.strerror or exc}. Files limner was writing were "
                   "removed; what was there before is untouched.", err=True)
        sys.exit(1)
    except MemoryError:
        click.echo("Error: out of memory: use fewer or smaller images (--num, prompts, image size).", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
