"""Delta Sampling's outside interfaces through a real AUTOMATIC1111: the API's two argument forms, the response's
infotext and regenerating from it, the X/Y/Z plot over λ, script-info, errors, and the txt2img panel in a browser.

The browser test needs Playwright's Python package and a Chromium (`DELTA_E2E_CHROMIUM`, default
/usr/bin/chromium); without them it is skipped. It writes docs/images/accordion.png.
"""

from __future__ import annotations

import base64
import json
import tempfile

import pytest
import requests
from harness import CHROMIUM_FLAGS, REPO_ROOT, Generation, ModelFixture, WebUIClient, decode_image, psnr, same_pixels

from lib_delta.args import POSITIONAL_FIELDS, DeltaSettings, to_positional

PROMPT = "a photo of a cat sitting on a red chair"
SCRIPT = "Delta Sampling"
CHANGED_BELOW_DB = 35.0  # see test_baseline.py: a rank-4 LoRA moves these images to about 20 dB
AXES = ["[Delta] Lambda", "[Delta] Window start", "[Delta] Window end", "[Delta] Source checkpoint",
        "[Delta] LoRA weight", "[Delta] Schedule", "[Delta] Enabled", "[Delta] Source CFG scale",
        "[Delta] ControlNet weight", "[Delta] ControlNet guidance end"]


@pytest.fixture(scope="module")
def sd15(server_pool, model_fixtures) -> ModelFixture:
    return model_fixtures["sd15"]


@pytest.fixture
def api(client: WebUIClient, sd15: ModelFixture) -> WebUIClient:
    client.set_model(sd15.model_name)  # target == source: the extension's identity case, and one model in RAM
    return client


def delta_dict(fixture: ModelFixture, **changes) -> dict:
    """The settings most tests use: every infotext key that has a non-default value shows up."""
    return {"enabled": True, "source": fixture.model_name, "loras": [{"name": fixture.lora(), "weight": 1.0}],
            "strength": 0.75, "schedule": "cosine", "start": 0.0, "end": 0.8, **changes}


def generate(api: WebUIClient, args: list, **params) -> Generation:
    return api.txt2img(PROMPT, alwayson_scripts={SCRIPT: {"args": args}}, **params)


@pytest.fixture(scope="module")
def generations() -> dict[str, Generation]:
    """Generations shared by the tests of this module (each costs a minute or more on a CPU)."""
    return {}


@pytest.fixture
def plain(api: WebUIClient, generations: dict[str, Generation]) -> Generation:
    """The same request with Delta Sampling off."""
    if "plain" not in generations:
        generations["plain"] = api.txt2img(PROMPT)
    return generations["plain"]


@pytest.fixture
def reference(api: WebUIClient, sd15: ModelFixture, generations: dict[str, Generation]) -> Generation:
    """delta_dict(sd15) by the API's settings object."""
    if "reference" not in generations:
        generations["reference"] = generate(api, [delta_dict(sd15)])
    return generations["reference"]


def post_error(api: WebUIClient, path: str, payload: dict) -> requests.Response:
    r = api.session.post(api.base_url + path, json=payload, timeout=api.timeout)
    assert r.status_code >= 400, r.text[:500]
    return r


def test_script_info_lists_our_args_and_axes(api: WebUIClient) -> None:
    info = api.get("/sdapi/v1/script-info")
    ours = [s for s in info if s["name"] == SCRIPT.lower()]
    assert sorted(s["is_img2img"] for s in ours) == [False, True]
    for s in ours:
        assert s["is_alwayson"]
        args = s["args"]
        assert len(args) == len(POSITIONAL_FIELDS)
        assert [a["value"] for a in args] == to_positional(DeltaSettings())
        assert args[POSITIONAL_FIELDS.index("schedule")]["choices"][0] == "constant"
        assert (args[3]["minimum"], args[3]["maximum"]) == (-5.0, 5.0)  # the range the API accepts
    for grid in (s for s in info if s["name"] == "x/y/z plot"):
        labels = grid["args"][0]["choices"]
        assert [lab for lab in labels if lab.startswith("[Delta]")] == AXES


