"""The registry's paths: discovery, provenance, aliases and every error a user can hit."""
import json

import pytest

import limner
from limner.registry import build_registry, registry, set_registry


def test_builtins_come_through_the_entry_point():
    comp = registry().component("samplers", "euler")
    assert comp.provider.distribution == "limner"
    assert comp.provider.plugin == "limner.samplers"
    assert {"karras", "exponential"} <= set(limner.list_components("schedules")["schedules"])
    assert set(limner.list_components()) == set(limner.KINDS)


def test_aliases_and_case_resolve_to_the_canonical_spec():
    assert limner.get_component("samplers", "euler_a").name == "euler_ancestral"
    assert limner.get_component("samplers", "UniPC").name == "unipc"


def test_unknown_name_lists_valid_names_and_closest():
    with pytest.raises(limner.UnknownComponentError) as err:
        limner.get_component("samplers", "dpmpp2m")
    msg = str(err.value)
    assert "unknown sampler 'dpmpp2m'" in msg
    assert "Did you mean: dpmpp_2m" in msg
    assert "Valid samplers: ddim, ddim_cfg_pp, ddpm," in msg


def test_unknown_kind_names_the_valid_kinds():
    with pytest.raises(limner.LimnerError, match=r"unknown component kind 'sampler', did you mean samplers\?"):
        limner.list_components("sampler")


def test_create_checks_options_before_calling_the_factory():
    with pytest.raises(
        limner.LimnerError, match=r"unknown option 'etta', did you mean eta\? Valid options: eta, s_noise"
    ):
        limner.create("samplers", "euler_ancestral", etta=0.5)
    fn = limner.create("samplers", "euler_ancestral", eta=0.5)
    assert fn.keywords == {"eta": 0.5}


class PluginA:
    @limner.hookimpl
    def limner_register_losses(self):
        return [limner.ComponentSpec("l2", lambda: "a", aliases=("mse",))]


class PluginB:
    @limner.hookimpl
    def limner_register_losses(self):
        return [limner.ComponentSpec("mse", lambda: "b")]


def test_clash_on_an_alias_names_both_providers():
    reg = build_registry([PluginA(), PluginB()], entry_points=False)  # the rest stays usable
    with pytest.raises(limner.PluginConflictError) as err:
        reg.component("losses", "mse")
    msg = str(err.value)
    assert "loss 'mse' is provided by" in msg
    assert "PluginA" in msg and "PluginB" in msg


def test_components_of_directly_registered_plugins_are_usable():
    set_registry(build_registry([PluginA()], entry_points=False))
    assert limner.create("losses", "mse") == "a"
    assert limner.list_components("samplers") == {"samplers": []}


class Misspelled:
    @limner.hookimpl
    def limner_register_sampler(self):
        return []


class UpperCase:
    @limner.hookimpl
    def limner_register_samplers(self):
        return [limner.ComponentSpec("Fast", lambda: None)]


class NotASpec:
    @limner.hookimpl
    def limner_register_samplers(self):
        return ["euler"]


@pytest.mark.parametrize("plugin, expected", [
    (Misspelled(), "limner_register_sampler.*did you mean limner_register_samplers"),
    (UpperCase(), "must be lowercase.*'Fast'"),
    (NotASpec(), "expected limner.ComponentSpec, got str"),
])
def test_a_broken_plugin_is_reported_and_the_rest_load(plugin, expected):
    with pytest.warns(RuntimeWarning, match=expected):
        reg = build_registry([plugin, PluginA()], entry_points=False)
    assert len(reg.failures) == 1
    assert reg.names("losses") == ["l2"]


def test_plugin_that_fails_to_import_is_reported(fake_dist):
    fake_dist("limner-broken", "import not_a_module_anywhere\n")
    with pytest.warns(RuntimeWarning, match="limner-broken.*ModuleNotFoundError"):
        reg = build_registry()
    assert [f.plugin for f in reg.failures] == ["limner-broken"]
    assert "euler" in reg.names("samplers")
    set_registry(reg)
    with pytest.raises(limner.UnknownComponentError, match="limner-broken.*failed to load"):
        limner.get_component("samplers", "nope")


THIRD_PARTY = """
import limner

@limner.hookimpl
def limner_register_samplers():
    return [limner.ComponentSpec("third", lambda: "third")]
"""


def test_third_party_plugin_is_found_with_its_distribution(fake_dist):
    fake_dist("limner-third", THIRD_PARTY, version="2.5")
    comp = registry().component("samplers", "third")
    assert (comp.provider.distribution, comp.provider.version) == ("limner-third", "2.5")


def test_disable_plugins_blocks_by_distribution_or_plugin_name(fake_dist, monkeypatch):
    fake_dist("limner-third", THIRD_PARTY)
    monkeypatch.setenv("LIMNER_DISABLE_PLUGINS", "limner-third, limner.schedules")
    reg = build_registry()
    assert "third" not in reg.names("samplers")
    assert reg.names("schedules") == []
    assert "euler" in reg.names("samplers")


def test_clash_with_a_builtin_names_both_distributions(fake_dist):
    fake_dist("limner-copycat", THIRD_PARTY.replace('"third"', '"euler"', 1))
    reg = build_registry()
    assert reg.component("samplers", "heun").spec.name == "heun"  # the clash spoils one name, not all
    with pytest.raises(limner.PluginConflictError) as err:
        reg.component("samplers", "Euler")
    msg = str(err.value)
    assert "sampler 'euler' is provided by" in msg
    assert "limner 0.1.0 (plugin limner.samplers)" in msg
    assert "limner-copycat 1.0" in msg
    assert "LIMNER_DISABLE_PLUGINS" in msg


