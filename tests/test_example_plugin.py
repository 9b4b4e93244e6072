"""The example third-party plugin, really pip-installed into a folder on sys.path."""
import subprocess
import sys

import pytest
import torch

import limner
from limner.cli import main
from limner.registry import build_registry, registry
from test_samplers import convergence_order

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(ROOT / "examples" / "limner-example-plugin")],
        check=True,
    )
    return site


@pytest.fixture
def installed(example_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.delitem(sys.modules, "limner_example", raising=False)


def test_listed_with_its_distribution(installed, capsys):
    main(["plugins"])
    out = capsys.readouterr().out
    assert "limner-example-plugin  (limner-example-plugin 0.1.0)" in out
    assert "rk_midpoint" in out and "pseudo_huber" in out and "example-info" in out
    comp = registry().component("samplers", "rk_midpoint")
    assert comp.provider.distribution == "limner-example-plugin"


def test_its_sampler_is_at_least_second_order_by_name(installed):
    # On this Gaussian ODE, y' = a y with a = sigma / (s^2 + sigma^2), the midpoint rule's
    # h^3 error term a''/24 + a^3/6 + a a'/4 cancels exactly: it measures 3, not 2.
    assert convergence_order(limner.create("samplers", "rk_midpoint")) > 1.8


def test_its_loss_and_command_work(installed, capsys):
    loss = limner.create("losses", "pseudo_huber", c=0.5)
    pred, target = torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    assert loss(pred, target).item() == pytest.approx(((25 + 0.25) ** 0.5 - 0.5 + 0) / 2)
    main(["example-info"])
    assert "rk_midpoint" in capsys.readouterr().out


def test_a_clash_names_both_distributions(installed, fake_dist):
    fake_dist("limner-rival", """
        import limner
        @limner.hookimpl
        def limner_register_samplers():
            return [limner.ComponentSpec("rk_midpoint", lambda: None)]
    """)
    with pytest.raises(limner.PluginConflictError) as err:
        build_registry().component("samplers", "rk_midpoint")
    assert "limner-example-plugin 0.1.0" in str(err.value)
    assert "limner-rival 1.0" in str(err.value)
