"""A source checkpoint of the diffusion model alone in a real Forge 2 and Forge Neo (see forge_harness.py and
neo_harness.py for the variables).

Flux and Chroma files, GGUF files and Forge Neo's newer families often hold the diffusion model alone; Forge builds
such a model with the text encoders and VAE chosen in 'VAE / Text Encoder', and so does Delta Sampling for its
source. Forge sizes every Flux at 12 B parameters, so the case is shown with the SD1.5 fixture split the same way:
its UNet alone in models/Stable-diffusion, its VAE in models/VAE, its CLIP-L in models/text_encoder.

- without modules chosen, that source is refused with the way out (HTTP 422), and the next plain image is unchanged;
- with them chosen, it is the source: as its own source with its LoRA at λ = 1 it matches Forge's own
  ``<lora:L:1>``, and the plain image after it is Forge's own again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from forge_harness import ForgeInstall, ForgeServer, ForgeServerPool, fixtures_dir, forge_split, serve
from harness import ModelFixture, ServerConfig, WebUIClient, psnr
from neo_harness import NeoInstall, NeoServerPool

PROMPT = "a photo of a cat sitting on a red chair"
MODELS = ("sd15",)
CLOSE_DB = 35.0  # as in test_forge_api.py: the fixture LoRA moves the image by about 20 dB
# host -> its install, its pool (the fixtures as it reads them), the variable that names it and what that must be
HOSTS = {"forge": (ForgeInstall, ForgeServerPool, "DELTA_E2E_FORGE", "a Forge 2 install"),
         "neo": (NeoInstall, NeoServerPool, "DELTA_E2E_NEO", "a Forge Neo WebUI folder")}


@pytest.fixture(scope="module", params=list(HOSTS))
def forge(request) -> Iterator[tuple[WebUIClient, ModelFixture, ModelFixture]]:
    """The WebUI, the whole SD1.5 fixture (active) and its split twin (the source, its modules in their folders)."""
    kind, pool_class, variable, what = HOSTS[request.param]
    pools = serve(kind.from_env(), pool_class, MODELS, variable, what)  # the skips and failures of every module
    pool = next(pools)
    try:
        sd15 = pool.fixtures(MODELS)["sd15"]
        split = forge_split(sd15, fixtures_dir(pool.install) / "forge-sd15-split")
        # the UNet alone beside the whole checkpoint, its VAE and CLIP-L in the module folders
        files = {split.manifest["files"]["checkpoint"]: "Stable-diffusion", **split.manifest["modules"]}
        modules = tuple((str(split.directory / name), folder) for name, folder in files.items())
        with ForgeServer(pool.install, ServerConfig(extension=True, models=MODELS, modules=modules),
                         pool.fixtures(MODELS)) as server:
            assert server.client is not None
            server.client.set_model(sd15.model_name)
            yield server.client, sd15, split
    finally:
        pools.close()


def delta(source: str, lora: str) -> dict:
    return {"alwayson_scripts": {"Delta Sampling": {"args": [dict(enabled=True, source=source, loras=lora)]}}}


def test_without_modules_chosen_the_source_is_refused_with_the_way_out(forge):
    client, sd15, split = forge
    plain = client.txt2img(PROMPT)
    with pytest.raises(requests.HTTPError) as err:
        client.txt2img(PROMPT, **delta(split.model_name, f"<lora:{sd15.lora()}:1>"))
    detail = err.value.response.json()["detail"]
    assert err.value.response.status_code == 422, detail
    assert f"'{split.checkpoint.name}' holds the diffusion model alone" in detail and "'VAE / Text Encoder'" in detail
    assert client.txt2img(PROMPT).image == plain.image


def test_with_modules_chosen_it_is_the_source_and_matches_forges_own_lora(forge, record_property):
    client, sd15, split = forge
    client.set_options(forge_additional_modules=[str(split.directory / name) for name in split.manifest["modules"]])
    try:
        chosen = sorted(Path(m).name for m in client.options()["forge_additional_modules"])  # Neo sorts them
        assert chosen == sorted(split.manifest["modules"]), chosen
        lora = f"<lora:{sd15.lora()}:1>"
        plain = client.txt2img(PROMPT)
        own = client.txt2img(f"{PROMPT} {lora}")
        got = client.txt2img(PROMPT, **delta(split.model_name, lora))
        moved, db = psnr(own.image, plain.image), psnr(got.image, own.image)
        record_property("psnr_lora_moves_db", round(moved, 2))
        record_property("psnr_delta_vs_forge_lora_db", round(db, 2))
        print(f"PSNR(plain, Forge's own LoRA) = {moved:.2f} dB; PSNR(delta from the UNet alone, Forge's own LoRA) = "
              f"{db:.2f} dB")
        assert moved < CLOSE_DB, "the LoRA must move the image for this to mean anything"
        assert db > CLOSE_DB
        assert got.param("Delta source") == split.model_name
        assert client.txt2img(PROMPT).image == plain.image
    finally:
        client.set_options(forge_additional_modules=[])