def test_dict_call_writes_the_infotext(sd15: ModelFixture, reference: Generation, plain: Generation,
                                      record_property) -> None:
    params = reference.params()
    assert params["Delta source"].startswith(sd15.model_name), reference.infotext
    assert params["Delta LoRAs"] == f"<lora:{sd15.lora()}:1>"
    assert (params["Delta lambda"], params["Delta schedule"], params["Delta window"]) == ("0.75", "cosine", "0-0.8")
    assert "<lora:" not in reference.infotext.splitlines()[0]  # the LoRA went to the source only, not the prompt
    assert params["Lora hashes"].startswith(f"{sd15.lora()}: ")  # credited where image sites read it
    record_property("seconds", round(reference.seconds, 1))
    db = psnr(plain.image, reference.image)
    record_property("psnr_db_vs_plain", round(db, 2))
    assert db < CHANGED_BELOW_DB  # the delta did something


def test_positional_call_equals_dict_call(api: WebUIClient, sd15: ModelFixture, reference: Generation) -> None:
    positional = to_positional(DeltaSettings.from_dict(delta_dict(sd15)))[:7]  # later values keep their defaults
    by_position = generate(api, positional)
    assert by_position.image == reference.image
    assert by_position.infotext == reference.infotext


def test_infotext_alone_reproduces_the_image(api: WebUIClient, reference: Generation) -> None:
    again = api.post("/sdapi/v1/txt2img", {"infotext": reference.infotext})
    assert json.loads(again["info"])["infotexts"][0] == reference.infotext
    assert base64.b64decode(again["images"][0]) == reference.image


def test_infotext_without_delta_keys_leaves_it_off(api: WebUIClient, plain: Generation) -> None:
    again = api.post("/sdapi/v1/txt2img", {"infotext": plain.infotext})
    assert "Delta" not in json.loads(again["info"])["infotexts"][0]
    assert base64.b64decode(again["images"][0]) == plain.image


def test_xyz_grid_over_lambda(api: WebUIClient, sd15: ModelFixture, reference: Generation, record_property) -> None:
    grid_script = next(s for s in api.get("/sdapi/v1/script-info")
                       if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axis = grid_script["args"][0]["choices"].index("[Delta] Lambda")  # the index depends on the installed scripts
    # x: λ over three values; no y or z; draw legend, include the cells' own images; csv mode off
    script_args = [axis, "0, 0.5, 0.75", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0,
                   False]
    grid = api.txt2img(PROMPT, script_name="x/y/z plot", script_args=script_args,
                       alwayson_scripts={SCRIPT: {"args": [delta_dict(sd15, strength=2.0)]}})
    record_property("seconds", round(grid.seconds, 1))
    assert len(grid.images) == 4  # the grid, then one image per cell
    cells = grid.images[1:]
    lambdas = [Generation([], {"infotexts": [t]}, 0).param("Delta lambda") for t in grid.info["infotexts"][1:]]
    assert lambdas == ["0", "0.5", "0.75"]
    assert len({decode_image(c).tobytes() for c in cells}) == 3  # three different pictures
    # the λ = 0.75 cell has exactly the pixels of the single generation with those settings: the axis acts like
    # the setting (the files differ: a cell's infotext also names the grid's axis)
    assert same_pixels(cells[2], reference.image)


def test_bad_settings_are_http_errors_naming_the_problem(api: WebUIClient, sd15: ModelFixture) -> None:
    cases = [
        ({**delta_dict(sd15), "strenght": 1}, "strenght"),
        (delta_dict(sd15, loras=[{"name": "no_such_lora", "weight": 1.0}]), "no_such_lora"),
        (delta_dict(sd15, source="no_such_model"), "no_such_model"),
        (delta_dict(sd15, schedule="wobbly"), "wobbly"),
        # this server runs without sd-webui-controlnet: a unit is refused naming it
        (delta_dict(sd15, controlnets=[{"model": "control_v11p_sd15_canny", "image": "iVBORw0KGgo="}]),
         "sd-webui-controlnet extension, which is not installed"),
    ]
    for args, named in cases:
        r = post_error(api, "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 4, "width": 64, "height": 64,
                                                  "alwayson_scripts": {SCRIPT: {"args": [args]}}})
        assert r.status_code == 422, (args, r.text[:500])
        assert named in r.json()["detail"], r.text[:500]


