"""ControlNet units on the source's adapted rows in a real AUTOMATIC1111 v1.10.1 with sd-webui-controlnet.

With the SD1.5 ControlNet fixture `cn_sd15` (tests/e2e/fixtures.py) on the SD1.5 fixture checkpoint, 64x64, 4 Euler
steps, cfg mode:

- the identity: target == source, one unit (preprocessor "none", and "canny"), λ = 1 gives the image of the
  extension's own unit on that checkpoint (>= IDENTICAL_ABOVE_DB), and that unit moves the image (<= MOVED_BELOW_DB);
  the same with a LoRA in the group against the extension's unit + `<lora:L:1>`, in hires fix, and in img2img with
  the init image as the control image;
- across families: the SD1.5 ControlNet through the SD1.5 source changes an SDXL target's image, and the infotext
  records the unit (never its image);
- bad units (unknown model, not an image, a huge image, no image, a preprocessor that needs a download, an SD1.5
  ControlNet on an SDXL source) are 422s naming the problem, and the next plain image is byte-identical to the first.

Needs DELTA_E2E_A1111 and DELTA_E2E_CONTROLNET (see harness.py). PSNRs go to the JUnit properties.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from harness import (
    Generation,
    ModelFixture,
    ServerConfig,
    ServerPool,
    WebUIClient,
    control_image,
    controlnet_from_env,
    controlnet_units,
    psnr,
    same_pixels,
)

SCRIPT = "Delta Sampling"
PROMPT = "a photo of a cat sitting on a red chair"
IDENTICAL_ABOVE_DB = 35.0
MOVED_BELOW_DB = 25.0
CHANGED_BELOW_DB = 35.0
IMAGE = base64.b64encode(control_image()).decode()
# the SD1.5 source and the targets of other families (A1111 loads only the active checkpoint, so listing more is cheap)
MODELS = ("sd15", "sdxl", "sd21v", "sd3")


class Env:
    def __init__(self, client: WebUIClient, fixtures: dict[str, ModelFixture], cn_model: str):
        self.client, self.fixtures, self.cn_model = client, fixtures, cn_model
        self.plain: dict[str, bytes] = {}

    def use(self, key: str) -> None:
        self.client.set_model(self.fixtures[key].model_name)

    def own(self, module: str, **kw) -> dict:
        return controlnet_units({"enabled": True, "model": self.cn_model, "image": IMAGE, "module": module,
                                 "weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0,
                                 "resize_mode": "Crop and Resize", "control_mode": "Balanced",
                                 "pixel_perfect": False, **kw})

    def ours(self, source: str, units: list[dict], **kw) -> dict:
        settings = {"enabled": True, "source": self.fixtures[source].model_name, "controlnets": units, **kw}
        return {"alwayson_scripts": {SCRIPT: {"args": [settings]}}}

    def unit(self, module: str, **kw) -> dict:
        return {"model": self.cn_model, "image": IMAGE, "module": module, **kw}


@pytest.fixture(scope="module")
def env(server_pool: ServerPool) -> Iterator[Env]:
    if controlnet_from_env() is None:
        pytest.skip("set DELTA_E2E_CONTROLNET to an sd-webui-controlnet checkout")
    server = server_pool.get(ServerConfig(extension=True, models=MODELS, controlnet_extension=True,
                                          controlnets=("cn_sd15",)))
    assert server.client is not None
    fixtures = server_pool.fixtures((*MODELS, "cn_sd15"))
    listed = server.client.get("/controlnet/model_list")["model_list"]
    [cn_model] = [m for m in listed if m.startswith(fixtures["cn_sd15"].model_name + " [")]
    yield Env(server.client, fixtures, cn_model)


@pytest.mark.parametrize("module", ["none", "canny"])
def test_target_equal_to_source_equals_the_extensions_own_unit(env: Env, module: str, record_property) -> None:
    env.use("sd15")
    plain = env.client.txt2img(PROMPT)
    env.plain.setdefault("sd15", plain.image)
    own = env.client.txt2img(PROMPT, **env.own(module))
    ours = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit(module)]))
    db_own, db_plain = psnr(ours.image, own.image), psnr(own.image, plain.image)
    record_property("psnr_db_vs_own_unit", round(db_own, 2))
    record_property("psnr_db_own_unit_vs_plain", round(db_plain, 2))
    record_property("seconds_own", round(own.seconds, 1))
    record_property("seconds_delta", round(ours.seconds, 1))
    print(f"{module}: PSNR(delta, own unit) = {db_own:.2f} dB, PSNR(own unit, plain) = {db_plain:.2f} dB; "
          f"{ours.seconds:.1f}s vs {own.seconds:.1f}s")
    assert db_plain <= MOVED_BELOW_DB
    assert db_own >= IDENTICAL_ABOVE_DB
    recorded = ours.param("Delta ControlNets") or ""
    assert env.cn_model in recorded and IMAGE[:40] not in ours.infotext


def test_with_a_lora_in_the_group_equals_the_extensions_unit_and_lora(env: Env, record_property) -> None:
    env.use("sd15")
    lora = env.fixtures["sd15"].lora()
    own = env.client.txt2img(f"{PROMPT} <lora:{lora}:1>", **env.own("none"))
    ours = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit("none")], loras=[{"name": lora, "weight": 1}]))
    db = psnr(ours.image, own.image)
    record_property("psnr_db_vs_own_unit_and_lora", round(db, 2))
    print(f"unit + LoRA: PSNR(delta, own unit + <lora>) = {db:.2f} dB")
    assert db >= IDENTICAL_ABOVE_DB


# 4 steps at denoising 0.75 start img2img at the schedule's largest sigma (setup_img2img_steps: t_enc = 3 of 4), where
# the init latent is under a tenth of the noise and img2img repeats txt2img. At 0.5 (t_enc = 2) the init image counts.
IMG2IMG_DENOISING = 0.5


def test_in_hires_fix_and_img2img_too(env: Env, record_property) -> None:
    """Hires fix (the hint at the hires size, canny softened there as the extension does) and img2img whose init
    image serves as the control image (no unit image), each against the extension's own unit; the img2img image is
    not txt2img's."""
    env.use("sd15")
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
             "denoising_strength": 0.6}
    own = env.client.txt2img(PROMPT, **hires, **env.own("canny"))
    ours = env.client.txt2img(PROMPT, **hires, **env.ours("sd15", [env.unit("canny")]))
    db_hires = psnr(ours.image, own.image)
    init = control_image()
    i2i = {"denoising_strength": IMG2IMG_DENOISING}
    own_i2i = env.client.img2img(PROMPT, init, **i2i, **env.own("none", image=None))
    plain_i2i = env.client.img2img(PROMPT, init, **i2i)
    ours_i2i = env.client.img2img(PROMPT, init, **i2i, **env.ours("sd15", [{"model": env.cn_model}]))
    txt2img = env.plain.get("sd15") or env.client.txt2img(PROMPT).image
    db_i2i, db_i2i_moved = psnr(ours_i2i.image, own_i2i.image), psnr(own_i2i.image, plain_i2i.image)
    from_txt2img = psnr(plain_i2i.image, txt2img)
    record_property("psnr_db_hires_vs_own_unit", round(db_hires, 2))
    record_property("psnr_db_img2img_vs_own_unit", round(db_i2i, 2))
    record_property("psnr_db_img2img_own_unit_vs_plain", round(db_i2i_moved, 2))
    record_property("psnr_db_img2img_plain_vs_txt2img", round(from_txt2img, 2))
    print(f"hires: PSNR(delta, own unit) = {db_hires:.2f} dB; img2img at denoising {IMG2IMG_DENOISING}: "
          f"{db_i2i:.2f} dB (own unit vs plain {db_i2i_moved:.2f} dB; plain img2img vs txt2img {from_txt2img:.2f} dB)")
    assert from_txt2img < CHANGED_BELOW_DB  # the init image moves the image: this is img2img, not txt2img again
    assert db_hires >= IDENTICAL_ABOVE_DB and db_i2i >= IDENTICAL_ABOVE_DB and db_i2i_moved < CHANGED_BELOW_DB


