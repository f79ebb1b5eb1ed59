"""An SD1.5 ControlNet unit through the SD1.5 source on Forge 2's SD2.1-v and SD3 targets (Neo loads neither).

- SD2.1-v (v-prediction): the unit changes the target's image, which stays finite, the infotext records the unit
  (never its image), and the infotext with the unit given again makes the same pixels;
- SD3 (16 latent channels): a 4-channel source cannot steer it, unit or not: a 422 naming both models, and the next
  plain image has the bytes of the one before.

Its own server (the SD1.5 source, both targets, the `cn_sd15` fixture in models/ControlNet). Needs DELTA_E2E_FORGE.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from forge_harness import ForgeServerPool
from forge_harness import open_pool as open_forge
from harness import ModelFixture, ServerConfig, WebUIClient, control_image, decode_image, psnr, same_pixels

SCRIPT = "Delta Sampling"
PROMPT = "a photo of a cat sitting on a red chair"
MODELS = ("sd15", "sd21v", "sd3", "cn_sd15")
CHANGED_BELOW_DB = 35.0
IMAGE = base64.b64encode(control_image()).decode()
SD3 = {"scheduler": "Simple"}  # with "Automatic" Forge's SD3 sampling returns NaN latents (see test_forge_api.py)


@pytest.fixture(scope="module")
def forge() -> Iterator[tuple[WebUIClient, dict[str, ModelFixture], str]]:
    pools = open_forge(MODELS)
    pool: ForgeServerPool = next(pools)
    try:
        server = pool.get(ServerConfig(extension=True, models=("sd15", "sd21v", "sd3"), controlnets=("cn_sd15",)))
        assert server.client is not None
        fixtures = pool.fixtures(MODELS)
        stem = fixtures["cn_sd15"].model_name
        listed = server.client.get("/controlnet/model_list")["model_list"]
        [cn_model] = [m for m in listed if m == stem or m.startswith(stem + " [")]
        yield server.client, fixtures, cn_model
    finally:
        pools.close()


def _ours(fixtures: dict[str, ModelFixture], units: list[dict]) -> dict:
    settings = {"enabled": True, "source": fixtures["sd15"].model_name, "controlnets": units}
    return {"alwayson_scripts": {SCRIPT: {"args": [settings]}}}


def test_an_sd15_unit_through_an_sd15_source_changes_an_sd21v_image(forge, record_property) -> None:
    client, fixtures, cn_model = forge
    client.set_model(fixtures["sd21v"].model_name)
    plain = client.txt2img(PROMPT)
    unit = {"model": cn_model, "image": IMAGE, "module": "canny", "weight": 0.8, "guidance_end": 0.75}
    ours = client.txt2img(PROMPT, **_ours(fixtures, [unit]))
    db = psnr(ours.image, plain.image)
    record_property("forge_psnr_db_vs_plain_sd21v", round(db, 2))
    print(f"Forge SD2.1-v target: PSNR(delta with the SD1.5 ControlNet, plain) = {db:.2f} dB")
    assert db < CHANGED_BELOW_DB
    pixels = decode_image(ours.image)
    assert np.isfinite(pixels).all() and pixels.std() > 1
    [recorded] = json.loads(ours.param("Delta ControlNets") or "[]")
    assert (recorded["model"], recorded["module"], recorded["weight"], recorded["guidance_end"]) == (
        cn_model, "canny", 0.8, 0.75), ours.infotext
    assert IMAGE[:40] not in ours.infotext
    # styles=[]: Forge's own infotext handling fails without it (see test_forge_api.py's infotext test)
    again = client.txt2img(PROMPT, infotext=ours.infotext, styles=[], **_ours(fixtures, [unit]))
    assert same_pixels(again.image, ours.image), ours.infotext


def test_an_sd15_unit_on_an_sd3_target_is_refused_naming_both_models(forge, record_property) -> None:
    client, fixtures, cn_model = forge
    client.set_model(fixtures["sd3"].model_name)
    plain = client.txt2img(PROMPT, **SD3)
    with pytest.raises(requests.HTTPError) as err:
        client.txt2img(PROMPT, **SD3, **_ours(fixtures, [{"model": cn_model, "image": IMAGE, "module": "canny"}]))
    response = err.value.response
    detail = response.json()["detail"]
    record_property("forge_status", response.status_code)
    record_property("forge_detail", str(detail)[:300])
    assert response.status_code == 422, err.value
    assert f"'{fixtures['sd15'].model_name}' (SD1, 4 latent channels)" in detail, detail
    assert f"'{fixtures['sd3'].model_name}' (SD3, 16 latent channels)" in detail, detail
    assert client.txt2img(PROMPT, **SD3).image == plain.image
