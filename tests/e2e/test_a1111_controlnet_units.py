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
from collections.abc import Iterator

import pytest
import requests
from harness import (
    ModelFixture,
    ServerConfig,
    ServerPool,
    WebUIClient,
    control_image,
    controlnet_from_env,
    controlnet_units,
    psnr,
)

SCRIPT = "Delta Sampling"
PROMPT = "a photo of a cat sitting on a red chair"
IDENTICAL_ABOVE_DB = 35.0
MOVED_BELOW_DB = 25.0
CHANGED_BELOW_DB = 35.0
IMAGE = base64.b64encode(control_image()).decode()


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
    server = server_pool.get(ServerConfig(extension=True, models=("sd15", "sdxl"), controlnet_extension=True,
                                          controlnets=("cn_sd15",)))
    assert server.client is not None
    fixtures = server_pool.fixtures(("sd15", "sdxl", "cn_sd15"))
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


def test_in_hires_fix_and_img2img_too(env: Env, record_property) -> None:
    """Hires fix (the hint at the hires size, canny softened there as the extension does) and img2img whose init
    image serves as the control image (no unit image), each against the extension's own unit."""
    env.use("sd15")
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
             "denoising_strength": 0.6}
    own = env.client.txt2img(PROMPT, **hires, **env.own("canny"))
    ours = env.client.txt2img(PROMPT, **hires, **env.ours("sd15", [env.unit("canny")]))
    db_hires = psnr(ours.image, own.image)
    init = control_image()
    own_i2i = env.client.img2img(PROMPT, init, **env.own("none", image=None))
    plain_i2i = env.client.img2img(PROMPT, init)
    ours_i2i = env.client.img2img(PROMPT, init, **env.ours("sd15", [{"model": env.cn_model}]))
    db_i2i, db_i2i_moved = psnr(ours_i2i.image, own_i2i.image), psnr(own_i2i.image, plain_i2i.image)
    record_property("psnr_db_hires_vs_own_unit", round(db_hires, 2))
    record_property("psnr_db_img2img_vs_own_unit", round(db_i2i, 2))
    record_property("psnr_db_img2img_own_unit_vs_plain", round(db_i2i_moved, 2))
    print(f"hires: PSNR(delta, own unit) = {db_hires:.2f} dB; img2img: {db_i2i:.2f} dB (own unit vs plain "
          f"{db_i2i_moved:.2f} dB)")
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