def test_an_sd15_controlnet_through_an_sd15_source_changes_an_sdxl_image(env: Env, record_property) -> None:
    env.use("sdxl")
    plain = env.client.txt2img(PROMPT)
    ours = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit("canny")]))
    db = psnr(ours.image, plain.image)
    record_property("psnr_db_vs_plain_sdxl", round(db, 2))
    print(f"SDXL target: PSNR(delta with the SD1.5 ControlNet, plain) = {db:.2f} dB")
    assert db < CHANGED_BELOW_DB
    assert env.cn_model in (ours.param("Delta ControlNets") or "")


def test_an_sd15_controlnet_through_an_sd15_source_changes_an_sd21v_image(env: Env, record_property) -> None:
    """The v-prediction SD2.1 target: the unit changes its image, which stays finite, and the infotext with the unit
    given again (its image is not in the infotext) makes the same pixels."""
    import numpy as np
    from harness import decode_image

    env.use("sd21v")
    plain = env.client.txt2img(PROMPT)
    unit = env.unit("canny", weight=0.8, guidance_end=0.75)
    ours = env.client.txt2img(PROMPT, **env.ours("sd15", [unit]))
    db = psnr(ours.image, plain.image)
    record_property("psnr_db_vs_plain_sd21v", round(db, 2))
    print(f"SD2.1-v target: PSNR(delta with the SD1.5 ControlNet, plain) = {db:.2f} dB")
    assert db < CHANGED_BELOW_DB
    pixels = decode_image(ours.image)
    assert np.isfinite(pixels).all() and pixels.std() > 1  # a picture, not NaN latents decoded to one colour
    [recorded] = json.loads(ours.param("Delta ControlNets") or "[]")
    assert (recorded["model"], recorded["module"], recorded["weight"], recorded["guidance_end"]) == (
        env.cn_model, "canny", 0.8, 0.75), ours.infotext
    assert ours.param("Model") == env.fixtures["sd21v"].model_name and IMAGE[:40] not in ours.infotext
    again = env.client.post("/sdapi/v1/txt2img", {"infotext": ours.infotext, **env.ours("sd15", [unit])})
    assert same_pixels(base64.b64decode(again["images"][0]), ours.image), ours.infotext


