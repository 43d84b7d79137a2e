"""The registry: built-in and entry-point plugins, duplicates, broken plugins, the env filters, --stages."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import attrs
import pytest
from typer.testing import CliRunner

import itmkit
from itmkit.cli import app
from itmkit.plugins import RegistryError, get_registry, load_registry, reset_registry
from itmkit.stage import Stage, param
from itmkit.types import GlobalPort, LocalPort

CORE = ["core.bigru", "core.cosine", "core.dot", "core.infonce", "core.last", "core.max", "core.mean", "core.order",
        "core.precomp", "core.raw", "core.triplet"]


def make_stage(stage_name: str) -> type[Stage]:
    """A valid aggregator spec registered as ``stage_name``."""

    @attrs.frozen(kw_only=True)
    class Pool(Stage):
        """Test pool."""

        name = stage_name
        kind = "aggregator"
        paper = "test stage; no paper"

        scale: float = param(1.0, "a factor")

        def ports(self, x: LocalPort) -> GlobalPort:
            return GlobalPort(x.dim)

    return Pool


def plugin_module(module_name: str, *classes: type, hook: str = "register_stages",
                  raises: Exception | None = None) -> types.ModuleType:
    """A plugin module built in memory whose hook ``hook`` returns ``classes`` (or raises)."""
    module = types.ModuleType(module_name)

    def register():
        if raises is not None:
            raise raises
        return list(classes)

    register.__name__ = hook
    setattr(module, hook, itmkit.hookimpl(register))
    return module


def info(registry, name: str):
    matches = [p for p in registry.plugins if p.name == name]
    assert len(matches) == 1, f"plugin {name} listed {len(matches)} times: {registry.plugins}"
    return matches[0]


@pytest.fixture
def no_entry_points(monkeypatch):
    """Hide installed entry-point plugins so each test sees only what it registers."""
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])


@pytest.fixture
def restore_registry():
    yield
    reset_registry(None)  # the next get_registry() loads afresh


# ------------------------------------------------------------------------------ built-ins


def test_the_built_in_plugin_is_listed_with_its_stages(no_entry_points):
    registry = load_registry()
    core = info(registry, "itmkit.core_stages")
    assert core.source == "built-in" and core.version == itmkit.__version__ and core.error is None
    assert sorted(core.stages) == CORE
    assert all(registry.owners[name] == "itmkit.core_stages" for name in CORE)
    assert registry.by_kind("loss") == [registry.stages["core.infonce"], registry.stages["core.triplet"]]


def test_an_unknown_stage_name_suggests_the_closest(no_entry_points):
    with pytest.raises(KeyError, match="unknown stage 'core.maen' \\(did you mean 'core.mean'\\?\\)"):
        load_registry().get("core.maen")


def test_an_extra_module_contributes_stages_beside_the_core(no_entry_points):
    registry = load_registry([plugin_module("myplugin", make_stage("mine.pool"))])
    assert registry.owners["mine.pool"] == "myplugin"
    assert info(registry, "myplugin").stages == ("mine.pool",) and info(registry, "myplugin").version == "local"
    assert set(CORE) < set(registry.stages)


# ---------------------------------------------------------------------- broken plugins


def test_a_duplicate_stage_name_names_both_plugins(no_entry_points):
    with pytest.raises(RegistryError) as error:
        load_registry([plugin_module("shadowing", make_stage("core.mean"))])
    message = str(error.value)
    assert "'core.mean' is registered twice" in message
    assert "'itmkit.core_stages'" in message and "'shadowing'" in message


def test_a_duplicate_between_two_third_party_plugins_names_both(no_entry_points):
    first, second = plugin_module("first", make_stage("x.pool")), plugin_module("second", make_stage("x.pool"))
    with pytest.raises(RegistryError) as error:
        load_registry([first, second])
    assert "'x.pool' is registered twice" in str(error.value)
    assert "plugin 'first'" in str(error.value) and "plugin 'second'" in str(error.value)


def test_names_are_claimed_in_load_order_built_ins_first(no_entry_points):
    first, second = plugin_module("first", make_stage("a.pool")), plugin_module("second", make_stage("b.pool"))
    registry = load_registry([first, second])
    assert list(registry.stages)[0] == "core.precomp" and list(registry.stages)[-2:] == ["a.pool", "b.pool"]
    with pytest.raises(RegistryError, match="by plugin 'itmkit.core_stages' and by plugin 'shadowing'"):
        load_registry([plugin_module("shadowing", make_stage("core.mean"))])


def test_a_misspelled_hook_is_reported_and_the_others_still_load(no_entry_points):
    typo = plugin_module("typo", make_stage("typo.pool"), hook="register_stagez")
    good = plugin_module("good", make_stage("good.pool"))
    registry = load_registry([typo, good])
    assert "unknown hook 'register_stagez'" in info(registry, "typo").error
    assert info(registry, "typo").stages == ()
    assert "typo.pool" not in registry.stages
    assert registry.owners["good.pool"] == "good" and info(registry, "good").error is None


def test_a_hook_that_raises_is_recorded_and_the_others_still_load(no_entry_points):
    broken = plugin_module("broken", raises=RuntimeError("weights folder missing"))
    good = plugin_module("good", make_stage("good.pool"))
    registry = load_registry([broken, good])
    assert info(registry, "broken").error.startswith("RuntimeError: weights folder missing")
    assert "good.pool" in registry.stages and set(CORE) <= set(registry.stages)


def test_a_class_that_is_not_attrs_is_refused(no_entry_points):
    class Plain(Stage):
        """Not decorated."""

        name = "plain.stage"
        kind = "aggregator"

    with pytest.raises(RegistryError, match="plugin 'plain': Plain is not an attrs class"):
        load_registry([plugin_module("plain", Plain)])


@pytest.mark.parametrize("bad_name", ["", "nodot"])
def test_a_stage_without_a_dotted_name_is_refused(no_entry_points, bad_name):
    with pytest.raises(RegistryError, match=f"name must be a dotted 'plugin.stage' name, got '{bad_name}'"):
        load_registry([plugin_module("undotted", make_stage(bad_name))])


def test_something_that_is_not_a_stage_is_refused(no_entry_points):
    with pytest.raises(RegistryError, match="is not a subclass of itmkit.Stage"):
        load_registry([plugin_module("wrong", dict)])


# ------------------------------------------------------------------------- entry points


@pytest.fixture
def entry_points(monkeypatch):
    """Three installed plugins: alpha and beta import fine, gamma's module does not exist."""
    monkeypatch.setitem(sys.modules, "itmkit_fake_alpha", plugin_module("itmkit_fake_alpha", make_stage("alpha.pool")))
    monkeypatch.setitem(sys.modules, "itmkit_fake_beta", plugin_module("itmkit_fake_beta", make_stage("beta.pool")))
    eps = [
        importlib.metadata.EntryPoint("beta", "itmkit_fake_beta", "itmkit"),
        importlib.metadata.EntryPoint("alpha", "itmkit_fake_alpha", "itmkit"),
        importlib.metadata.EntryPoint("gamma", "itmkit_fake_gamma_is_not_installed", "itmkit"),
        importlib.metadata.EntryPoint("elsewhere", "itmkit_fake_alpha", "another_group"),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [e for e in eps if e.group == group])
    monkeypatch.delenv("ITMKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("ITMKIT_DISABLE_PLUGINS", raising=False)
    return monkeypatch


def names(registry) -> list[str]:
    return [p.name for p in registry.plugins]


def test_entry_points_load_in_name_order_and_a_failed_import_is_recorded(entry_points):
    registry = load_registry()
    assert names(registry) == ["itmkit.core_stages", "alpha", "beta", "gamma"]
    assert registry.owners["alpha.pool"] == "alpha" and registry.owners["beta.pool"] == "beta"
    gamma = info(registry, "gamma")
    assert gamma.error.startswith("ModuleNotFoundError: No module named 'itmkit_fake_gamma_is_not_installed'")
    assert gamma.stages == () and gamma.version == "?"


def test_an_entry_point_naming_a_missing_attribute_is_recorded(entry_points, monkeypatch):
    bad = importlib.metadata.EntryPoint("delta", "itmkit_fake_alpha:plugin", "itmkit")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [bad])
    registry = load_registry()
    assert info(registry, "delta").error.startswith("AttributeError")
    assert set(CORE) <= set(registry.stages)


