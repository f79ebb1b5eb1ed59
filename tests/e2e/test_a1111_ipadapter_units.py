"""IP-Adapter units on the source's adapted rows in a real AUTOMATIC1111 v1.10.1 with sd-webui-controlnet.

With the SD1.5 IP-Adapter fixture `ip_sd15` and the full-size ViT-H CLIP-vision fixture `clip_h` (linked where the
extension's `ip-adapter_clip_h` preprocessor looks, so nothing downloads; tests/e2e/fixtures.py) on the SD1.5
fixture checkpoint, 64x64, 4 Euler steps, cfg mode:

- the identity: target == source, one unit, λ = 1 gives the image of the extension's own IP-Adapter unit on that
  checkpoint (>= IDENTICAL_ABOVE_DB), and that unit moves the image (<= MOVED_BELOW_DB);
- both at once: the user's own IP-Adapter unit on the active model beside ours; with λ = 0 the image is the user's
  unit's alone, pixel for pixel, and with λ = 1 both act;
- across families: the SD1.5 IP-Adapter through the SD1.5 source changes an SDXL and an SD2.1-v target's image, and
  the infotext records the unit (never its image);
- bad units (unknown model, not an image, no image, an encoder that does not match the adapter, a ControlNet given
  as an IP-Adapter, an SD1.5 IP-Adapter on an SDXL source) are 422s naming the problem, and the next plain image is
  byte-identical to the first.

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
    db_own, db_plain = psnr(ours.image, own.image), psnr(own.image, plain.image)
    record_property("psnr_db_vs_own_unit", round(db_own, 2))
    record_property("psnr_db_own_unit_vs_plain", round(db_plain, 2))
    record_property("seconds_own", round(own.seconds, 1))
    record_property("seconds_delta", round(ours.seconds, 1))
    print(f"{adapter}: PSNR(delta, own IP-Adapter unit) = {db_own:.2f} dB, PSNR(own unit, plain) = {db_plain:.2f} dB; "
          f"{ours.seconds:.1f}s vs {own.seconds:.1f}s")
    assert db_plain <= MOVED_BELOW_DB
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