def test_an_sd15_unit_on_an_sd3_target_is_refused_naming_both_models(env: Env, record_property) -> None:
    """SD3's 16-channel latent cannot take a 4-channel source's delta (DESIGN: latent channels must match), with or
    without a unit: a 422 naming both models, and the next plain SD3 image has the bytes of the one before."""
    hf_home = os.environ.get("DELTA_E2E_HF_HOME")
    if hf_home and not (Path(hf_home) / "hub" / "models--google--t5-v1_1-xxl").is_dir():
        pytest.skip(f"AUTOMATIC1111 loads SD3's T5 tokenizer: google/t5-v1_1-xxl must be in {hf_home}")
    env.use("sd3")
    plain = env.client.txt2img(PROMPT)
    payload = {"prompt": PROMPT, "negative_prompt": "", "seed": 1, "steps": 4, "width": 64, "height": 64,
               "cfg_scale": 7.0, "sampler_name": "Euler", **env.ours("sd15", [env.unit("canny")])}
    r = env.client.session.post(env.client.base_url + "/sdapi/v1/txt2img", json=payload, timeout=600)
    detail = str(r.json().get("detail")) if r.headers.get("content-type", "").startswith("application/json") \
        else r.text
    record_property("status", r.status_code)
    record_property("detail", detail[:300])
    print(f"{r.status_code}: {detail[:300]}")
    assert r.status_code == 422, r.text[:500]
    assert f"'{env.fixtures['sd15'].model_name}' (SD1, 4 latent channels)" in detail, detail
    assert f"'{env.fixtures['sd3'].model_name}' (SD3, 16 latent channels)" in detail, detail
    assert env.client.txt2img(PROMPT).image == plain.image


