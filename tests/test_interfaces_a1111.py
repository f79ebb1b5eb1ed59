"""Settings section and X/Y/Z axes, against stand-ins of the WebUI modules and of the X/Y/Z plot script."""

import sys
import types
from copy import copy
from types import SimpleNamespace

import pytest

from lib_delta.args import DeltaSettings, from_positional, to_positional
from lib_delta.errors import DeltaError
from lib_delta.webui import interfaces, panel

CHECKPOINTS = {"sd15.safetensors [cc6cb27103]": "sd15", "sdxl.safetensors [31e35c80fc]": "sdxl"}


class AxisOption:
    """The grid's own class (scripts/xyz_grid.py), same constructor."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm = label, type, apply, confirm
        self.cost, self.choices = cost, choices


class XyzScript:
    pass


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, **kwargs):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.comment = None
        self.section = None

    def info(self, text):
        self.comment = text
        return self


@pytest.fixture
def webui(monkeypatch):
    xyz = types.ModuleType("xyz_grid.py")
    xyz.AxisOption = AxisOption
    xyz.axis_options = [AxisOption("Nothing", str, None), AxisOption("Seed", int, None)]
    XyzScript.__module__ = "xyz_grid.py"  # the WebUI loads scripts as modules named after their file

    # CheckpointInfo.register(): listed by title, aliased by each id
    infos = {title: SimpleNamespace(title=title, name=short) for title, short in CHECKPOINTS.items()}
    aliases = {**infos, **{i.name: i for i in infos.values()}}

    before_ui, ui_tabs, added = [], [], {}
    modules = types.ModuleType("modules")
    stand_ins = {
        "scripts": SimpleNamespace(scripts_data=[SimpleNamespace(script_class=object, module=None),
                                                 SimpleNamespace(script_class=XyzScript, module=xyz)]),
        "sd_models": SimpleNamespace(checkpoint_tiles=lambda: list(CHECKPOINTS), checkpoints_list=infos,
                                     checkpoint_aliases=aliases),
        "script_callbacks": SimpleNamespace(on_before_ui=before_ui.append, on_ui_tabs=ui_tabs.append),
        "shared": SimpleNamespace(OptionInfo=OptionInfo, opts=SimpleNamespace(add_option=added.__setitem__),
                                  options_section=_options_section),
    }
    monkeypatch.setitem(sys.modules, "modules", modules)
    for name, module in stand_ins.items():
        setattr(modules, name, module)
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
    gr = types.ModuleType("gradio")
    gr.Radio, gr.Dropdown, gr.Slider = "Radio", "Dropdown", "Slider"
    monkeypatch.setitem(sys.modules, "gradio", gr)
    return SimpleNamespace(xyz=xyz, before_ui=before_ui, ui_tabs=ui_tabs, settings=added)


def _options_section(section, options):  # modules/options.py: tags every option with its section
    for info in options.values():
        info.section = section
    return options


def axis(xyz, label):
    return next(a for a in xyz.axis_options if a.label == label)


def run_axis(xyz, label, text_values, p):
    """What the grid does with one axis: convert values to the axis type, confirm, then apply per cell copy."""
    opt = axis(xyz, label)
    values = [opt.type(v) for v in text_values]
    if opt.confirm:
        opt.confirm(p, values)
    cells = []
    for v in values:
        pc = copy(p)
        opt.apply(pc, v, values)
        cells.append(pc)
    return cells


def test_register_adds_settings_and_defers_the_axes(webui):
    interfaces.register_interfaces()
    assert webui.before_ui == [interfaces.add_xyz_axes]
    assert webui.ui_tabs == [panel.scope_saved_defaults]  # after both tabs' panels, before ui-config.json is read
    assert set(webui.settings) == set(interfaces.SETTING_DEFAULTS)
    for key, info in webui.settings.items():
        assert info.default == interfaces.SETTING_DEFAULTS[key]
        assert info.section == ("delta_sampling", "Delta Sampling")
        assert info.label and info.comment  # label and tooltip
    assert webui.settings["delta_sampling_cache"].component_args == {"choices": ["gpu", "ram", "free"]}


def test_device_choices_list_every_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert interfaces.device_choices() == ["same", "cpu", "cuda:0", "cuda:1"]


def test_axes_are_added_once(webui):
    interfaces.add_xyz_axes()
    interfaces.add_xyz_axes()  # UI reload, or a second registration
    labels = [a.label for a in webui.xyz.axis_options]
    assert labels == ["Nothing", "Seed", "[Delta] Lambda", "[Delta] Window start", "[Delta] Window end",
                      "[Delta] Source checkpoint", "[Delta] LoRA weight", "[Delta] Schedule", "[Delta] Enabled",
                      "[Delta] Source CFG scale", "[Delta] ControlNet weight", "[Delta] ControlNet guidance end",
                      "[Delta] Source resolution",
                      "[Delta] IP-Adapter weight"]
    # plain AxisOption: listed in both tabs
    assert all(type(a) is AxisOption for a in webui.xyz.axis_options)


def test_no_grid_script_is_fine(webui, monkeypatch):
    monkeypatch.setattr(sys.modules["modules.scripts"], "scripts_data", [])
    interfaces.add_xyz_axes()


def test_each_cell_gets_its_own_overrides(webui):
    interfaces.add_xyz_axes()
    shared = {"schedule": "linear"}
    p = SimpleNamespace(delta_overrides=shared)
    cells = run_axis(webui.xyz, "[Delta] Lambda", ["0", "0.5", "1.5"], p)
    assert [c.delta_overrides for c in cells] == [{"schedule": "linear", "strength": v} for v in (0.0, 0.5, 1.5)]
    assert shared == {"schedule": "linear"} and all(c.delta_overrides is not shared for c in cells)
    [fresh] = run_axis(webui.xyz, "[Delta] Window end", ["0.5"], SimpleNamespace())  # a p that never had one
    assert fresh.delta_overrides == {"end": 0.5}


def test_axis_values_reach_the_settings(webui):
    interfaces.add_xyz_axes()
    ui_values = to_positional(DeltaSettings(enabled=False, source="sd15"))
    ui_values[2] = "<lora:a:1><lora:b:0.5>"
    p = SimpleNamespace()
    for label, value in [("[Delta] Enabled", "True"), ("[Delta] Source checkpoint", "sdxl"),
                         ("[Delta] LoRA weight", "0.25"), ("[Delta] Schedule", "cosine"),
                         ("[Delta] Window start", "0.2"), ("[Delta] Window end", "0.7"), ("[Delta] Lambda", "-1"),
                         ("[Delta] Source CFG scale", "4.5")]:
        [p] = run_axis(webui.xyz, label, [value], p)
    s = from_positional(ui_values).with_overrides(p.delta_overrides)
    g = s.groups[0]
    assert s.enabled and s.source == "sdxl"  # checked here, resolved by the host like the panel's choice
    assert [(r.name, r.weight) for r in g.loras] == [("a", 0.25), ("b", 0.25)]
    assert (g.schedule, g.start, g.end, g.strength, s.source_cfg) == ("cosine", 0.2, 0.7, -1.0, 4.5)
    [off] = run_axis(webui.xyz, "[Delta] Enabled", ["false"], p)
    assert off.delta_overrides["enabled"] is False


def test_axis_choices(webui):
    interfaces.add_xyz_axes()
    assert axis(webui.xyz, "[Delta] Source checkpoint").choices() == sorted(CHECKPOINTS)
    assert axis(webui.xyz, "[Delta] Schedule").choices() == ["constant", "linear", "exponential", "cosine", "sigmoid"]
    assert axis(webui.xyz, "[Delta] Enabled").choices() == ["True", "False"]
    assert axis(webui.xyz, "[Delta] Lambda").choices is None
    assert axis(webui.xyz, "[Delta] Source checkpoint").cost > 0  # a source change loads a model: outer loop


@pytest.mark.parametrize(("label", "values", "message"), [
    ("[Delta] Lambda", ["1", "9"], r"\[Delta\] Lambda: 9.0 out of range"),
    ("[Delta] Window start", ["-0.1"], "between 0.0 and 1.0"),
    ("[Delta] Window end", ["1.5"], "out of range"),
    ("[Delta] LoRA weight", ["20"], "between -10.0 and 10.0"),
    ("[Delta] Source checkpoint", ["sd15", "nope"], r"'nope' is not among the WebUI's checkpoints"),
    ("[Delta] Source checkpoint", ["sd1"], r"'sd1' is not among .* Closest: 'sd15.safetensors \[cc6cb27103\]'"),
    ("[Delta] Schedule", ["linear", "wobbly"], r"unknown schedule\(s\) 'wobbly'; allowed: constant"),
    ("[Delta] Enabled", ["maybe"], "'maybe' is not True or False"),
    ("[Delta] Lambda", ["1e400"], r"inf out of range; values must lie between -5.0 and 5.0"),
    ("[Delta] Source CFG scale", ["7", "40"], r"\[Delta\] Source CFG scale: 40.0 out of range; values must lie "
                                               r"between 0.0 and 30.0"),
])
def test_confirm_rejects_bad_values_before_the_grid_runs(webui, label, values, message):
    interfaces.add_xyz_axes()
    with pytest.raises(DeltaError, match=message) as e:
        run_axis(webui.xyz, label, values, SimpleNamespace())
    assert (e.value.status_code, e.value.detail) == (422, str(e.value))  # what the API answers with


class OurScript:
    """Where the WebUI's script runner keeps this extension's slice of ``p.script_args``."""

    def __init__(self, args_from: int, args_to: int):
        self.args_from, self.args_to = args_from, args_to

    def title(self):
        return panel.TITLE


def grid_p(settings) -> SimpleNamespace:
    """A grid's p as the WebUI builds it: every always-on script's arguments in one list, ours at its slice (the
    API's settings object, or the panel's positional values)."""
    ours = list(settings) if isinstance(settings, list) else [settings]
    return SimpleNamespace(scripts=SimpleNamespace(alwayson_scripts=[SimpleNamespace(title=lambda: "Other"),
                                                                     OurScript(2, 2 + len(ours))]),
                           script_args=[None, None, *ours, "after"])


@pytest.mark.parametrize("label", ["[Delta] LoRA weight", "[Delta] ControlNet weight",
                                   "[Delta] ControlNet guidance end", "[Delta] IP-Adapter weight"])
def test_an_axis_over_the_entries_of_an_empty_group_stops_the_grid_before_it_starts(webui, label):
    """The WebUIs' X/Y/Z plot leaves a cell whose generation fails empty and goes on, so a cell's error would give
    a 200 and a grid of empty cells: the check runs in the axis's confirm, where a 422 stops the grid."""
    interfaces.add_xyz_axes()
    opt = axis(webui.xyz, label)
    empty = {"enabled": True, "source": "sd15", "adapted_prompt": "a watercolor painting"}
    with pytest.raises(DeltaError, match=r"which has none: add a (LoRA|ControlNet unit|IP-Adapter unit) to that "
                                         "group, or remove the axis") as e:
        opt.confirm(grid_p(empty), [0.5, 1.0])
    assert e.value.status_code == 422 and label in e.value.detail
    positional = to_positional(DeltaSettings.from_dict(empty))  # the panel's form
    with pytest.raises(DeltaError, match="which has none"):
        opt.confirm(grid_p(positional), [0.5])
    full = {**empty, "loras": [{"name": "a"}], "controlnets": [{"model": "cn", "image": "x"}],
            "ipadapters": [{"model": "ip", "image": "x"}]}
    opt.confirm(grid_p(full), [0.5, 1.0])
    opt.confirm(SimpleNamespace(), [0.5])  # no runner (the axis applied by another script): nothing to check
    opt.confirm(grid_p({"enabled": "maybe"}), [0.5])  # unreadable settings: the generation says what is wrong
    with pytest.raises(DeltaError, match="out of range"):  # the values are still checked first
        opt.confirm(grid_p(full), [1e9])
