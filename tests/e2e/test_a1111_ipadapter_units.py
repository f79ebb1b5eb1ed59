"""IP-Adapter units on the source's adapted rows in a real AUTOMATIC1111 v1.10.1 with sd-webui-controlnet.

With the SD1.5 IP-Adapter fixture `ip_sd15` and the full-size ViT-H CLIP-vision fixture `clip_h` (linked where the
extension's `ip-adapter_clip_h` preprocessor looks, so nothing downloads; tests/e2e/fixtures.py) on the SD1.5
fixture checkpoint, 64x64, 4 Euler steps, cfg mode:

- the identity: target == source, one unit, λ = 1 gives the image of the extension's own IP-Adapter unit on that
  checkpoint (>= IDENTICAL_ABOVE_DB), and that unit moves the image (<= MOVED_BELOW_DB); the same with a LoRA in the
  group against the extension's unit + `<lora:L:1>`, in hires fix, and in img2img with the init image as the
  reference image;
- both at once: the user's own IP-Adapter unit on the active model beside ours; with λ = 0 the image is the user's
  unit's alone, pixel for pixel, and with λ = 1 both act;
- across families: the SD1.5 IP-Adapter through the SD1.5 source changes an SDXL and an SD2.1-v target's image, and
  the infotext records the unit (never its image);
- bad units (unknown model, not an image, no image, an encoder that does not match the adapter, a ControlNet given
  as an IP-Adapter, an SD1.5 IP-Adapter on an SDXL source) are 422s naming the problem, and the next plain image is
  byte-identical to the first;
- the panel: /sdapi/v1/script-info lists the unit controls with the IP-Adapters (not the ControlNets) and the
  encoders, the positional form the panel sends makes the settings object's image, and in a browser a unit set in
  txt2img's panel makes the API's image, is pasted back from its infotext and says that its image must be given again;
  the X/Y/Z grid's `[Delta] IP-Adapter weight` axis gives each cell the single generation's pixels.

Needs DELTA_E2E_A1111 and DELTA_E2E_CONTROLNET (see harness.py). PSNRs go to the JUnit properties.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator

import pytest
import requests
from harness import (
    Generation,
    ModelFixture,
    ServerConfig,
    ServerPool,
    WebUIClient,
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


def reference_png(size: int = 96) -> bytes:
    """The reference image: a red disc on a blue-green gradient."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    img.putdata([(30, y * 255 // size, 255 - x * 255 // size) for y in range(size) for x in range(size)])
    ImageDraw.Draw(img).ellipse((size // 4, size // 6, 3 * size // 4, 2 * size // 3), fill=(230, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def inverted_png(size: int = 96) -> bytes:
    """Another reference image: the reference image's negative (a cyan disc on a red-orange gradient)."""
    from PIL import Image, ImageOps

    buf = io.BytesIO()
    ImageOps.invert(Image.open(io.BytesIO(reference_png(size))).convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = base64.b64encode(reference_png()).decode()


class Env:
    def __init__(self, client: WebUIClient, fixtures: dict[str, ModelFixture], listed: dict[str, str]):
        self.client, self.fixtures, self.listed = client, fixtures, listed
        self.ip_model, self.cn_model = listed["ip_sd15"], listed["cn_sd15"]
        self.plain: dict[str, bytes] = {}

    def use(self, key: str) -> None:
        self.client.set_model(self.fixtures[key].model_name)

    def own(self, **kw) -> dict:
        return controlnet_units(self.own_unit(**kw))

    def own_unit(self, **kw) -> dict:
        return {"enabled": True, "model": self.ip_model, "image": IMAGE, "module": "ip-adapter_clip_h",
                "weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False, **kw}

    def ours(self, source: str, units: list[dict], **kw) -> dict:
        settings = {"enabled": True, "source": self.fixtures[source].model_name, "ipadapters": units, **kw}
        return {"alwayson_scripts": {SCRIPT: {"args": [settings]}}}

    def unit(self, **kw) -> dict:
        return {"model": self.ip_model, "image": IMAGE, "module": "ip-adapter_clip_h", **kw}


@pytest.fixture(scope="module")
def env(server_pool: ServerPool) -> Iterator[Env]:
    if controlnet_from_env() is None:
        pytest.skip("set DELTA_E2E_CONTROLNET to an sd-webui-controlnet checkout")
    units = ("ip_sd15", "ip_plus_sd15", "cn_sd15")
    server = server_pool.get(ServerConfig(extension=True, models=("sd15", "sdxl", "sd21v"), controlnet_extension=True,
                                          controlnets=units, clip_vision=("clip_h",)))
    assert server.client is not None
    fixtures = server_pool.fixtures(("sd15", "sdxl", "sd21v", *units, "clip_h"))
    names = server.client.get("/controlnet/model_list")["model_list"]
    listed = {}
    for key in units:
        [listed[key]] = [m for m in names if m.startswith(fixtures[key].model_name + " [")]
    yield Env(server.client, fixtures, listed)


@pytest.mark.parametrize("adapter", ["ip_sd15", "ip_plus_sd15"])
def test_target_equal_to_source_equals_the_extensions_own_unit(env: Env, adapter: str, record_property) -> None:
    env.use("sd15")
    plain = env.client.txt2img(PROMPT)
    env.plain.setdefault("sd15", plain.image)
    model = env.listed[adapter]
    own = env.client.txt2img(PROMPT, **env.own(model=model))
    ours = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit(model=model)]))
    # the unit's picture follows its reference image: identity is not two images saturated alike by the adapter
    other = env.client.txt2img(PROMPT, **env.own(model=model, image=base64.b64encode(inverted_png()).decode()))
    db_own, db_plain = psnr(ours.image, own.image), psnr(own.image, plain.image)
    db_reference = psnr(other.image, own.image)
    record_property("psnr_db_vs_own_unit", round(db_own, 2))
    record_property("psnr_db_own_unit_vs_plain", round(db_plain, 2))
    record_property("psnr_db_own_unit_other_reference", round(db_reference, 2))
    record_property("seconds_own", round(own.seconds, 1))
    record_property("seconds_delta", round(ours.seconds, 1))
    print(f"{adapter}: PSNR(delta, own IP-Adapter unit) = {db_own:.2f} dB, PSNR(own unit, plain) = {db_plain:.2f} dB, "
          f"PSNR(own unit, own unit with the inverted reference) = {db_reference:.2f} dB; "
          f"{ours.seconds:.1f}s vs {own.seconds:.1f}s")
    assert db_plain <= MOVED_BELOW_DB and db_reference < CHANGED_BELOW_DB
    assert db_own >= IDENTICAL_ABOVE_DB
    recorded = ours.param("Delta IP Adapters") or ""
    assert model in recorded and IMAGE[:40] not in ours.infotext


def test_the_users_own_unit_works_beside_ours(env: Env, record_property) -> None:
    """Both at once, with a weaker own unit: λ = 0 leaves the user's unit's image pixel for pixel; λ = 1 moves it."""
    env.use("sd15")
    own = env.own(weight=0.5)
    alone = env.client.txt2img(PROMPT, **own)
    off = env.client.txt2img(PROMPT, **_merged(own, env.ours("sd15", [env.unit()], strength=0.0)))
    both = env.client.txt2img(PROMPT, **_merged(own, env.ours("sd15", [env.unit()])))
    db = psnr(both.image, alone.image)
    record_property("psnr_db_both_vs_own_alone", round(db, 2))
    print(f"own unit (weight 0.5) + ours: PSNR(both, own alone) = {db:.2f} dB")
    assert same_pixels(off.image, alone.image)  # the PNGs differ in their infotext (Delta's keys), not the pixels
    assert db < CHANGED_BELOW_DB
    plain = env.plain.get("sd15") or env.client.txt2img(PROMPT).image
    assert env.client.txt2img(PROMPT).image == plain  # nothing of either unit stays


def test_with_a_lora_in_the_group_equals_the_extensions_unit_and_lora(env: Env, record_property) -> None:
    env.use("sd15")
    lora = env.fixtures["sd15"].lora()
    own = env.client.txt2img(f"{PROMPT} <lora:{lora}:1>", **env.own())
    ours = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit()], loras=[{"name": lora, "weight": 1}]))
    db = psnr(ours.image, own.image)
    record_property("psnr_db_vs_own_unit_and_lora", round(db, 2))
    print(f"unit + LoRA: PSNR(delta, own unit + <lora>) = {db:.2f} dB")
    assert db >= IDENTICAL_ABOVE_DB
    assert f"<lora:{lora}:1>" in (ours.param("Delta LoRAs") or "") and env.ip_model in ours.param("Delta IP Adapters")