def _huge_png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4100, 8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(("source", "unit", "message"), [
    ("sd15", {"image": IMAGE, "model": "delta_e2e_cn_sd1"}, "is not among sd-webui-controlnet's models"),
    ("sd15", {"image": base64.b64encode(b"not an image").decode()}, "is not a readable image"),
    ("sd15", {"image": _huge_png()}, "at most 4096 pixels a side"),
    ("sd15", {}, "No control image was given"),
    ("sd15", {"image": IMAGE, "module": "depth_midas"}, "is not supported"),
    ("sdxl", {"image": IMAGE}, "is not made for the source"),
], ids=["unknown-model", "not-an-image", "huge-image", "no-image", "download-preprocessor", "other-family"])
def test_bad_units_are_422s_and_leave_nothing_behind(env: Env, source: str, unit: dict, message: str,
                                                     record_property) -> None:
    env.use("sd15")
    first = env.plain.get("sd15") or env.client.txt2img(PROMPT).image
    env.plain.setdefault("sd15", first)
    payload = {"prompt": PROMPT, "negative_prompt": "", "seed": 1, "steps": 4, "width": 64, "height": 64,
               "cfg_scale": 7.0, "sampler_name": "Euler", **env.ours(source, [{"model": env.cn_model, **unit}])}
    r = env.client.session.post(env.client.base_url + "/sdapi/v1/txt2img", json=payload, timeout=600)
    detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else r.text
    record_property("status", r.status_code)
    record_property("detail", str(detail)[:300])
    print(f"{r.status_code}: {str(detail)[:300]}")
    assert r.status_code == 422 and message in str(detail)
    assert env.client.txt2img(PROMPT).image == first
    with pytest.raises(requests.HTTPError):
        env.client.post("/sdapi/v1/txt2img", payload)


# --- the panel's form, X/Y/Z, the preview strip --------------------------------------------------------------------


def _positional(**controls) -> list:
    """The panel's positional values (what the WebUI's UI sends), from the defaults with these controls set."""
    from lib_delta.args import POSITIONAL_FIELDS, DeltaSettings, to_positional

    values = to_positional(DeltaSettings())
    for name, value in controls.items():
        values[POSITIONAL_FIELDS.index(name)] = value
    return values


def test_script_info_lists_the_unit_controls_and_the_panels_form_runs_them(env: Env) -> None:
    from lib_delta.args import POSITIONAL_FIELDS, DeltaSettings, to_positional

    env.use("sd15")
    ours = [s for s in env.client.get("/sdapi/v1/script-info") if s["name"] == SCRIPT.lower()]
    for s in ours:
        args = s["args"]
        assert len(args) == len(POSITIONAL_FIELDS) and [a["value"] for a in args] == to_positional(DeltaSettings())
        model = args[POSITIONAL_FIELDS.index("controlnet1_model")]
        assert model["choices"][0] == "None" and env.cn_model in model["choices"], model
        module = args[POSITIONAL_FIELDS.index("controlnet1_module")]
        assert module["value"] == "none" and {"none", "canny"} <= set(module["choices"]), module
    # the positional form, as the panel sends it (the image as base64 here), gives the settings object's image
    by_dict = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit("canny", weight=0.8)]))
    values = _positional(enabled=True, source=env.fixtures["sd15"].model_name, controlnet1_model=env.cn_model,
                         controlnet1_image=IMAGE, controlnet1_module="canny", controlnet1_weight=0.8)
    by_position = env.client.txt2img(PROMPT, alwayson_scripts={SCRIPT: {"args": values}})
    assert by_position.image == by_dict.image and by_position.infotext == by_dict.infotext


