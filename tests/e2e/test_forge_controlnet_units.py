"""ControlNet units on the source's adapted rows in a real Forge 2 and a real Forge Neo, with their built-in ControlNet.

With the SD1.5 ControlNet fixture `cn_sd15` (tests/e2e/fixtures.py) on the SD1.5 fixture checkpoint, 64x64, 4 Euler
steps, cfg mode, on each host in turn (one server at a time):

- the identity: target == source, one unit (preprocessor "none", and "canny"), λ = 1 gives the image of the host's own
  ControlNet unit on that checkpoint (>= IDENTICAL_ABOVE_DB), and that unit moves the image (<= MOVED_BELOW_DB); the
  same with the fixture LoRA in the group against the host's unit + `<lora:L:1>`, in hires fix (canny, softened there
  as the host does), and in img2img with the init image as the control image;
- across families: the SD1.5 ControlNet through the SD1.5 source changes the reduced SDXL target's image, and the
  infotext records the unit (never its image) and reads back;
- bad units (unknown model, not an image, a huge image, no image, a preprocessor that needs a download, an SD1.5
  ControlNet on an SDXL source) are 422s naming the problem, and the next plain image is byte-identical to the first.

Needs DELTA_E2E_FORGE and/or DELTA_E2E_NEO (see forge_harness.py, neo_harness.py); PSNRs go to the JUnit properties.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests
from forge_harness import ForgeServerPool
from forge_harness import open_pool as open_forge
from harness import ModelFixture, ServerConfig, WebUIClient, control_image, controlnet_units, psnr
from neo_harness import open_pool as open_neo

SCRIPT = "Delta Sampling"
PROMPT = "a photo of a cat sitting on a red chair"
MODELS = ("sd15", "sdxl", "cn_sd15")
IDENTICAL_ABOVE_DB = 35.0
MOVED_BELOW_DB = 25.0
CHANGED_BELOW_DB = 35.0
IMAGE = base64.b64encode(control_image()).decode()
INIT = control_image()
HIRES = {"forge": {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
                   "denoising_strength": 0.6, "hr_additional_modules": ["Use same choices"]},
         # Neo has no latent upscaler: offline its one upscaler is "None", a PIL resize of the decoded image
         "neo": {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "None", "hr_second_pass_steps": 2,
                 "denoising_strength": 0.6, "hr_additional_modules": ["Use same choices"]}}


@dataclass
class Host:
    name: str
    client: WebUIClient
    fixtures: dict[str, ModelFixture]
    cn_model: str  # the fixture as the host lists it
    plain: dict[str, bytes] = field(default_factory=dict)

    def use(self, key: str) -> None:
        self.client.set_model(self.fixtures[key].model_name)

    def own(self, module: str, **kw) -> dict:
        """The host's own unit (Forge's preprocessor "none" is "None")."""
        return controlnet_units({"enabled": True, "model": self.cn_model, "image": IMAGE,
                                 "module": "None" if module == "none" else module, "weight": 1.0,
                                 "guidance_start": 0.0, "guidance_end": 1.0, "resize_mode": "Crop and Resize",
                                 "control_mode": "Balanced", "pixel_perfect": False, **kw})

    def ours(self, source: str, units: list[dict], **kw) -> dict:
        settings = {"enabled": True, "source": self.fixtures[source].model_name, "controlnets": units, **kw}
        return {"alwayson_scripts": {SCRIPT: {"args": [settings]}}}

    def unit(self, module: str, **kw) -> dict:
        return {"model": self.cn_model, "image": IMAGE, "module": module, **kw}


def _host(name: str, pool: ForgeServerPool) -> Host:
    server = pool.get(ServerConfig(extension=True, models=("sd15", "sdxl"), controlnets=("cn_sd15",)))
    assert server.client is not None
    fixtures = pool.fixtures(MODELS)
    stem = fixtures["cn_sd15"].model_name
    listed = server.client.get("/controlnet/model_list")["model_list"]
    named = [m for m in listed if m == stem or m.startswith(stem + " [")]
    assert len(named) == 1, listed
    return Host(name, server.client, fixtures, named[0])


@pytest.fixture(scope="module", params=["forge", "neo"])
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    """Each host's server in turn (every test for one host, then the next), the fixture ControlNet in place."""
    pools = (open_forge if request.param == "forge" else open_neo)(MODELS)
    pool = next(pools)  # skips when the host's variable is unset or a fixture is neither cached nor buildable
    try:
        yield _host(request.param, pool)
    finally:
        pools.close()


