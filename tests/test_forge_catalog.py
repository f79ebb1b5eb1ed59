"""What the panel's unit dropdowns list in Forge 2 and Neo: the built-in ControlNet's lists
(``lib_controlnet.global_state``), read through a stand-in with that module's functions and its "None" entries."""

import sys
import types

import pytest

from lib_delta.hosts.forge import catalog


@pytest.fixture
def global_state(monkeypatch):
    gs = types.ModuleType("lib_controlnet.global_state")
    files = {"None": "model.safetensors"}
    on_disk = {"control_v11p_sd15_canny [d14c016b]": "/m/a.safetensors", "diffusers_xl_canny [1]": "/m/b.pth",
               "ip-adapter_sd15 [6a3f6166]": "/m/c.safetensors", "ip-adapter-plus_sdxl_vit-h [2]": "/m/d.safetensors"}
    preprocessors = {"None": object(), "canny": object(), "depth_midas": object(), "shuffle": object(),
                     "invert (from white bg & black line)": object(), "tile_colorfix": object(),
                     "CLIP-ViT-H (IPAdapter)": object(), "InsightFace+CLIP-H (IPAdapter)": object()}
    gs.controlnet_names = ["None"]

    def update_controlnet_filenames():
        files.update(on_disk)
        gs.controlnet_names = list(files)

    gs.update_controlnet_filenames = update_controlnet_filenames
    gs.get_all_controlnet_names = lambda: gs.controlnet_names
    gs.get_preprocessor = preprocessors.get
    package = types.ModuleType("lib_controlnet")
    package.global_state = gs
    monkeypatch.setitem(sys.modules, "lib_controlnet", package)
    monkeypatch.setitem(sys.modules, "lib_controlnet.global_state", gs)
    return types.SimpleNamespace(module=gs, on_disk=on_disk)


def test_the_builtin_controlnets_lists(global_state):
    assert catalog.missing("controlnet") is None
    # the list is read on first use when the ControlNet tab has not read it yet; its "None" is no model
    assert catalog.names("controlnet") == ["control_v11p_sd15_canny [d14c016b]", "diffusers_xl_canny [1]"]  # no IP
    # preprocessors that need no download and act on the image alone; Forge's "None" is the unit's "none"
    assert catalog.names("controlnet_module") == ["none", "canny", "invert (from white bg & black line)", "shuffle"]
    global_state.on_disk["control_new_sd15 [2]"] = "/m/c.safetensors"
    catalog.refresh("controlnet")
    assert "control_new_sd15 [2]" in catalog.names("controlnet")


def test_without_the_builtin_controlnet_the_lists_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "lib_controlnet", None)  # import fails
    monkeypatch.setitem(sys.modules, "lib_controlnet.global_state", None)
    assert "built-in ControlNet" in catalog.missing("controlnet")
    assert catalog.names("controlnet") == [] and catalog.names("controlnet_module") == []


def test_the_ipadapters_are_listed_apart_from_the_controlnets(global_state):
    """Forge lists IP-Adapters with its ControlNets: each dropdown offers its own kind, and the encoder dropdown
    Forge's IP-Adapter preprocessors that are loaded."""
    assert catalog.missing("ipadapter") is None and catalog.missing("ipadapter_module") is None
    assert catalog.names("ipadapter") == ["ip-adapter_sd15 [6a3f6166]", "ip-adapter-plus_sdxl_vit-h [2]"]
    assert not any("ip-adapter" in n for n in catalog.names("controlnet"))
    assert catalog.names("ipadapter_module") == ["CLIP-ViT-H (IPAdapter)", "InsightFace+CLIP-H (IPAdapter)"]
    global_state.on_disk["ip-adapter_new_sd15 [3]"] = "/m/e.safetensors"
    catalog.refresh("ipadapter")
    assert "ip-adapter_new_sd15 [3]" in catalog.names("ipadapter")


def test_without_the_builtin_controlnet_the_ipadapter_lists_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "lib_controlnet", None)
    monkeypatch.setitem(sys.modules, "lib_controlnet.global_state", None)
    assert "IP-Adapter units need Forge's built-in ControlNet" in catalog.missing("ipadapter")
    assert catalog.names("ipadapter") == [] and catalog.names("ipadapter_module") == []