def test_xyz_grid_over_the_controlnet_axes(env: Env, record_property) -> None:
    env.use("sd15")
    grid_script = next(s for s in env.client.get("/sdapi/v1/script-info")
                       if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = grid_script["args"][0]["choices"]
    weight, end = labels.index("[Delta] ControlNet weight"), labels.index("[Delta] ControlNet guidance end")
    # x: weight 0, 1; y: guidance end 0.5, 1; no z; draw legend, include the cells' own images; csv mode off
    script_args = [weight, "0, 1", [], end, "0.5, 1", [], 0, "", [], True, True, False, False, False, False, False, 0,
                   False]
    grid = env.client.txt2img(PROMPT, script_name="x/y/z plot", script_args=script_args,
                              **env.ours("sd15", [env.unit("canny")]))
    record_property("seconds", round(grid.seconds, 1))
    assert len(grid.images) == 5  # the grid, then one image per cell (x fastest)
    cells = grid.images[1:]
    units = [json.loads(Generation([], {"infotexts": [t]}, 0).param("Delta ControlNets"))[0]
             for t in grid.info["infotexts"][1:]]
    assert [(u["weight"], u["guidance_end"]) for u in units] == [(0, 0.5), (1, 0.5), (0, 1), (1, 1)]
    for cell, (w, e) in zip(cells, [(0.0, 0.5), (1.0, 0.5), (0.0, 1.0), (1.0, 1.0)], strict=True):
        single = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit("canny", weight=w, guidance_end=e)]))
        assert same_pixels(cell, single.image), (w, e)  # each cell is the single generation with its values
    plain = env.plain.get("sd15") or env.client.txt2img(PROMPT).image
    assert same_pixels(cells[0], plain) and psnr(cells[3], plain) < CHANGED_BELOW_DB  # weight 0: no delta at all


def test_the_preview_strip_shows_the_control_map(env: Env) -> None:
    from harness import decode_image

    env.use("sd15")
    out = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit("canny")], preview=True))
    without = env.client.txt2img(PROMPT, **env.ours("sd15", [], adapted_prompt="in the snow", preview=True))
    strip, plain_strip = decode_image(out.images[-1]), decode_image(without.images[-1])
    tile = strip.shape[0] // 4
    assert strip.shape[0] == plain_strip.shape[0] and strip.shape[1] == plain_strip.shape[1] + tile
    edges = strip[:tile, plain_strip.shape[1]:]
    assert edges.std() > 10 and not strip[tile:, plain_strip.shape[1]:].any()  # the canny map, then blank rows