def test_in_hires_fix(env: Env, record_property) -> None:
    """Both passes of hires fix (64 → 128, latent upscale) with the unit, against the extension's own unit."""
    env.use("sd15")
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
             "denoising_strength": 0.6}
    own = env.client.txt2img(PROMPT, **hires, **env.own())
    ours = env.client.txt2img(PROMPT, **hires, **env.ours("sd15", [env.unit()]))
    db = psnr(ours.image, own.image)
    record_property("psnr_db_hires_vs_own_unit", round(db, 2))
    record_property("seconds_own", round(own.seconds, 1))
    record_property("seconds_delta", round(ours.seconds, 1))
    print(f"hires: PSNR(delta, own unit) = {db:.2f} dB; {ours.seconds:.1f}s vs {own.seconds:.1f}s")
    assert db >= IDENTICAL_ABOVE_DB


# 4 steps at denoising 0.75 start img2img at the schedule's largest sigma (setup_img2img_steps: t_enc = 3 of 4), where
# the init latent is under a tenth of the noise: that image is 39.8 dB from txt2img's. At 0.5 the init image counts.
IMG2IMG_DENOISING = 0.5


def test_in_img2img_with_the_init_image_as_the_reference(env: Env, record_property) -> None:
    """img2img whose init image serves as the reference image (no unit image), against the extension's own unit,
    which does the same; its unit moves the img2img image, and the img2img image is not txt2img's."""
    env.use("sd15")
    init = reference_png(64)
    own = env.client.img2img(PROMPT, init, denoising_strength=IMG2IMG_DENOISING, **env.own(image=None))
    plain = env.client.img2img(PROMPT, init, denoising_strength=IMG2IMG_DENOISING)
    ours = env.client.img2img(PROMPT, init, denoising_strength=IMG2IMG_DENOISING,
                              **env.ours("sd15", [{"model": env.ip_model}]))
    txt2img = env.plain.get("sd15") or env.client.txt2img(PROMPT).image
    db, moved, from_txt2img = psnr(ours.image, own.image), psnr(own.image, plain.image), psnr(plain.image, txt2img)
    record_property("psnr_db_img2img_vs_own_unit", round(db, 2))
    record_property("psnr_db_img2img_own_unit_vs_plain", round(moved, 2))
    record_property("psnr_db_img2img_plain_vs_txt2img", round(from_txt2img, 2))
    print(f"img2img: PSNR(delta, own unit) = {db:.2f} dB (own unit vs plain {moved:.2f} dB; plain img2img vs "
          f"txt2img {from_txt2img:.2f} dB)")
    assert from_txt2img < CHANGED_BELOW_DB  # the init image moves the image: this is img2img, not txt2img again
    assert db >= IDENTICAL_ABOVE_DB and moved < CHANGED_BELOW_DB


