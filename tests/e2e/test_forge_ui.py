"""The Delta Sampling panel in a real Forge 2 (gradio 4), in a headless browser: txt2img and img2img.

Needs Playwright's Python package and a Chromium (`DELTA_E2E_CHROMIUM`, default /usr/bin/chromium), besides the
Forge variables of forge_harness.py; without them it is skipped. It writes docs/images/accordion-forge.png.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
from collections.abc import Iterator

import pytest
from forge_harness import ForgeServerPool, open_pool
from harness import (
    CHROMIUM_FLAGS,
    REPO_ROOT,
    Generation,
    ModelFixture,
    ServerConfig,
    WebUIClient,
    apply_ui_defaults,
    same_pixels,
)
from PIL import Image

from lib_delta.args import POSITIONAL_FIELDS

PROMPT = "a photo of a cat sitting on a red chair"
MODELS = ("sd15",)


@pytest.fixture(scope="module")
def pool() -> Iterator[ForgeServerPool]:
    yield from open_pool(MODELS)


@pytest.fixture
def sd15(pool: ForgeServerPool) -> ModelFixture:
    return pool.fixtures(MODELS)["sd15"]


@pytest.fixture
def forge(pool: ForgeServerPool, sd15: ModelFixture) -> WebUIClient:
    server = pool.get(ServerConfig(extension=True, models=MODELS))
    assert server.client is not None
    server.client.set_model(sd15.model_name)  # the UI generates with the checkpoint the options name
    return server.client


def test_panel_in_the_browser(forge: WebUIClient, sd15: ModelFixture, chromium: str, record_property) -> None:
    from playwright.sync_api import expect, sync_playwright

    source_file = sd15.checkpoint.name  # Forge's checkpoint dropdowns list file names, without a hash
    lora = f"<lora:{sd15.lora()}:1>"

    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        phase = ["load"]
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"{phase[0]}: {e}\n{e.stack}"))
        page.goto(forge.base_url, wait_until="load", timeout=300_000)
        # the visible switch is made by Forge's inputAccordion.js: its presence means the WebUI's scripts ran
        page.wait_for_selector("#script_txt2img_delta_sampling_enabled-visible-checkbox", timeout=300_000)
        page.wait_for_timeout(2000)  # hints.js and ours run once the UI has loaded

        # Both tabs build the panel: closed and off, the header's tooltip, every control's tooltip (gradio 4 keeps
        # the hidden tab and the closed accordions in the page, so they can be read before any is opened).
        phase[0] = "panel"
        for tab in ("txt2img", "img2img"):
            p = f"script_{tab}_delta_sampling_"
            header = page.locator(f"#{p}enabled .label-wrap").first
            assert "Delta Sampling" in (header.get_attribute("title") or ""), tab
            assert not page.locator(f"#{p}enabled-visible-checkbox").is_checked(), tab
            untitled = [f for f in POSITIONAL_FIELDS[1:] if not page.locator(f"#{p}{f}").get_attribute("title")]
            assert not untitled, (tab, untitled)

        p = "script_txt2img_delta_sampling_"
        page.locator(f"#{p}enabled .label-wrap").first.click()  # opens and switches on
        assert page.locator(f"#{p}enabled-visible-checkbox").is_checked()

        def pick(elem_id: str, text: str) -> None:
            page.locator(f"#{elem_id} input").first.click()
            page.locator(f"#{elem_id} ul.options li").filter(has_text=text).first.click()

        def number(elem_id: str, value: str) -> None:
            box = page.locator(f"#{elem_id} input[type=number]")
            box.fill(value)
            box.press("Enter")

        pick(f"{p}source", source_file)
        pick(f"{p}lora_picker", sd15.lora())
        expect(page.locator(f"#{p}loras textarea")).to_have_value(lora)
        number(f"{p}strength", "0.75")
        summary = page.locator(f"#{p}summary .delta-sampling-summary-text")
        expect(summary).to_have_text(f"λ 0.75 · {sd15.model_name}")
        # the second group, from the advanced settings: the same LoRA at λ 0.25
        page.locator(f"#{p}advanced .label-wrap").first.click()
        page.locator(f"#{p}group2 .label-wrap").first.click()
        page.locator(f"#{p}group2_enabled input[type=checkbox]").check()
        pick(f"{p}group2_lora_picker", sd15.lora())
        expect(page.locator(f"#{p}group2_loras textarea")).to_have_value(lora)
        number(f"{p}group2_strength", "0.25")
        expect(summary).to_have_text(f"λ 0.75 · {sd15.model_name} + group 2")
        page.locator(f"#{p}group2_strength input[type=number]").evaluate("e => e.blur()")

        shot = REPO_ROOT / "docs" / "images" / "accordion-forge.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.locator(f"#{p}enabled").screenshot(path=str(shot))

        # a small, fast generation from the UI
        phase[0] = "generate"
        for name, value in (("width", "64"), ("height", "64"), ("steps", "4")):
            number(f"txt2img_{name}", value)
        page.locator("#txt2img_seed input").fill("1")
        page.locator("#txt2img_prompt textarea").fill(PROMPT)
        page.locator("#txt2img_generate").click()
        info = page.locator("#html_info_txt2img").first
        expect(info).to_contain_text("Delta lambda", timeout=600_000)
        text = info.text_content() or ""
        record_property("ui_infotext", text)
        params = Generation([], {"infotexts": [text.strip()]}, 0).params()
        assert (params["Size"], params["Steps"], params["Delta source"]) == ("64x64", "4", source_file), text
        assert (params["Delta LoRAs"], params["Delta lambda"]) == (lora, "0.75"), text
        second = json.loads(params["Delta group 2"])
        assert second["loras"] == [{"name": sd15.lora(), "weight": 1.0}] and second["strength"] == 0.25, text
        # the source and its LoRA credited where image sites read them (once, though both groups use the LoRA)
        assert params["Lora hashes"].startswith(f"{sd15.lora()}: ") and "," not in params["Lora hashes"], text
        assert f'Hashes: {{"model:{sd15.model_name}": ' in text, text
        src = page.locator("#txt2img_gallery img").first.get_attribute("src") or ""
        ui_image = forge.session.get(src if src.startswith("http") else forge.base_url + "/" + src.lstrip("/"),
                                     timeout=60)
        ui_image.raise_for_status()

        # The API, given the infotext of the UI's PNG alone, makes the same picture: the panel's positional values
        # and the API's reading of the text are one set of settings. (`styles`: see test_forge_api.py.)
        infotext = Image.open(io.BytesIO(ui_image.content)).info["parameters"]
        data = forge.post("/sdapi/v1/txt2img", {"infotext": infotext, "styles": []})
        again = Generation([base64.b64decode(i) for i in data["images"]], json.loads(data["info"]), 0)
        assert again.param("Delta group 2") == Generation([], {"infotexts": [infotext]}, 0).param("Delta group 2")
        assert same_pixels(again.image, ui_image.content), (infotext, again.infotext)
        assert again.infotext.splitlines()[0] == PROMPT  # pasting the credits added no LoRA to the prompt

        # pasting parameters without Delta keys switches it off
        phase[0] = "paste"
        page.locator("#txt2img_prompt textarea").fill(f"{PROMPT}\nSteps: 4, Sampler: Euler, Seed: 1, Size: 64x64")
        page.locator("#txt2img_tools #paste").click()
        expect(page.locator(f"#{p}enabled-visible-checkbox")).not_to_be_checked()

        # img2img: its own panel opens and switches on, with its own summary
        phase[0] = "img2img"
        page.locator("#tab_img2img-button").click()
        q = "script_img2img_delta_sampling_"
        expect(page.locator(f"#{q}enabled")).to_be_visible()
        page.locator(f"#{q}enabled .label-wrap").first.click()
        assert page.locator(f"#{q}enabled-visible-checkbox").is_checked()
        pick(f"{q}source", source_file)
        expect(page.locator(f"#{q}summary .delta-sampling-summary-text")).to_have_text(f"λ 1 · {sd15.model_name}")
        # txt2img's panel is unaffected by img2img's
        assert not page.locator(f"#{p}enabled-visible-checkbox").is_checked()
        assert not errors, errors
        ctx.close()


def test_a_saved_ui_default_survives_a_restart_and_the_panel_speaks_chinese(pool: ForgeServerPool, sd15: ModelFixture,
                                                                            chromium: str) -> None:
    """Forge's Settings → Defaults → Apply keeps the panel's λ in ui-config.json under its label, and a Forge
    started with that file and the zh_CN localization shows it, in Chinese (see test_a1111_ecosystem.py)."""
    from playwright.sync_api import expect, sync_playwright

    from lib_delta.webui.panel import TOOLTIPS

    zh = json.loads((REPO_ROOT / "localizations" / "zh_CN.json").read_text(encoding="utf-8"))
    key = "customscript/delta_sampling.py/txt2img/λ (strength)/value"
    group2_key = "customscript/delta_sampling.py/Second adaptation group/txt2img/λ (strength)/value"  # same label
    p = "script_txt2img_delta_sampling_"

    def page_of(ctx, url):
        page = ctx.new_page()
        page.goto(url, wait_until="load", timeout=300_000)
        page.wait_for_selector(f"#{p}enabled-visible-checkbox", timeout=300_000)
        page.wait_for_timeout(2000)
        return page

    server = pool.get(ServerConfig(extension=True, models=MODELS))
    assert server.client is not None and server.data_dir is not None
    # metadata.ini read by Forge: no complaint at start, and the script runs after Forge's built-in ControlNet
    names = server.client.get("/sdapi/v1/scripts")["txt2img"]
    assert names.index("controlnet") < names.index("delta sampling"), names
    complaints = [line for line in server.log_tail(1 << 20).splitlines()
                  if "delta" in line.lower() and ("requires" in line.lower() or "error" in line.lower())]
    assert not complaints, complaints
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        page = page_of(ctx, server.client.base_url)
        page.locator(f"#{p}enabled .label-wrap").first.click()  # opens it: a closed accordion's controls are hidden
        box = page.locator(f"#{p}strength input[type=number]")
        box.fill("0.6")
        box.press("Enter")
        apply_ui_defaults(page)
        ctx.close()
    saved = json.loads((server.data_dir / "ui-config.json").read_text(encoding="utf-8"))
    assert saved[key] == 0.6
    assert saved[group2_key] == 1.0  # its own key, written at the first start, untouched by the Apply

    server = pool.get(ServerConfig(extension=True, models=MODELS, ui_config=tuple(saved.items()),
                                   settings=(("localization", "zh_CN"),)))
    assert server.client is not None
    try:
        # what the page was built with: the first group's λ from the saved default, the second group's its own
        props = {c["props"].get("elem_id"): c["props"] for c in server.client.get("/config")["components"]
                 if "props" in c}
        assert [props[f"{p}strength"]["value"], props[f"{p}group2_strength"]["value"]] == [0.6, 1.0]
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                        args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
            page = page_of(ctx, server.client.base_url)
            expect(page.locator(f"#{p}strength input[type=number]")).to_have_value("0.6")
            expect(page.locator(f"#{p}strength")).to_contain_text(zh["λ (strength)"])
            page.wait_for_timeout(2500)  # our script re-applies tooltips every second: they must stay Chinese
            assert page.locator(f"#{p}strength").get_attribute("title") == zh[TOOLTIPS["strength"]]
            expect(page.locator(f"#{p}summary .delta-sampling-summary-text")).to_have_text(
                f"λ 0.6 · {zh['no source']}")
            ctx.close()
    finally:
        pool.close()