def test_plugins_command_lists_everything_and_marks_a_clash(fake_dist, capsys):
    """A clash used to make `limner plugins` exit 1 listing nothing, and `limner sample` blame
    the first component field of the config (data.dataset.name)."""
    from limner.cli import main
    from limner.config import ConfigError, parse_config
    from limner.plugins.diffusion_recipe import TrainConfig

    fake_dist("limner-copycat", THIRD_PARTY.replace('"third"', '"euler"', 1))
    set_registry(None)
    main(["plugins"])
    out, err = capsys.readouterr()
    assert "limner.samplers  (limner 0.1.0)" in out and "euler (clash)" in out and "heun" in out
    assert "CLASH plugins register the same component name: sampler 'euler' is provided by" in err
    run = {"out": "x", "recipe": "diffusion", "data": {"dataset": "shapes"},
           "model": {"text_encoder": "bert", "denoiser": "unet"}}
    with pytest.raises(ConfigError, match=r"^sample.sampler.name: plugins register the same component name"):
        parse_config({**run, "sample": {"sampler": "euler", "schedule": "karras"}}, TrainConfig)
    parse_config({**run, "sample": {"sampler": "heun", "schedule": "karras"}}, TrainConfig)  # other names are fine


def test_every_builtin_lazy_factory_loads_and_none_is_missing():
    """The built-ins' catalogue names each factory as "module:attr": every entry must load to a
    callable, and every sampler/schedule the modules define must be registered."""
    import limner.plugins.samplers as sampler_module
    import limner.plugins.schedules as schedule_module

    for kind, names in limner.list_components().items():
        for name in names:
            assert callable(limner.get_component(kind, name).load()), (kind, name)
    assert set(sampler_module.FACTORIES) == set(limner.list_components("samplers")["samplers"])
    assert set(schedule_module.FACTORIES) == set(limner.list_components("schedules")["schedules"])


def test_listing_components_imports_no_torch():
    """`limner plugins`, `limner --help` and name checks stay fast: nothing heavy is imported
    until a component is built."""
    import subprocess
    import sys

    code = ("import sys, limner; limner.list_components(); limner.get_component('denoisers', 'unet'); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_factory_errors_name_the_component_and_the_reference():
    spec = limner.ComponentSpec("broken", "limner_no_such_module:factory")
    with pytest.raises(limner.LimnerError, match="component 'broken': cannot load its factory "
                                                 "'limner_no_such_module:factory': ModuleNotFoundError"):
        spec.load()
    with pytest.raises(limner.LimnerError, match="is a str, not a factory"):
        limner.ComponentSpec("const", "limner.registry:ENTRY_POINT_GROUP").load()


def test_a_malformed_factory_string_is_refused_at_registration():
    class Plugin:
        @limner.hookimpl
        def limner_register_samplers():
            return [limner.ComponentSpec("odd", "not a reference")]

    with pytest.warns(RuntimeWarning, match="neither callable nor a 'package.module:attr' string"):
        reg = build_registry([Plugin], entry_points=False)
    assert "odd" not in reg.names("samplers")


@pytest.mark.parametrize("asked,name", [("DPM++ 2M SDE", "dpmpp_2m_sde"), ("Euler a", "euler_ancestral"),
                                        ("DPM2 a", "dpm_2_ancestral"), ("dpmpp_3m_sde_gpu", "dpmpp_3m_sde"),
                                        ("uni_pc_bh2", "unipc"), ("EulerDiscreteScheduler", "euler"),
                                        ("DPMSolverMultistepScheduler", "dpmpp_2m"), ("  LMS ", "lms")])
def test_names_other_tools_use_resolve(asked, name):
    """ComfyUI's names, A1111's display names (case, spaces and "+" aside) and diffusers'
    scheduler classes find limner's sampler of the same algorithm."""
    assert limner.get_component("samplers", asked).name == name


def test_a1111_sampler_and_schedule_in_one_name_split():
    from limner.sampling import split_sampler_name

    assert split_sampler_name("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert split_sampler_name("Euler a Exponential") == ("euler_ancestral", "exponential")
    assert split_sampler_name("dpmpp_2m") == ("dpmpp_2m", None)
    assert split_sampler_name("nonsense karras") == ("nonsense karras", None)  # the lookup then names it unknown


def test_plugins_command_shows_aliases_on_request(capsys):
    from limner.cli import main

    main(["plugins", "--aliases"])
    assert "euler_ancestral (euler_a, eulerancestraldiscretescheduler)" in capsys.readouterr().out.replace(
        "\n" + " " * 22, " "
    )
    main(["plugins", "--json"])
    rows = {r["plugin"]: r for r in json.loads(capsys.readouterr().out)["plugins"]}
    assert rows["limner.samplers"]["aliases"]["samplers"]["unipc"] == ["uni_pc_bh2", "unipcmultistepscheduler"]


def test_a_component_that_lacks_its_kinds_methods_is_refused_when_built():
    """The Protocols of limner.protocols are enforced (issue 24): a factory that builds something
    without a text encoder's encode() is named, not passed on to fail later."""
    from limner.registry import build_registry, set_registry

    class Broken:
        @limner.hookimpl
        def limner_register_text_encoders(self):
            return [limner.ComponentSpec("mute", lambda: object())]

    set_registry(build_registry([Broken()]))
    try:
        with pytest.raises(limner.LimnerError, match=r"text_encoder 'mute': its factory built a object, which lacks "
                                                     r"encode of a text_encoder \(limner.protocols.TextEncoder\)"):
            limner.create("text_encoders", "mute")
    finally:
        set_registry(None)