def _merged(a: dict, b: dict) -> dict:
    return {"alwayson_scripts": {**a["alwayson_scripts"], **b["alwayson_scripts"]}}


@pytest.mark.parametrize("target", ["sdxl", "sd21v"])
def test_an_sd15_ipadapter_through_an_sd15_source_changes_other_families(env: Env, target: str,
                                                                          record_property) -> None:
    env.use(target)
    plain = env.client.txt2img(PROMPT)
    ours = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit()]))
    db = psnr(ours.image, plain.image)
    record_property(f"psnr_db_vs_plain_{target}", round(db, 2))
    print(f"{target} target: PSNR(delta with the SD1.5 IP-Adapter, plain) = {db:.2f} dB")
    assert db < CHANGED_BELOW_DB
    assert env.ip_model in (ours.param("Delta IP Adapters") or "") and IMAGE[:40] not in ours.infotext


@pytest.mark.parametrize(("source", "unit", "message"), [
    ("sd15", {"model": "ip-adapter_delta_e2e_sd1"}, "is not among sd-webui-controlnet's models"),
    ("sd15", {"image": base64.b64encode(b"not an image").decode()}, "is not a readable image"),
    ("sd15", {"image": ""}, "No reference image was given"),
    ("sd15", {"module": "ip-adapter_clip_g"}, "trained with the ViT-H image encoder"),
    ("sd15", {"model": "CN"}, "is not an IP-Adapter"),
    ("sdxl", {}, "is not made for the source"),
], ids=["unknown-model", "not-an-image", "no-image", "wrong-encoder", "a-controlnet", "other-family"])
def test_bad_units_are_422s_and_leave_nothing_behind(env: Env, source: str, unit: dict, message: str,
                                                     record_property) -> None:
    env.use("sd15")
    first = env.plain.get("sd15") or env.client.txt2img(PROMPT).image
    env.plain.setdefault("sd15", first)
    unit = {**env.unit(), **unit}
    if unit["model"] == "CN":
        unit["model"] = env.cn_model
    payload = {"prompt": PROMPT, "negative_prompt": "", "seed": 1, "steps": 4, "width": 64, "height": 64,
               "cfg_scale": 7.0, "sampler_name": "Euler", **env.ours(source, [unit])}
    r = env.client.session.post(env.client.base_url + "/sdapi/v1/txt2img", json=payload, timeout=600)
    detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else r.text
    record_property("status", r.status_code)
    record_property("detail", str(detail)[:300])
    print(f"{r.status_code}: {str(detail)[:300]}")
    assert r.status_code == 422 and message in str(detail)
    assert env.client.txt2img(PROMPT).image == first
    with pytest.raises(requests.HTTPError):
        env.client.post("/sdapi/v1/txt2img", payload)