def test_grid_rejects_bad_axis_values_before_it_starts(api: WebUIClient, sd15: ModelFixture) -> None:
    grid_script = next(s for s in api.get("/sdapi/v1/script-info")
                       if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axis = grid_script["args"][0]["choices"].index("[Delta] Schedule")
    script_args = [axis, "linear, wobbly", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False,
                   0, True]  # csv mode: values from the text, not the dropdown
    r = post_error(api, "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 4, "width": 64, "height": 64,
                                              "script_name": "x/y/z plot", "script_args": script_args,
                                              "alwayson_scripts": {SCRIPT: {"args": [delta_dict(sd15)]}}})
    assert r.status_code == 422 and "wobbly" in r.json()["detail"], r.text[:500]


def test_grid_over_the_lora_weight_of_a_group_without_loras_is_refused(api: WebUIClient, sd15: ModelFixture,
                                                                       plain: Generation) -> None:
    """A grid whose axis sets every LoRA of the first group, which has none (an adapted prompt only): a 422 that
    names the axis, not a grid of one image repeated; the server then makes the plain image as before."""
    grid_script = next(s for s in api.get("/sdapi/v1/script-info")
                       if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axis = grid_script["args"][0]["choices"].index("[Delta] LoRA weight")
    script_args = [axis, "0.5, 1", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]
    settings = delta_dict(sd15, loras=[], adapted_prompt="a watercolor painting")
    r = post_error(api, "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 4, "width": 64, "height": 64,
                                              "script_name": "x/y/z plot", "script_args": script_args,
                                              "alwayson_scripts": {SCRIPT: {"args": [settings]}}})
    assert r.status_code == 422, r.text[:500]
    assert "'[Delta] LoRA weight' sets every LoRA of the first adaptation group, which has none" in r.json()["detail"]
    assert api.txt2img(PROMPT).image == plain.image


# ---------------------------------------------------------------------------------------------- browser


