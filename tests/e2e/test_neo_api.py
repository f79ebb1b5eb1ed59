"""Delta Sampling in a real Forge Neo, through its API (see neo_harness.py for the variables).

The Forge 2 suite's tests (test_forge_api.py) run here again, against Neo: disabled and λ = 0 identical to Neo
without the extension; source == target with the fixture LoRA (txt2img, hires fix, img2img, inpainting), its LoHa
and an adapted prompt against Neo's own; the infotext round trip; the X/Y/Z plot over λ; bad inputs as HTTP errors
with the next plain image unchanged; base-first; two groups. What Neo loads differently has tests of its own: an
SD1.5 source on an SDXL target and on an SDXL v-prediction target (Neo reads the ``v_pred`` key), and base-first on
the latter. SD2.x and SD3 cannot run here (Neo does not load them).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_forge_api
from harness import Generation, ModelFixture, ServerConfig, WebUIClient, decode_image, psnr
from neo_harness import LOW_MEMORY, NeoServerPool, open_pool
from test_forge_api import (  # noqa: F401  (collected here again, on Neo)
    IMG2IMG,
    INIT,
    INPAINT,
    MODELS,
    PROMPT,
    _native_round_trip,
    _steers,
    test_a_source_device_that_does_not_exist_is_refused_by_name,
    test_bad_inputs_are_http_errors_and_the_next_plain_image_is_unchanged,
    test_base_first_with_the_target_as_its_own_source_is_the_targets_image,
    test_cond_mode_separate_trajectory_and_the_preview_strip,
    test_disabled_and_zero_strength_are_identical_to_forge_without_the_extension,
    test_grids_the_extension_refuses_are_422s_before_they_start,
    test_img2img_source_equal_to_target_with_its_lora_matches_forges_own_lora,
    test_inpainting_keeps_the_unmasked_region_forges_own,
    test_lycoris_loha_on_the_source_matches_forges_own_loha,
    test_sd15_as_its_own_source_with_an_adapted_prompt_matches_forges_own_prompt,
    test_skipped_cfg_steps_run_the_source_unguided_as_in_automatic1111,
    test_source_equal_to_target_with_its_lora_matches_forges_own_lora,
    test_the_infotext_sent_back_reproduces_the_delta_image,
    test_two_groups_at_half_strength_equal_one_group_at_full_strength,
    test_xyz_plot_over_lambda_gives_the_single_generations,
)

VPRED_MODELS = ("sd15", "sdxl", "sdxl_vpred")
# Neo has no latent upscalers (modules/shared.py:48, latent_upscale_modes = {}): its hires fix upscales the decoded
# image. Offline, with no ESRGAN model, its one upscaler is "None", a PIL Lanczos resize (modules/images.py:277-279).
NEO_HIRES = {**test_forge_api.HIRES, "hr_upscaler": "None"}
# Neo's X/Y/Z script takes a row count (0: automatic) before the margin (scripts/xyz_grid.py:710, 804-806)
NEO_XYZ_OPTIONS = [*test_forge_api.XYZ_OPTIONS[:7], 0, *test_forge_api.XYZ_OPTIONS[7:]]
forge, sd15 = test_forge_api.forge, test_forge_api.sd15  # the fixtures, on Neo's pool


@pytest.fixture(scope="module", autouse=True)
def neo_requests() -> Iterator[None]:
    """The Forge tests' hires and X/Y/Z settings as Neo takes them, for this module only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_forge_api, "HIRES", NEO_HIRES)
        patch.setattr(test_forge_api, "XYZ_OPTIONS", NEO_XYZ_OPTIONS)
        yield


@pytest.fixture(scope="module")
def pool(neo_requests: None) -> Iterator[NeoServerPool]:
    yield from open_pool(MODELS)