def test_the_row_hooks_equal_the_extensions_hook_on_the_full_sd15_unet(record_property) -> None:
    """No server: ipadapter_probe.py under the WebUI's python compares our hooks with the extension's
    PlugableIPAdapter.hook on the full-size SD1.5 UNet, row by row (see that script)."""
    import json
    import subprocess
    from pathlib import Path

    from harness import A1111Install, ensure_fixtures

    install = A1111Install.from_env()
    if install is None or controlnet_from_env() is None:
        pytest.skip("set DELTA_E2E_A1111 and DELTA_E2E_CONTROLNET")
    fixtures = ensure_fixtures(install, ("sd15", "ip_sd15"))
    here = Path(__file__).resolve().parent
    out = subprocess.run([str(install.python), str(here / "ipadapter_probe.py"), str(here.parent.parent),
                          str(install.root), str(install.controlnet), str(fixtures["sd15"].checkpoint),
                          str(fixtures["ip_sd15"].controlnet)], check=True, capture_output=True, text=True,
                         timeout=900, cwd=install.root)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key, value in result.items():
        record_property(key, value)
    print(result)
    assert result["layers"] == 16 and result["base_row_identical"]
    assert result["rel_vs_extension"] < 1e-5 and result["rel_vs_plain"] > 0.05


# --- the panel -----------------------------------------------------------------------------------------------------


def _positional(**controls) -> list:
    """The panel's positional values (what the WebUI's UI sends), from the defaults with these controls set."""
    from lib_delta.args import POSITIONAL_FIELDS, DeltaSettings, to_positional

    values = to_positional(DeltaSettings())
    for name, value in controls.items():
        values[POSITIONAL_FIELDS.index(name)] = value
    return values


