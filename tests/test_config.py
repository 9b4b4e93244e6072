"""TOML configs: typed values, components by name, and errors that name the bad path."""
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import limner
from limner.config import ComponentConfig, component, load_config
from limner.registry import build_registry, set_registry


@dataclass
class Model:
    denoiser: ComponentConfig = component("denoisers")
    width: float = 1.0


@dataclass
class Sampling:
    sampler: ComponentConfig = component("samplers", "euler")
    steps: int = 20


@dataclass
class Experiment:
    model: Model
    sampling: Sampling = field(default_factory=Sampling)
    tags: list[str] = field(default_factory=list)


class Toy(tuple):
    """A denoiser (callable: D(x, sigma) = x) that equals the tuple of its options."""

    def __call__(self, x, sigma, cond=None):
        return x


class ToyDenoisers:
    @limner.hookimpl
    def limner_register_denoisers(self):
        def toy(channels: int = 8, depth: int = 2):
            """A toy denoiser."""
            return Toy(("toy", channels, depth))

        return [limner.ComponentSpec("toy", toy)]


@pytest.fixture
def toml(tmp_path):
    def write(text: str):
        path = tmp_path / "exp.toml"
        path.write_text(text)
        return path

    set_registry(build_registry([ToyDenoisers()]))
    return write


def test_a_valid_config_becomes_typed_objects(toml):
    cfg = load_config(toml("""
        tags = ["a"]
        [model]
        denoiser = { name = "toy", channels = 16 }
        width = 2
        [sampling]
        sampler = { name = "dpmpp_2m_sde", eta = 0.5 }
    """), Experiment)
    assert cfg.model.width == 2.0 and isinstance(cfg.model.width, float)
    assert cfg.model.denoiser.build() == ("toy", 16, 2)
    assert cfg.sampling.sampler == ComponentConfig("samplers", "dpmpp_2m_sde", {"eta": 0.5})
    assert cfg.sampling.steps == 20
    assert cfg.tags == ["a"]


def test_every_missing_option_of_a_section_is_named_at_once(toml):
    @dataclass
    class Sample:
        sampler: str
        schedule: str
        steps: int = 20

    @dataclass
    class Run:
        sample: Sample

    with pytest.raises(limner.LimnerError, match=r": sample\.sampler, sample\.schedule: missing required options$"):
        load_config(toml("[sample]\nsteps = 4\n"), Run)


def test_a_bare_name_and_an_alias_select_a_component(toml):
    cfg = load_config(toml('[model]\ndenoiser = "toy"\n[sampling]\nsampler = "euler_a"\n'), Experiment)
    assert cfg.sampling.sampler.name == "euler_ancestral"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[model]\ndenoiser = { name = "toy", chanels = 3 }',
            r"model\.denoiser\.chanels: unknown option, did you mean channels\? "
            r"Valid options of denoiser 'toy': channels, depth\.",
        ),
        (
            '[model]\ndenoiser = { name = "tyo" }',
            r"model\.denoiser\.name: unknown denoiser 'tyo'\. Did you mean: toy\?",
        ),
        ("[model]\ndenoiser = 3", r"model\.denoiser: expected a denoiser name or a table"),
        ('[model]\ndenoiser = "toy"\nwidht = 1', r"model\.widht: unknown option, did you mean width\?"),
        ('[model]\ndenoiser = "toy"\n[sampling]\nsteps = "ten"', r"sampling\.steps: expected int, got str 'ten'"),
        ('[model]\ndenoiser = "toy"\n[sampling]\nsteps = true', r"sampling\.steps: expected int, got bool True"),
        ('tags = "a"\n[model]\ndenoiser = "toy"', r"tags: expected a list, got str 'a'"),
        ("[model]\nwidth = 1.0", r"model\.denoiser: missing required option"),
        ("[modle]\n", r"modle: unknown option, did you mean model\?"),
        ("[model\n", r"not valid TOML"),
    ],
)
def test_errors_name_the_path_in_the_file(toml, text, message):
    path = toml(text)
    with pytest.raises(limner.ConfigError, match=message) as err:
        load_config(path, Experiment)
    assert str(err.value).startswith(str(path))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(limner.ConfigError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml", Experiment)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Every ready config names installed components with valid options."""
    from limner.recipes import load_run_config

    cfg = load_run_config(path)
    assert cfg.out.startswith("runs/") and cfg.train.steps > 0
