"""The extension among the WebUI's conventions, in a real AUTOMATIC1111 1.10: the load order metadata.ini asks for,
with and without sd-webui-controlnet; the source's resources credited in the infotext and pasted back without
effect; a UI default saved in ui-config.json across a restart; the Chinese localization; and the README's pictures
(λ sweep and preview strip; the panel's is test_a1111_interfaces.py's).

The browser tests need Playwright's Python package and a Chromium (`DELTA_E2E_CHROMIUM`, default /usr/bin/chromium).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import harness
import pytest
from harness import CHROMIUM_FLAGS, REPO_ROOT, ModelFixture, ServerConfig, WebUIClient
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

PROMPT = "a photo of a cat sitting on a red chair"
SCRIPT = "Delta Sampling"
P = "script_txt2img_delta_sampling_"
# ui-config.json's key of the txt2img λ slider: "customscript/<script file>/<tab>/<label>/value" (ui_loadsave.py)
STRENGTH_DEFAULT_KEY = "customscript/delta_sampling.py/txt2img/λ (strength)/value"
# The second group's λ repeats the label: its key carries the group (lib_delta.webui.panel.saved_default_scope)
GROUP2_STRENGTH_KEY = "customscript/delta_sampling.py/Second adaptation group/txt2img/λ (strength)/value"
ZH = json.loads((REPO_ROOT / "localizations" / "zh_CN.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    """Results the tests of this module pass on (each generation costs a minute or more on a CPU)."""
    return {}


def our_errors(log: str) -> list[str]:
    """Start-up lines where the WebUI reports a problem with this extension (a requirement, a script error)."""
    return [line for line in log.splitlines()
            if "delta" in line.lower() and re.search(r"requires|error|traceback", line, re.IGNORECASE)]


def scripts_in_order(client: WebUIClient) -> list[str]:
    """txt2img's scripts in the order the WebUI loaded them (ScriptRunner keeps scripts_data's order)."""
    return client.get("/sdapi/v1/scripts")["txt2img"]


# ---------------------------------------------------------------------------------------------- load order


def test_starts_and_serves_without_controlnet(client: WebUIClient, server_pool) -> None:
    names = scripts_in_order(client)
    assert "delta sampling" in names and "controlnet" not in names
    assert not our_errors(server_pool.current.log_tail(1 << 20))


# ---------------------------------------------------------------------------------------------- credits


def test_source_resources_are_credited_and_pasting_them_applies_nothing(client: WebUIClient, model_fixtures,
                                                                       shared, record_property) -> None:
    sd15, sd21 = model_fixtures["sd15"], model_fixtures["sd21v"]
    client.set_model(sd21.model_name)  # a target other than the source: a paste that took the source would show
    gen = client.txt2img(PROMPT, alwayson_scripts={SCRIPT: {"args": [
        {"enabled": True, "source": sd15.model_name, "loras": [{"name": sd15.lora(), "weight": 1.0}]}]}})
    record_property("infotext", gen.infotext)
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models")}
    params = gen.params()
    assert params["Model hash"] == models[sd21.model_name]["hash"]  # the target's, as before
    loras = dict(x.split(": ") for x in params["Lora hashes"].split(", "))
    assert set(loras) == {sd15.lora()} and len(loras[sd15.lora()]) == 12
    hashes = json.loads(re.search(r", Hashes: (\{[^}]+\})", gen.infotext).group(1))  # as Civitai reads it
    assert hashes == {f"model:{sd15.model_name}": models[sd15.model_name]["hash"],
                      f"lora:{sd15.lora()}": loras[sd15.lora()]}
    assert "<lora:" not in gen.infotext.splitlines()[0]  # the LoRA went to the source only
    shared["credited"] = gen.infotext

    # What the UI's paste reads (parse_generation_parameters with the infotext_pasted callbacks, the Lora
    # extension's among them), through the API's PNG info of an image carrying this infotext.
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", gen.infotext)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG", pnginfo=info)
    parsed = client.post("/sdapi/v1/png-info", {"image": base64.b64encode(png.getvalue()).decode()})["parameters"]
    assert parsed["Prompt"] == PROMPT  # no LoRA tag gained
    assert parsed["Model hash"] == models[sd21.model_name]["hash"]

    # The API's own paste (the request's infotext) regenerates the same image, on the same target.
    again = client.post("/sdapi/v1/txt2img", {"infotext": gen.infotext})
    assert json.loads(again["info"])["infotexts"][0] == gen.infotext
    assert base64.b64decode(again["images"][0]) == gen.image
    client.set_model(sd15.model_name)


# ---------------------------------------------------------------------------------------------- browser


@contextlib.contextmanager
def browser(url: str, chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack}"))
        page.goto(url, wait_until="load", timeout=300_000)
        page.wait_for_selector(f"#{P}enabled .label-wrap", timeout=300_000)
        page.wait_for_timeout(2000)  # hints.js, localization.js and ours run once the UI has loaded
        try:
            yield page
        finally:
            ctx.close()
        assert not errors, errors


def test_pasting_credited_infotext_in_the_ui(client: WebUIClient, model_fixtures, shared, chromium: str) -> None:
    """The UI's paste of an infotext that credits the source: the prompt gains no LoRA, no checkpoint override
    appears, and the panel gets the source back."""
    from playwright.sync_api import expect

    if "credited" not in shared:
        pytest.skip("needs test_source_resources_are_credited_and_pasting_them_applies_nothing")
    sd15, sd21 = model_fixtures["sd15"], model_fixtures["sd21v"]
    client.set_model(sd21.model_name)
    try:
        with browser(client.base_url, chromium) as page:
            page.locator("#txt2img_prompt textarea").fill(shared["credited"])
            page.locator("#txt2img_tools #paste").click()
            expect(page.locator(f"#{P}enabled-visible-checkbox")).to_be_checked()
            expect(page.locator(f"#{P}source input")).to_have_value(re.compile(re.escape(sd15.model_name)))
            expect(page.locator("#txt2img_prompt textarea")).to_have_value(PROMPT)
            box = page.locator("#txt2img_override_settings")  # hidden, or absent, while it holds nothing
            overrides = box.first.inner_text() if box.count() else ""
            assert sd15.model_name not in overrides and "Model hash" not in overrides, overrides
    finally:
        client.set_model(sd15.model_name)


# ---------------------------------------------------------------------------------------------- pictures

SWEEP = (0.0, 0.5, 1.0, 1.5, 2.0)
SIZE, STEPS = 96, 6  # each delta step runs the source twice: minutes per image on a CPU
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # has λ; PIL's built-in font does not


def caption(image: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (image.width, image.height + 18), "white")
    out.paste(image, (0, 18))
    try:
        font = ImageFont.truetype(FONT, 12)
    except OSError:
        font, text = ImageFont.load_default(), text.replace("λ", "lambda")
    ImageDraw.Draw(out).text((4, 2), text, fill="black", font=font)
    return out


def _settings(fixture: ModelFixture) -> dict[str, Any]:
    return {"enabled": True, "source": fixture.model_name, "loras": [{"name": fixture.lora(), "weight": 1.0}]}


def test_readme_lambda_sweep(client: WebUIClient, model_fixtures) -> None:
    """docs/images/lambda-sweep.png: one seed, λ from 0 to 2, from the real WebUI with the fixture checkpoint and
    LoRA (random weights: the picture shows what λ does to an image, not a style)."""
    sd15: ModelFixture = model_fixtures["sd15"]
    client.set_model(sd15.model_name)
    tiles = []
    for strength in SWEEP:
        gen = client.txt2img(PROMPT, width=SIZE, height=SIZE, steps=STEPS,
                             alwayson_scripts={SCRIPT: {"args": [{**_settings(sd15), "strength": strength}]}})
        assert gen.param("Delta lambda") == f"{strength:g}"
        tiles.append(caption(Image.open(io.BytesIO(gen.image)).convert("RGB"), f"λ = {strength:g}"))
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), tiles[0].height), "white")
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * (tile.width + 4), 0))
    strip.save(REPO_ROOT / "docs" / "images" / "lambda-sweep.png")
    assert tiles[0].tobytes() != tiles[2].tobytes()  # λ moves the image


def test_readme_preview_strip(client: WebUIClient, model_fixtures) -> None:
    """docs/images/preview-strip.png: what the panel's preview option adds to the results (rows: the target's, the
    source base's and the adapted source's predictions and |Δ|; columns: kept steps)."""
    sd15: ModelFixture = model_fixtures["sd15"]
    client.set_model(sd15.model_name)
    gen = client.txt2img(PROMPT, width=SIZE, height=SIZE, steps=STEPS,
                         alwayson_scripts={SCRIPT: {"args": [{**_settings(sd15), "preview": True}]}})
    assert len(gen.images) == 2, "the preview strip follows the image"
    image, preview = (Image.open(io.BytesIO(b)).convert("RGB") for b in gen.images)
    assert preview.height % 4 == 0 and preview.tobytes() != image.tobytes()  # four rows of tiles
    preview.save(REPO_ROOT / "docs" / "images" / "preview-strip.png")


# ---------------------------------------------------------------------------------------------- restarts


def test_a_saved_ui_default_survives_a_restart_and_the_panel_speaks_chinese(
        server_pool, model_fixtures, chromium: str, record_property) -> None:
    """Settings → Defaults → Apply writes the panel's λ into ui-config.json under its label; a WebUI started with
    that file shows it. The second start also chooses the zh_CN localization: labels, tooltips (ours too, which
    our script keeps in the chosen language) and the header summary are Chinese."""
    from playwright.sync_api import expect

    server = server_pool.get(ServerConfig(extension=True))
    assert server.client is not None and server.data_dir is not None
    with browser(server.client.base_url, chromium) as page:
        page.locator(f"#{P}enabled .label-wrap").first.click()  # opens it: a closed accordion's controls are hidden
        strength = page.locator(f"#{P}strength input[type=number]")
        strength.fill("0.6")
        strength.press("Enter")
        harness.apply_ui_defaults(page)
    saved = json.loads((server.data_dir / "ui-config.json").read_text(encoding="utf-8"))
    assert saved[STRENGTH_DEFAULT_KEY] == 0.6
    assert saved[GROUP2_STRENGTH_KEY] == 1.0  # its own key, written at the first start, untouched by the Apply

    server = server_pool.get(ServerConfig(extension=True, ui_config=tuple(saved.items()),
                                          settings=(("localization", "zh_CN"),)))
    assert server.client is not None
    try:
        # what the page was built with: the first group's λ from the saved default, the second group's its own
        assert page_values(server.client, f"{P}strength", f"{P}group2_strength") == [0.6, 1.0]
        with browser(server.client.base_url, chromium) as page:
            expect(page.locator(f"#{P}strength input[type=number]")).to_have_value("0.6")
            expect(page.locator(f"#{P}strength")).to_contain_text(ZH["λ (strength)"])
            expect(page.locator(f"#{P}source")).to_contain_text(ZH["Source base checkpoint"])
            header = page.locator(f"#{P}enabled .label-wrap").first
            expect(header).to_have_attribute("title", ZH[_tooltip("enabled")], timeout=10_000)
            page.wait_for_timeout(2500)  # our script re-applies tooltips every second: they must stay Chinese
            assert page.locator(f"#{P}strength").get_attribute("title") == ZH[_tooltip("strength")]
            summary = page.locator(f"#{P}summary .delta-sampling-summary-text")
            expect(summary).to_have_text(f"λ 0.6 · {ZH['no source']}")
            shot = REPO_ROOT / "docs" / "images" / "accordion-zh.png"
            if not page.locator(f"#{P}enabled-visible-checkbox").is_checked():  # saved open with the default
                header.click()
            page.locator(f"#{P}enabled").screenshot(path=str(shot))
            record_property("screenshot", str(shot.relative_to(REPO_ROOT)))
    finally:
        server_pool.close()


def page_values(client: WebUIClient, *elem_ids: str) -> list[Any]:
    """The starting values of these controls in the page's gradio config (the same in gradio 3 and 4)."""
    props = {c["props"].get("elem_id"): c["props"] for c in client.get("/config")["components"] if "props" in c}
    return [props[e]["value"] for e in elem_ids]


def _tooltip(field: str) -> str:
    from lib_delta.webui.panel import TOOLTIPS

    return TOOLTIPS[field]


def test_loads_after_controlnet_whatever_the_folder_names(server_pool, model_fixtures, monkeypatch,
                                                          record_property) -> None:
    # Linked under a name sorting before "sd-webui-controlnet", the extension would load first without its
    # metadata.ini (the WebUI lists extensions by folder name); After puts it behind ControlNet.
    monkeypatch.setattr(harness, "EXTENSION_DIR_NAME", "aaa-delta-sampling")
    server = server_pool.get(ServerConfig(extension=True, models=("sd15",), controlnet_extension=True))
    try:
        assert server.client is not None
        names = scripts_in_order(server.client)
        record_property("txt2img_scripts", names)
        assert names.index("controlnet") < names.index("delta sampling"), names
        assert not our_errors(server.log_tail(1 << 20))
    finally:
        server_pool.close()  # the next test's server links the extension under its usual name
