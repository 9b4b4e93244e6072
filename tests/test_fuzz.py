"""Property-based fuzzing (hypothesis) of what a stranger can hand limner: command-line options,
config values, and mutations of checkpoint and run folders. Whatever the input: exit 0, or exit
!= 0 with one paragraph and no traceback; on a refusal nothing is written and nothing is lost.

The examples are derandomized (the same ones every CI run); LIMNER_FUZZ_EXAMPLES draws that many
random ones for a longer hunt: `LIMNER_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py`."""
import json
import os
import shutil
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_train import TINY, write_config  # noqa: E402

from limner.cli import main  # noqa: E402
from limner.recipes import train  # noqa: E402

EXAMPLES = int(os.environ.get("LIMNER_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="LIMNER_FUZZ_EXAMPLES" not in os.environ,
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    train(write_config(tmp, steps=2))
    return tmp / "run"


def tree(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def limner_cli(capsys, args: list[str]) -> tuple[int, str]:
    """Run `limner ARGS` in-process: (exit code, stderr). Any exception but SystemExit fails the
    test: that would be a traceback."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def refused_cleanly(code: int, err: str) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("note: ", "\r", "sampling"))]
    errors = [line for line in lines if line.startswith(("Error", "Usage", "Try "))]
    assert errors, err
    assert len([line for line in lines if line.startswith("Error")]) == 1, err


def weird_text():
    return st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "nan", "inf", "-inf", "1e400", "0x10", "-0",
                                                           "1,2", "euler", "karras", "DPM++ 2M Karras", "\x00"]))


NUMBERS = st.one_of(st.integers(-3, 3), st.integers(10_001, 2**70).map(str), st.floats(allow_nan=True,
                    allow_infinity=True).map(repr), weird_text())


OPTION_VALUES = {
    "--steps": NUMBERS, "--num": NUMBERS, "--seed": st.one_of(NUMBERS, st.integers(2**63, 2**66)),
    "--guidance": st.one_of(NUMBERS, st.floats(1e5, 1e300)), "--strength": NUMBERS, "--truncation": NUMBERS,
    "--sampler": weird_text(), "--schedule": weird_text(),
    "--sigmas": st.one_of(weird_text(), st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5)
                          .map(lambda v: ",".join(repr(x) for x in v))),
}


@FUZZ
@given(options=st.dictionaries(st.sampled_from(sorted(OPTION_VALUES)), st.just(None), max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: OPTION_VALUES[k] for k in keys})),
    prompt=st.one_of(st.just("a red circle"), weird_text()))
def test_sample_options(run, tmp_path_factory, capsys, options, prompt):
    out = tmp_path_factory.mktemp("o") / "out"
    args = ["sample", str(run), "-p", prompt, "--out", str(out)]
    for key, value in options.items():
        if key in ("--steps", "--num"):
            try:  # a valid count samples: keep it small
                value = min(int(value), 3) if int(value) >= 1 else value
            except (TypeError, ValueError):
                pass
        args += [key, str(value)]
    before = tree(run)
    code, err = limner_cli(capsys, args)
    assert tree(run) == before
    if code != 0:
        refused_cleanly(code, err)
        assert not list(out.glob("*.png")), "a refused run wrote images"


CONFIG_KEYS = [("data", "batch_size"), ("data", "caption_dropout"), ("data", "dataset"), ("model", "image_size"),
               ("model", "text_encoder"), ("model", "denoiser"), ("train", "lr"), ("train", "warmup"),
               ("train", "log_every"), ("train", "checkpoint_every"), ("train", "nonfinite"), ("train", "ema"),
               ("train", "max_weight_growth"), ("sample", "sampler"), ("sample", "schedule"), ("sample", "steps"),
               ("sample", "sigma_min"), ("sample", "prompts"), ("eval", "metric"), ("", "seed"), ("", "out"),
               ("", "recipe")]
TOML_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-2, 70),
    st.floats(allow_nan=False).map(lambda f: repr(f)),
    st.sampled_from(
        [
            "nan",
            "inf",
            "-inf",
            "0.0",
            "1e300",
            "true",
            "[]",
            "{}",
            '""',
            '"eulr"',
            '"karras"',
            "[1, 2]",
            '{ name = "dit", dim = 0 }',
            '{ name = "dit", heads = 0 }',
            '{ name = "dit", depth = -1 }',
            '{ name = "dit", dim = 33, heads = 2 }',
            '{ name = "unet", mults = [] }',
            '{ name = "bert", dim = 0 }',
            '{ name = "bert", max_length = 1 }',
            '{ name = "shapes", size = 0 }',
            '{ name = "shapes", length = 0 }',
            '{ name = "karras", rho = nan }',
            '{ name = "nope" }',
        ]
    ),
    st.text(max_size=8).map(json.dumps),
)


@FUZZ
@given(key=st.sampled_from(CONFIG_KEYS), value=TOML_VALUES)
def test_config_values(tmp_path_factory, capsys, key, value):
    tmp = tmp_path_factory.mktemp("c")
    section, name = key
    lines = [line for line in TINY.format(out=(tmp / "run").as_posix(), steps=2).splitlines()
             if not line.startswith(f"{name} =") or (section and not _in_section(TINY, line, section))]
    text = "\n".join(lines)
    if section:
        text = text.replace(f"[{section}]\n", f"[{section}]\n{name} = {value}\n", 1)
    else:
        text = f"{name} = {value}\n{text}"
    path = tmp / "c.toml"
    path.write_text(text)
    here = os.getcwd()
    os.chdir(tmp)  # a relative `out` lands in the example's own folder
    try:
        code, err = limner_cli(capsys, ["train", str(path), "--steps", "2"])
    finally:
        os.chdir(here)
    if code != 0:
        refused_cleanly(code, err)
        assert not [p for p in (tmp / "run").rglob("*tmp*")], "a refusal left temp files"


def _in_section(text: str, line: str, section: str) -> bool:
    current = ""
    for ln in text.splitlines():
        if ln.startswith("["):
            current = ln.strip("[]")
        if ln == line:
            return current == section
    return False


MUTATIONS = ["delete", "truncate", "flip", "empty", "dir", "json", "symlink"]
FILES = ["checkpoints/latest", "checkpoints/step_0000002/model.safetensors", "checkpoints/step_0000002/ema.safetensors",
         "checkpoints/step_0000002/opt_model.safetensors", "checkpoints/step_0000002/state.json",
         "checkpoints/step_0000002/config.toml", "metrics.jsonl"]
def json_containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6)
JSON_VALUES = st.recursive(JSON_SCALARS, json_containers, max_leaves=8)


@FUZZ
@given(target=st.sampled_from(FILES), mutation=st.sampled_from(MUTATIONS), offset=st.integers(0, 10**6),
       value=JSON_VALUES, command=st.sampled_from(["sample", "train", "export"]))
def test_run_folder_mutations(run, tmp_path_factory, capsys, target, mutation, offset, value, command):
    tmp = tmp_path_factory.mktemp("m")
    copy = tmp / "run"
    shutil.copytree(run, copy, symlinks=True)
    path = copy / target
    data = path.read_bytes()
    if mutation == "delete":
        path.unlink()
    elif mutation == "truncate":
        path.write_bytes(data[: offset % max(len(data), 1)])
    elif mutation == "flip":
        i = offset % len(data)
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif mutation == "empty":
        path.write_bytes(b"")
    elif mutation == "dir":
        path.unlink()
        path.mkdir()
    elif mutation == "json":
        path.write_text(json.dumps(value) if target.endswith(".json") else json.dumps({"step": value}))
    elif mutation == "symlink":
        path.unlink()
        path.symlink_to(tmp / "elsewhere")
    config = tmp / "c.toml"
    config.write_text(TINY.format(out=copy.as_posix(), steps=3))
    args = {"sample": ["sample", str(copy), "-p", "a red circle", "--steps", "2", "--out", str(tmp / "o")],
            "train": ["train", str(config)], "export": ["export", str(copy), str(tmp / "release")]}[command]
    before = tree(copy)
    code, err = limner_cli(capsys, args)
    if code != 0:
        refused_cleanly(code, err)
        after = tree(copy)  # metrics.jsonl may gain the rows of steps trained before the refusal
        assert all(after.get(k) == v for k, v in before.items() if k not in (".limner.lock", "metrics.jsonl")), \
            "a refusal lost data"
        assert "metrics.jsonl" in after or "metrics.jsonl" not in before
        assert not (tmp / "release").exists() and not list((tmp / "o").glob("*.png")) if (tmp / "o").exists() else True