def test_panel_in_the_browser(api: WebUIClient, sd15: ModelFixture, chromium: str, record_property) -> None:
    from playwright.sync_api import expect, sync_playwright

    p = "script_txt2img_delta_sampling_"
    source_title = next(m["title"] for m in api.get("/sdapi/v1/sd-models") if m["model_name"] == sd15.model_name)

    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        # Page errors by phase. Typing into the WebUI's own width/height/steps/seed boxes raises two gradio errors
        # ("Cannot read properties of undefined (reading 'props')" in Blocks.js) on a WebUI without this extension
        # too, so that phase's errors are recorded, not held against the extension; every other phase must have none.
        phase = ["load"]
        errors: list[str] = []
        webui_own_errors: list[str] = []
        page.on("pageerror", lambda e: (webui_own_errors if phase[0] == "webui size boxes" else errors).append(
            f"{phase[0]}: {e}\n{e.stack}"))
        page.goto(api.base_url, wait_until="load", timeout=300_000)
        page.wait_for_selector(f"#{p}enabled .label-wrap", timeout=300_000)
        page.wait_for_timeout(2000)  # hints.js and ours run once the UI has loaded

        phase[0] = "panel"
        header = page.locator(f"#{p}enabled .label-wrap").first
        assert "Delta Sampling" in (header.get_attribute("title") or "")
        assert not page.locator(f"#{p}enabled-visible-checkbox").is_checked()  # closed and off by default
        header.click()  # opens and switches on
        assert page.locator(f"#{p}enabled-visible-checkbox").is_checked()

        def pick(elem_id: str, text: str) -> None:
            page.locator(f"#{elem_id} input").first.click()
            page.locator(f"#{elem_id} ul.options li").filter(has_text=text).first.click()

        pick(f"{p}source", source_title)
        pick(f"{p}lora_picker", sd15.lora())
        expect(page.locator(f"#{p}loras textarea")).to_have_value(f"<lora:{sd15.lora()}:1>")
        strength = page.locator(f"#{p}strength input[type=number]")
        strength.fill("0.75")
        strength.press("Enter")
        summary = page.locator(f"#{p}summary .delta-sampling-summary-text")
        expect(summary).to_have_text(f"λ 0.75 · {sd15.model_name}")
        strength.evaluate("e => e.blur()")
        page.locator(f"#{p}advanced .label-wrap").first.click()  # the screenshot shows the advanced settings too

        # every control shows its tooltip on hover (title on its block or, for the switch, on the header)
        untitled = [f for f in POSITIONAL_FIELDS[1:] if not page.locator(f"#{p}{f}").get_attribute("title")]
        assert not untitled

        # without sd-webui-controlnet the ControlNet units say so, and show no controls
        page.locator(f"#{p}controlnets .label-wrap").first.click()
        # (gradio 3 gives an HTML block and its content the same id: the first is the block)
        expect(page.locator(f"#{p}controlnets_missing").first).to_contain_text("sd-webui-controlnet extension")
        expect(page.locator(f"#{p}controlnet1_model")).to_be_hidden()
        page.locator(f"#{p}controlnets .label-wrap").first.click()
        # and so do the IP-Adapter units, which that extension runs too
        page.locator(f"#{p}ipadapters .label-wrap").first.click()
        expect(page.locator(f"#{p}ipadapters_missing").first).to_contain_text(
            "IP-Adapter units need the sd-webui-controlnet extension")
        expect(page.locator(f"#{p}ipadapter1_model")).to_be_hidden()
        page.locator(f"#{p}ipadapters .label-wrap").first.click()

        shot = REPO_ROOT / "docs" / "images" / "accordion.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.locator(f"#{p}enabled").screenshot(path=str(shot))

        # a small, fast generation from the UI
        phase[0] = "webui size boxes"
        for name, value in (("width", "64"), ("height", "64"), ("steps", "4")):
            box = page.locator(f"#txt2img_{name} input[type=number]")
            box.fill(value)
            box.press("Enter")
        page.locator("#txt2img_seed input").fill("1")
        page.wait_for_timeout(2000)
        phase[0] = "generate"
        page.locator("#txt2img_prompt textarea").fill(PROMPT)
        page.locator("#txt2img_generate").click()
        info = page.locator("#html_info_txt2img").first  # gradio 3 gives the block and its content this id
        expect(info).to_contain_text("Delta lambda", timeout=600_000)
        text = info.text_content() or ""
        record_property("ui_infotext", text)
        assert f"Delta source: {source_title}" in text and "Delta lambda: 0.75" in text, text
        assert f"<lora:{sd15.lora()}:1>" in text, text

        # pasting parameters without Delta keys switches it off
        phase[0] = "paste"
        page.locator("#txt2img_prompt textarea").fill(f"{PROMPT}\nSteps: 4, Sampler: Euler, Seed: 1, Size: 64x64")
        page.locator("#txt2img_tools #paste").click()
        expect(page.locator(f"#{p}enabled-visible-checkbox")).not_to_be_checked()
        record_property("webui_own_page_errors", len(webui_own_errors))
        assert not errors, errors
        ctx.close()