def _record(record_property, host: Host, **figures: float) -> None:
    for key, value in figures.items():
        record_property(f"{host.name}_{key}", round(value, 2))


@pytest.mark.parametrize("module", ["none", "canny"])
def test_target_equal_to_source_equals_the_hosts_own_unit(host: Host, module: str, record_property) -> None:
    host.use("sd15")
    plain = host.client.txt2img(PROMPT)
    host.plain.setdefault("sd15", plain.image)
    own = host.client.txt2img(PROMPT, **host.own(module))
    ours = host.client.txt2img(PROMPT, **host.ours("sd15", [host.unit(module)]))
    db_own, db_plain = psnr(ours.image, own.image), psnr(own.image, plain.image)
    _record(record_property, host, psnr_db_vs_own_unit=db_own, psnr_db_own_unit_vs_plain=db_plain,
            seconds_own=own.seconds, seconds_delta=ours.seconds)
    print(f"{host.name} {module}: PSNR(delta, own unit) = {db_own:.2f} dB, PSNR(own unit, plain) = {db_plain:.2f} dB; "
          f"{ours.seconds:.1f}s vs {own.seconds:.1f}s")
    assert db_plain <= MOVED_BELOW_DB
    assert db_own >= IDENTICAL_ABOVE_DB
    recorded = ours.param("Delta ControlNets") or ""
    assert host.cn_model in recorded and IMAGE[:40] not in ours.infotext


def test_with_a_lora_in_the_group_equals_the_hosts_unit_and_lora(host: Host, record_property) -> None:
    host.use("sd15")
    lora = host.fixtures["sd15"].lora()
    own = host.client.txt2img(f"{PROMPT} <lora:{lora}:1>", **host.own("none"))
    ours = host.client.txt2img(PROMPT, **host.ours("sd15", [host.unit("none")], loras=[{"name": lora, "weight": 1}]))
    db = psnr(ours.image, own.image)
    _record(record_property, host, psnr_db_vs_own_unit_and_lora=db)
    print(f"{host.name} unit + LoRA: PSNR(delta, own unit + <lora>) = {db:.2f} dB")
    assert db >= IDENTICAL_ABOVE_DB


# 4 steps at denoising 0.75 start img2img at the schedule's largest sigma (setup_img2img_steps: t_enc = 3 of 4), where
# the init latent is under a tenth of the noise and img2img repeats txt2img. At 0.5 (t_enc = 2) the init image counts.
IMG2IMG_DENOISING = 0.5