@pytest.fixture(scope="module")
def plain(pool: NeoServerPool, record_testsuite_property) -> dict[str, Generation]:
    """Reference images from Neo without the extension, as test_forge_api's ``plain`` makes them, but for one.

    Neo's own inpainting depends on the request before it: on a fresh server, an inpainting request made right after
    another gives an image one 8-bit level apart (in one channel of one pixel here) from the same request made after
    any other, with or without the extension. The tests follow each inpainting with another, so the reference is
    the second of two in a row."""
    server = pool.get(ServerConfig(extension=False, models=MODELS))
    client = server.client
    assert client is not None
    client.set_model(pool.fixtures(MODELS)["sd15"].model_name)
    refs = {"sd15": client.txt2img(PROMPT), "sd15_hires": client.txt2img(PROMPT, **NEO_HIRES),
            "sd15_img2img": client.img2img(PROMPT, INIT, **IMG2IMG)}
    first = client.img2img(PROMPT, INIT, **INPAINT)
    refs["sd15_inpaint"] = client.img2img(PROMPT, INIT, **INPAINT)
    apart = psnr(first.image, refs["sd15_inpaint"].image)
    record_testsuite_property("psnr_neo_inpaint_first_vs_second_db", round(apart, 2))
    print(f"Neo's own inpainting, first vs second in a row: PSNR {apart:.2f} dB")
    assert client.txt2img(PROMPT).image == refs["sd15"].image, "Neo itself must be deterministic here"
    return refs


def test_the_server_is_neo(forge: WebUIClient, sd15: ModelFixture, pool: NeoServerPool) -> None:
    """The pinned Neo is what answers: its infotext's Version is neo-<release>."""
    got = forge.txt2img(PROMPT)
    assert got.param("Version") == f"neo-{pool.install.release()}", got.infotext


def test_sd15_source_steers_an_sdxl_target(pool: NeoServerPool, plain, record_property) -> None:
    # as on Forge 2: a full-precision SDXL beside an SD1.5 source needs more RAM than the CPU machine has to spare
    server = pool.get(ServerConfig(extension=True, models=MODELS, extra_args=LOW_MEMORY))
    assert server.client is not None
    fixtures = pool.fixtures(MODELS)
    _steers(server.client, fixtures["sdxl"], fixtures["sd15"], "SDXL", record_property)


def test_a_native_sd15_source_at_twice_its_size_steers_sdxl_and_round_trips(pool: NeoServerPool,
                                                                             record_property) -> None:
    """As on Forge 2: a 1024 px SDXL image with ``source_resolution: native`` runs, changes, is not blank, records
    the setting and is reproduced from its infotext."""
    server = pool.get(ServerConfig(extension=True, models=MODELS, extra_args=LOW_MEMORY))
    assert server.client is not None
    _native_round_trip(server.client, pool.fixtures(MODELS), record_property)


@pytest.fixture
def vpred_server(pool: NeoServerPool) -> tuple[WebUIClient, dict[str, ModelFixture]]:
    try:
        fixtures = pool.fixtures(VPRED_MODELS)
    except LookupError as e:
        pytest.skip(str(e))
    server = pool.get(ServerConfig(extension=True, models=VPRED_MODELS, extra_args=LOW_MEMORY))
    assert server.client is not None
    return server.client, fixtures


def test_neo_reads_the_v_prediction_flag_of_the_sdxl_fixture(vpred_server, record_property) -> None:
    """The same weights with and without the ``v_pred`` key: Neo samples them as different models."""
    client, fixtures = vpred_server
    client.set_model(fixtures["sdxl"].model_name)
    eps = client.txt2img(PROMPT)
    client.set_model(fixtures["sdxl_vpred"].model_name)
    v = client.txt2img(PROMPT)
    db = psnr(eps.image, v.image)
    record_property("psnr_eps_vs_vpred_db", round(db, 2))
    print(f"SDXL: PSNR(eps, v-prediction) = {db:.2f} dB")
    assert v.param("Model") == fixtures["sdxl_vpred"].model_name, v.infotext
    assert db < 35.0, "Neo ignored the v_pred key: the v-prediction fixture sampled as eps"
    assert decode_image(v.image).std(axis=(0, 1)).min() > 5, "a picture, not one flat colour (NaN latents)"


def test_sd15_source_steers_an_sdxl_vpred_target(vpred_server, record_property) -> None:
    # the source is eps-prediction SD1.5, the target v-prediction SDXL
    client, fixtures = vpred_server
    _steers(client, fixtures["sdxl_vpred"], fixtures["sd15"], "SDXL v-pred", record_property)


def test_base_first_with_an_sd15_source_changes_an_sdxl_vpred_target(vpred_server, record_property) -> None:
    client, fixtures = vpred_server
    got = _steers(client, fixtures["sdxl_vpred"], fixtures["sd15"], "SDXL v-pred, base-first", record_property,
                  {"mode": "base-first", "end": 0.5})
    assert got.param("Delta mode") == "base-first" and got.param("Delta window") == "0-0.5", got.infotext