def test_script_info_lists_the_ipadapter_controls_and_the_panels_form_runs_them(env: Env) -> None:
    from lib_delta.args import POSITIONAL_FIELDS, DeltaSettings, to_positional

    env.use("sd15")
    ours = [s for s in env.client.get("/sdapi/v1/script-info") if s["name"] == SCRIPT.lower()]
    assert len(ours) == 2  # txt2img and img2img
    for s in ours:
        args = s["args"]
        assert len(args) == len(POSITIONAL_FIELDS) and [a["value"] for a in args] == to_positional(DeltaSettings())
        for g in ("", "group2_"):
            for k in (1, 2):
                model = args[POSITIONAL_FIELDS.index(f"{g}ipadapter{k}_model")]
                assert model["choices"][0] == "None", model
                assert {env.ip_model, env.listed["ip_plus_sd15"]} <= set(model["choices"]), model
                assert env.cn_model not in model["choices"], model  # the ControlNets have their own dropdown
                module = args[POSITIONAL_FIELDS.index(f"{g}ipadapter{k}_module")]
                assert module["value"] == "ip-adapter_clip_h" and "ip-adapter_clip_g" in module["choices"], module
        cn = args[POSITIONAL_FIELDS.index("controlnet1_model")]
        assert env.cn_model in cn["choices"] and env.ip_model not in cn["choices"], cn
    # the positional form, as the panel sends it (the image as base64 here), gives the settings object's image
    by_dict = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit(weight=0.8, guidance_end=0.75)]))
    values = _positional(enabled=True, source=env.fixtures["sd15"].model_name, ipadapter1_model=env.ip_model,
                         ipadapter1_image=IMAGE, ipadapter1_weight=0.8, ipadapter1_guidance_end=0.75)
    by_position = env.client.txt2img(PROMPT, alwayson_scripts={SCRIPT: {"args": values}})
    assert by_position.image == by_dict.image and by_position.infotext == by_dict.infotext