def test_in_hires_fix_and_img2img_too(host: Host, record_property) -> None:
    """Hires fix (the hint at the hires size, canny softened there as the host does) and img2img whose init image
    serves as the control image (no unit image), each against the host's own unit; the img2img image is not
    txt2img's."""
    host.use("sd15")
    hires = HIRES[host.name]
    own = host.client.txt2img(PROMPT, **hires, **host.own("canny"))
    ours = host.client.txt2img(PROMPT, **hires, **host.ours("sd15", [host.unit("canny")]))
    db_hires = psnr(ours.image, own.image)
    i2i = {"denoising_strength": IMG2IMG_DENOISING}
    own_i2i = host.client.img2img(PROMPT, INIT, **i2i, **host.own("none", image=None))
    plain_i2i = host.client.img2img(PROMPT, INIT, **i2i)
    ours_i2i = host.client.img2img(PROMPT, INIT, **i2i, **host.ours("sd15", [{"model": host.cn_model}]))
    txt2img = host.plain.get("sd15") or host.client.txt2img(PROMPT).image
    db_i2i, db_i2i_moved = psnr(ours_i2i.image, own_i2i.image), psnr(own_i2i.image, plain_i2i.image)
    from_txt2img = psnr(plain_i2i.image, txt2img)
    _record(record_property, host, psnr_db_hires_vs_own_unit=db_hires, psnr_db_img2img_vs_own_unit=db_i2i,
            psnr_db_img2img_own_unit_vs_plain=db_i2i_moved, psnr_db_img2img_plain_vs_txt2img=from_txt2img)
    print(f"{host.name} hires: PSNR(delta, own unit) = {db_hires:.2f} dB; img2img at denoising {IMG2IMG_DENOISING}: "
          f"{db_i2i:.2f} dB (own unit vs plain {db_i2i_moved:.2f} dB; plain img2img vs txt2img {from_txt2img:.2f} dB)")
    assert from_txt2img < CHANGED_BELOW_DB  # the init image moves the image: this is img2img, not txt2img again
    assert db_hires >= IDENTICAL_ABOVE_DB and db_i2i >= IDENTICAL_ABOVE_DB and db_i2i_moved < CHANGED_BELOW_DB


def test_an_sd15_controlnet_through_an_sd15_source_changes_an_sdxl_image(host: Host, record_property) -> None:
    host.use("sdxl")
    plain = host.client.txt2img(PROMPT)
    ours = host.client.txt2img(PROMPT, **host.ours("sd15", [host.unit("canny", weight=0.8)]))
    db = psnr(ours.image, plain.image)
    _record(record_property, host, psnr_db_vs_plain_sdxl=db)
    print(f"{host.name} SDXL target: PSNR(delta with the SD1.5 ControlNet, plain) = {db:.2f} dB")
    assert db < CHANGED_BELOW_DB
    import numpy as np
    from harness import decode_image

    assert np.isfinite(decode_image(ours.image)).all() and decode_image(ours.image).std() > 1
    recorded = ours.param("Delta ControlNets") or ""
    assert host.cn_model in recorded and '"weight":0.8' in recorded.replace(" ", "").replace("\\", "")


def _huge_png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4100, 8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(("source", "unit", "message"), [
    ("sd15", {"image": IMAGE, "model": "delta_e2e_cn_sd1"}, "is not among Forge's ControlNet models"),
    ("sd15", {"image": base64.b64encode(b"not an image").decode()}, "is not a readable image"),
    ("sd15", {"image": _huge_png()}, "at most 4096 pixels a side"),
    ("sd15", {}, "No control image was given"),
    ("sd15", {"image": IMAGE, "module": "depth_midas"}, "is not supported"),
    ("sdxl", {"image": IMAGE}, "is not made for the source"),
], ids=["unknown-model", "not-an-image", "huge-image", "no-image", "download-preprocessor", "other-family"])
def test_bad_units_are_422s_and_leave_nothing_behind(host: Host, source: str, unit: dict, message: str,
                                                     record_property) -> None:
    host.use("sd15")
    first = host.plain.get("sd15") or host.client.txt2img(PROMPT).image
    host.plain.setdefault("sd15", first)
    payload = {"prompt": PROMPT, "negative_prompt": "", "seed": 1, "steps": 4, "width": 64, "height": 64,
               "cfg_scale": 7.0, "sampler_name": "Euler", **host.ours(source, [{"model": host.cn_model, **unit}])}
    r = host.client.session.post(host.client.base_url + "/sdapi/v1/txt2img", json=payload, timeout=600)
    detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else r.text
    record_property(f"{host.name}_status", r.status_code)
    record_property(f"{host.name}_detail", str(detail)[:300])
    print(f"{host.name} {r.status_code}: {str(detail)[:300]}")
    assert r.status_code == 422 and message in str(detail)
    assert host.client.txt2img(PROMPT).image == first
    with pytest.raises(requests.HTTPError):
        host.client.post("/sdapi/v1/txt2img", payload)