def test_load_plugins_keeps_only_the_named_entry_points(entry_points):
    entry_points.setenv("ITMKIT_LOAD_PLUGINS", "beta, gamma")
    assert names(load_registry()) == ["itmkit.core_stages", "beta", "gamma"]


def test_an_empty_load_plugins_loads_no_entry_point_but_keeps_the_core(entry_points):
    entry_points.setenv("ITMKIT_LOAD_PLUGINS", "")
    registry = load_registry()
    assert names(registry) == ["itmkit.core_stages"] and sorted(registry.stages) == CORE


def test_disable_plugins_skips_the_named_entry_points(entry_points):
    entry_points.setenv("ITMKIT_DISABLE_PLUGINS", "alpha,gamma")
    registry = load_registry()
    assert names(registry) == ["itmkit.core_stages", "beta"] and "alpha.pool" not in registry.stages


def test_disable_wins_over_load(entry_points):
    entry_points.setenv("ITMKIT_LOAD_PLUGINS", "alpha,beta")
    entry_points.setenv("ITMKIT_DISABLE_PLUGINS", "beta")
    assert names(load_registry()) == ["itmkit.core_stages", "alpha"]


# -------------------------------------------------------------------------------- the CLI


def test_itmkit_plugins_shows_stages_and_the_import_error(entry_points, restore_registry):
    reset_registry(load_registry())
    result = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("alpha" in line and "alpha.pool" in line for line in lines)
    assert any("gamma" in line and "failed: ModuleNotFoundError" in line for line in lines)
    assert any("itmkit.core_stages" in line and "built-in" in line for line in lines)


STAGE_FILE = '''
import attrs
import itmkit
from itmkit.types import GlobalPort, LocalPort


@attrs.frozen(kw_only=True)
class FirstFragment(itmkit.Stage):
    """The first fragment as the global vector."""

    name = "lab.first"
    kind = "aggregator"
    paper = "local experiment; no paper"

    shift: float = itmkit.param(0.0, "added to the output")

    def ports(self, x: LocalPort) -> GlobalPort:
        return GlobalPort(x.dim)


@itmkit.hookimpl
def register_stages():
    return [FirstFragment]
'''


def test_a_local_stage_file_comes_in_through_the_stages_flag(tmp_path, no_entry_points, restore_registry):
    path = tmp_path / "lab_stages.py"
    path.write_text(STAGE_FILE)
    args = ["--stages", str(path), "stages", "--describe", "lab.first"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "lab.first" in result.output and "itmkit_local_lab_stages" in result.output
    assert "added to the output" in result.output
    assert get_registry().owners["lab.first"] == "itmkit_local_lab_stages"


def test_without_the_flag_the_local_stage_is_unknown(no_entry_points, restore_registry):
    reset_registry(None)
    assert "lab.first" not in get_registry().stages