def test_units_in_the_panel_in_a_browser(env: Env, chromium: str, record_property, tmp_path) -> None:
    """txt2img's panel in headless Chromium: a unit set from the UI (model from the list that follows the source,
    an uploaded image, canny) makes the picture the API makes with the same unit; pasting the infotext back
    restores the unit and says that its image must be given again; img2img offers "Use the init image"."""
    import tempfile

    from harness import CHROMIUM_FLAGS, REPO_ROOT
    from playwright.sync_api import expect, sync_playwright

    env.use("sd15")
    api = env.client
    source_title = next(m["title"] for m in api.get("/sdapi/v1/sd-models")
                        if m["model_name"] == env.fixtures["sd15"].model_name)
    picture = tmp_path / "control.png"
    picture.write_bytes(control_image())
    p = "script_txt2img_delta_sampling_"
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1400})
        page = ctx.new_page()
        phase = ["load"]
        errors: list[str] = []
        webui_own_errors: list[str] = []
        page.on("pageerror", lambda e: (webui_own_errors if phase[0] == "webui size boxes" else errors).append(
            f"{phase[0]}: {e}\n{e.stack}"))
        page.goto(api.base_url, wait_until="load", timeout=300_000)
        page.wait_for_selector(f"#{p}enabled .label-wrap", timeout=300_000)
        page.wait_for_timeout(2000)

        def pick(elem_id: str, text: str) -> None:
            page.locator(f"#{elem_id} input").first.click()
            page.locator(f"#{elem_id} ul.options li").filter(has_text=text).first.click()

        def pick_from(elem_id: str, text: str) -> list[str]:
            """Open the dropdown, read what it offers, and pick ``text`` from that same open list (gradio 3 puts a
            check mark, shown on the selected one only, before each option's text)."""
            page.locator(f"#{elem_id} input").first.click()
            items = page.locator(f"#{elem_id} ul.options li")
            items.first.wait_for()
            texts = [t.replace("✓", "").strip() for t in items.all_text_contents()]
            page.locator(f"#{elem_id} ul.options li[data-value='{text}']").first.click()
            return texts

        phase[0] = "panel"
        page.locator(f"#{p}enabled .label-wrap").first.click()
        pick(f"{p}source", source_title)
        page.locator(f"#{p}controlnets .label-wrap").first.click()
        expect(page.locator(f"#{p}controlnet1_model")).to_be_visible()
        assert page.locator(f"#{p}controlnets_missing").count() == 0  # the extension is there
        page.wait_for_timeout(1000)  # the source's change event refills the model lists
        listed = pick_from(f"{p}controlnet1_model", env.cn_model)
        assert listed[0] == "None" and env.cn_model in listed, listed
        page.locator(f"#{p}controlnet1_image input[type=file]").set_input_files(str(picture))
        page.wait_for_timeout(1000)
        pick(f"{p}controlnet1_module", "canny")
        assert not page.locator(f"#{p}controlnet1_use_init_image").is_visible()  # txt2img has no init image
        unit_fields = ["model", "image", "module", "weight", "guidance_start", "guidance_end", "resize_mode"]
        untitled = [f for f in unit_fields if not page.locator(f"#{p}controlnet1_{f}").get_attribute("title")]
        assert not untitled, untitled
        shot = REPO_ROOT / "docs" / "images" / "controlnet-units.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.locator(f"#{p}enabled").screenshot(path=str(shot))

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
        info = page.locator("#html_info_txt2img").first
        expect(info).to_contain_text("Delta ControlNets", timeout=600_000)
        text = (info.text_content() or "").strip()
        record_property("ui_infotext", text)
        [unit] = json.loads(Generation([], {"infotexts": [text]}, 0).param("Delta ControlNets"))
        assert (unit["model"], unit["module"], unit["weight"]) == (env.cn_model, "canny", 1), text
        src = page.locator("#txt2img_gallery img").first.get_attribute("src") or ""
        ui_image = api.session.get(src if src.startswith("http") else api.base_url + "/" + src.lstrip("/"),
                                   timeout=60)
        ui_image.raise_for_status()
        from PIL import Image

        infotext = Image.open(io.BytesIO(ui_image.content)).info["parameters"]
        # the API, given that infotext and the same unit with its image, makes the same picture
        data = api.post("/sdapi/v1/txt2img", {"infotext": infotext, **env.ours("sd15", [env.unit("canny")])})
        again = base64.b64decode(data["images"][0])
        assert same_pixels(again, ui_image.content), infotext

        # pasting the infotext back restores the unit and says that its image must be given again (the note: an
        # HTML block, whose content gradio 3 gives the same id, hence .first)
        phase[0] = "paste"
        pick(f"{p}controlnet1_module", "none")
        page.locator("#txt2img_prompt textarea").fill(infotext)
        page.locator("#txt2img_tools #paste").click()
        expect(page.locator(f"#{p}controlnet1_note").first).to_contain_text("was pasted without its image")
        expect(page.locator(f"#{p}controlnet1_module input").first).to_have_value("canny")
        expect(page.locator(f"#{p}controlnet1_model input").first).to_have_value(env.cn_model)
        other = tmp_path / "other.png"
        other.write_bytes(control_image(border=8))
        page.locator(f"#{p}controlnet1_image input[type=file]").set_input_files(str(other))
        expect(page.locator(f"#{p}controlnet1_note").first).to_have_text("")  # a new image answers the note

        phase[0] = "img2img"
        # gradio 3's tab buttons have no ids (gradio 4's do): the button of the WebUI's tab row named img2img
        page.locator("#tabs > .tab-nav > button").filter(has_text="img2img").first.click()
        q = "script_img2img_delta_sampling_"
        page.locator(f"#{q}enabled .label-wrap").first.click()
        page.locator(f"#{q}controlnets .label-wrap").first.click()
        expect(page.locator(f"#{q}controlnet1_use_init_image")).to_be_visible()
        record_property("webui_own_page_errors", len(webui_own_errors))
        assert not errors, errors
        ctx.close()