def test_xyz_grid_over_the_ipadapter_weight(env: Env, record_property) -> None:
    """The `[Delta] IP-Adapter weight` axis: each cell is the single generation with that weight, weight 0 none."""
    env.use("sd15")
    grid_script = next(s for s in env.client.get("/sdapi/v1/script-info")
                       if s["name"] == "x/y/z plot" and not s["is_img2img"])
    weight = grid_script["args"][0]["choices"].index("[Delta] IP-Adapter weight")
    # x: weight 0, 1; no y, no z; draw legend, include the cells' own images; csv mode off
    script_args = [weight, "0, 1", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    grid = env.client.txt2img(PROMPT, script_name="x/y/z plot", script_args=script_args,
                              **env.ours("sd15", [env.unit(weight=0.5)]))
    record_property("seconds", round(grid.seconds, 1))
    assert len(grid.images) == 3  # the grid, then one image per cell
    cells = grid.images[1:]
    units = [json.loads(Generation([], {"infotexts": [t]}, 0).param("Delta IP Adapters"))[0]
             for t in grid.info["infotexts"][1:]]
    assert [u["weight"] for u in units] == [0, 1]
    for cell, w in zip(cells, (0.0, 1.0), strict=True):
        single = env.client.txt2img(PROMPT, **env.ours("sd15", [env.unit(weight=w)]))
        assert same_pixels(cell, single.image), w  # each cell is the single generation with its weight
    plain = env.plain.get("sd15") or env.client.txt2img(PROMPT).image
    db = psnr(cells[1], plain)
    record_property("psnr_db_weight1_cell_vs_plain", round(db, 2))
    assert same_pixels(cells[0], plain) and db < CHANGED_BELOW_DB  # weight 0: no delta at all


def test_ipadapter_units_in_the_panel_in_a_browser(env: Env, chromium: str, record_property, tmp_path) -> None:
    """txt2img's panel in headless Chromium: a unit set from the UI (model from the list that follows the source, an
    uploaded reference image, the encoder left at its default) makes the picture the API makes with the same unit;
    pasting the infotext back restores the unit and says that its image must be given again; img2img has the units
    too."""
    import tempfile

    from harness import CHROMIUM_FLAGS, REPO_ROOT
    from playwright.sync_api import expect, sync_playwright

    env.use("sd15")
    api = env.client
    source_title = next(m["title"] for m in api.get("/sdapi/v1/sd-models")
                        if m["model_name"] == env.fixtures["sd15"].model_name)
    picture = tmp_path / "reference.png"
    picture.write_bytes(reference_png())
    p = "script_txt2img_delta_sampling_"
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1600})
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
        page.locator(f"#{p}ipadapters .label-wrap").first.click()
        expect(page.locator(f"#{p}ipadapter1_model")).to_be_visible()
        assert page.locator(f"#{p}ipadapters_missing").count() == 0  # the extension is there
        page.wait_for_timeout(1000)  # the source's change event refills the model lists
        listed = pick_from(f"{p}ipadapter1_model", env.ip_model)
        assert listed[0] == "None" and env.ip_model in listed and env.cn_model not in listed, listed
        page.locator(f"#{p}ipadapter1_image input[type=file]").set_input_files(str(picture))
        page.wait_for_timeout(1000)
        expect(page.locator(f"#{p}ipadapter1_module input").first).to_have_value("ip-adapter_clip_h")
        unit_fields = ["model", "image", "module", "weight", "guidance_start", "guidance_end"]
        untitled = [f for f in unit_fields if not page.locator(f"#{p}ipadapter1_{f}").get_attribute("title")]
        assert not untitled, untitled
        shot = REPO_ROOT / "docs" / "images" / "ipadapter-units.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.locator(f"#{p}ipadapters").screenshot(path=str(shot))

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
        expect(info).to_contain_text("Delta IP Adapters", timeout=900_000)
        text = (info.text_content() or "").strip()
        record_property("ui_infotext", text)
        [unit] = json.loads(Generation([], {"infotexts": [text]}, 0).param("Delta IP Adapters"))
        assert (unit["model"], unit["module"], unit["weight"]) == (env.ip_model, "ip-adapter_clip_h", 1), text
        src = page.locator("#txt2img_gallery img").first.get_attribute("src") or ""
        ui_image = api.session.get(src if src.startswith("http") else api.base_url + "/" + src.lstrip("/"),
                                   timeout=60)
        ui_image.raise_for_status()
        from PIL import Image

        infotext = Image.open(io.BytesIO(ui_image.content)).info["parameters"]
        # the API, given that infotext and the same unit with its image, makes the same picture
        data = api.post("/sdapi/v1/txt2img", {"infotext": infotext, **env.ours("sd15", [env.unit()])})
        again = base64.b64decode(data["images"][0])
        assert same_pixels(again, ui_image.content), infotext

        # pasting the infotext back restores the unit and says that its image must be given again (the note: an
        # HTML block, whose content gradio 3 gives the same id, hence .first)
        phase[0] = "paste"
        pick(f"{p}ipadapter1_module", "ip-adapter_clip_g")
        page.locator("#txt2img_prompt textarea").fill(infotext)
        page.locator("#txt2img_tools #paste").click()
        expect(page.locator(f"#{p}ipadapter1_note").first).to_contain_text("was pasted without its image")
        expect(page.locator(f"#{p}ipadapter1_module input").first).to_have_value("ip-adapter_clip_h")
        expect(page.locator(f"#{p}ipadapter1_model input").first).to_have_value(env.ip_model)
        expect(page.locator(f"#{p}ipadapter2_note").first).to_have_text("")  # no second unit was pasted
        other = tmp_path / "other.png"  # another image: the control still holds the first, whose upload changes nothing
        other.write_bytes(reference_png(80))
        page.locator(f"#{p}ipadapter1_image input[type=file]").set_input_files(str(other))
        expect(page.locator(f"#{p}ipadapter1_note").first).to_have_text("")  # a new image answers the note

        phase[0] = "img2img"
        # gradio 3 gives the tab's content the id, not its button: the button by its text
        page.locator("#tabs > .tab-nav button").filter(has_text=re.compile(r"^\s*img2img\s*$")).first.click()
        q = "script_img2img_delta_sampling_"
        page.locator(f"#{q}enabled .label-wrap").first.click()
        page.locator(f"#{q}ipadapters .label-wrap").first.click()
        expect(page.locator(f"#{q}ipadapter1_model")).to_be_visible()
        expect(page.locator(f"#{q}ipadapter1_image")).to_be_visible()
        record_property("webui_own_page_errors", len(webui_own_errors))
        assert not errors, errors
        ctx.close()
