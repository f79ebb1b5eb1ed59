"""Delta Sampling in a real Forge 2, through its API (see forge_harness.py for the variables).

- the extension disabled gives PNGs byte-identical to Forge without the extension, and enabled with λ = 0 (or an
  empty window) the same pixels;
- source == target with the fixture LoRA L and λ = 1 comes close to Forge's own ``<lora:L:1>`` (and hires fix,
  whose hook Forge calls twice per pass, applies the delta once), in img2img too; inpainting keeps the unmasked
  region Forge's own;
- the X/Y/Z plot over ``[Delta] Lambda`` returns its grid, and each cell is the single generation at its λ;
- an SD1.5 source steers an SDXL target and a v-prediction SD2.1 target: it runs and changes the image;
- bad inputs are HTTP errors with the reason, the server keeps serving, and the next plain image is unchanged;
- the infotext records the settings and, sent back, reproduces the image; nothing outlives a generation (the plain
  image after a delta one is the plain image from before);
- base-first mode: the target as its own source over the first steps gives the target's image, the source with
  the LoRA over every step gives Forge's own ``<lora:L:1>``, and an SD1.5 source on an SD2.1-v target changes it;
- several adaptation groups: two groups holding L at λ = 0.5 give the image of one at λ = 1, and the infotext of
  a two-group image, sent back, reproduces it.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import requests
from forge_harness import ForgeServerPool, open_pool
from harness import Generation, ModelFixture, ServerConfig, WebUIClient, decode_image, psnr, same_pixels

PROMPT = "a photo of a cat sitting on a red chair"
MODELS = ("sd15", "sdxl")
# A rank-4 fixture LoRA moves a 4-step 64x64 image by about 20 dB; the functional LoRA against Forge's merged one
# differs only by float rounding (and Forge merging in place), so "close" is far above that.
CLOSE_DB = 35.0
ADAPTED_PROMPT = "in the style of a watercolor painting"
CHANGED_BELOW_DB = 35.0
# Two groups with the same LoRA at λ = 0.5 against one at λ = 1: both are the extension's own delta, summed in a
# different order, so they agree to float rounding (identical pixels on the CPU here; see docs/e2e.md); 50 dB leaves
# room for another CPU's or BLAS's rounding and is far above the λ = 0.5 image (about 26 dB from λ = 1).
GROUPS_SUM_DB = 50.0
# Forge's API needs hr_additional_modules for hires fix (None fails inside Forge's own hires code)
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.6,
         "hr_upscaler": "Latent", "hr_additional_modules": ["Use same choices"]}
LOW_MEMORY = ("--unet-in-bf16", "--clip-in-fp16")
# The X/Y/Z script's arguments after its nine axis ones (scripts/xyz_grid.py, run()): draw legend, the cells' own
# images, no sub grids, seeds kept, no varying seeds on x, y or z, margin 0, csv mode off
XYZ_OPTIONS = [True, True, False, False, False, False, False, 0, False]


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# img2img and inpainting start from a fixed noise picture; the mask repaints the right half (white) and keeps the
# left (black). mask_blur 0 and whole-picture inpainting: the kept region has a sharp, known edge.
INIT = png((np.random.default_rng(5).random((64, 64, 3)) * 255).astype("uint8"))
MASK = png(np.concatenate([np.zeros((64, 32), "uint8"), np.full((64, 32), 255, "uint8")], axis=1))
IMG2IMG = {"denoising_strength": 0.6}
INPAINT = {**IMG2IMG, "mask": base64.b64encode(MASK).decode(), "mask_blur": 0, "inpainting_fill": 1,
           "inpaint_full_res": False}


def delta(**settings) -> dict:
    return {"alwayson_scripts": {"Delta Sampling": {"args": [settings]}}}


def matches_forges_own(make: Callable[..., Generation], own_prompt: str, settings: dict, reference: Generation,
                       name: str, record_property: Callable, **extra) -> Generation:
    """The identity tests: Forge's own image of ``own_prompt`` against the delta's (``settings`` on PROMPT). The
    adaptation must move the image (below CHANGED_BELOW_DB from ``reference``, or the test proves nothing) and the
    delta land on Forge's own (above CLOSE_DB). ``make``: the client's txt2img, or an img2img from INIT."""
    own = make(own_prompt, **extra)
    got = make(PROMPT, **extra, **delta(**settings))
    moved, db = psnr(reference.image, own.image), psnr(got.image, own.image)
    record_property(f"psnr_{name}_moves_db", round(moved, 2))
    record_property(f"psnr_delta_vs_forge_{name}_db", round(db, 2))
    record_property("seconds_delta", round(got.seconds, 1))
    record_property(f"seconds_forge_{name}", round(own.seconds, 1))
    print(f"PSNR(plain, Forge's own {name}) = {moved:.2f} dB; PSNR(delta, Forge's own {name}) = {db:.2f} dB; "
          f"{got.seconds:.1f}s with the delta, {own.seconds:.1f}s for Forge's own")
    assert moved < CHANGED_BELOW_DB, f"the {name} must move the image for this to mean anything"
    assert db > CLOSE_DB
    return got


@pytest.fixture(scope="module")
def pool() -> Iterator[ForgeServerPool]:
    yield from open_pool(MODELS)


@pytest.fixture(scope="module")
def plain(pool: ForgeServerPool) -> dict[str, Generation]:
    """Reference images from Forge without the extension (generated first: one server at a time)."""
    server = pool.get(ServerConfig(extension=False, models=MODELS))
    client = server.client
    assert client is not None
    client.set_model(pool.fixtures(MODELS)["sd15"].model_name)
    refs = {"sd15": client.txt2img(PROMPT), "sd15_hires": client.txt2img(PROMPT, **HIRES),
            "sd15_img2img": client.img2img(PROMPT, INIT, **IMG2IMG),
            "sd15_inpaint": client.img2img(PROMPT, INIT, **INPAINT)}
    assert client.txt2img(PROMPT).image == refs["sd15"].image, "Forge itself must be deterministic here"
    return refs


@pytest.fixture
def forge(pool: ForgeServerPool, plain: dict[str, Generation]) -> WebUIClient:
    server = pool.get(ServerConfig(extension=True, models=MODELS))
    assert server.client is not None
    return server.client


@pytest.fixture
def sd15(pool: ForgeServerPool, forge: WebUIClient):
    fixture = pool.fixtures(MODELS)["sd15"]
    forge.set_model(fixture.model_name)
    return fixture


def test_disabled_and_zero_strength_are_identical_to_forge_without_the_extension(forge, sd15, plain):
    for params in ({}, delta(enabled=False)):  # the whole PNG, infotext included
        assert forge.txt2img(PROMPT, **params).image == plain["sd15"].image, params
    lora = f"<lora:{sd15.lora()}:1>"
    for params in (delta(enabled=True, source=sd15.model_name, loras=lora, strength=0.0),
                   delta(enabled=True, source=sd15.model_name, adapted_prompt="a dog", start=0.5, end=0.5)):
        got = forge.txt2img(PROMPT, **params)  # the pixels: the infotext now records the settings
        assert np.array_equal(decode_image(got.image), decode_image(plain["sd15"].image)), params
        assert got.param("Model") == sd15.model_name and got.param("Delta source") == sd15.model_name


@pytest.mark.parametrize("hires", [False, True])
def test_source_equal_to_target_with_its_lora_matches_forges_own_lora(forge, sd15, plain, hires, record_property):
    extra = HIRES if hires else {}
    reference = plain["sd15_hires" if hires else "sd15"]
    lora = f"<lora:{sd15.lora()}:1>"
    got = matches_forges_own(forge.txt2img, f"{PROMPT} {lora}", dict(enabled=True, source=sd15.model_name,
                             loras=lora, strength=1.0), reference, "lora", record_property, **extra)
    assert got.param("Delta source") == sd15.model_name
    assert got.param("Delta LoRAs") == f"<lora:{sd15.lora()}:1>" and float(got.param("Delta lambda")) == 1.0
    # nothing of the delta (hook, source, LoRA) outlives the generation: the whole PNG is Forge's own again
    assert forge.txt2img(PROMPT, **extra).image == reference.image


def test_the_infotext_sent_back_reproduces_the_delta_image(forge, sd15):
    lora = f"<lora:{sd15.lora()}:1>"
    got = forge.txt2img(PROMPT, **delta(enabled=True, source=sd15.model_name, loras=lora, strength=0.7,
                                        schedule="cosine", start=0.0, end=0.8))
    assert got.param("Delta source") == sd15.model_name and got.param("Delta LoRAs") == lora
    assert got.param("Delta schedule") == "cosine" and got.param("Delta window") == "0-0.8"
    # No alwayson_scripts: the settings come from the text. `styles` is given because Forge's own infotext handling
    # fails without it: its Styles paste field yields a gradio-4 update ({'__type__': 'update'}) that
    # apply_infotext does not unwrap, and isinstance(..., list[str]) then raises a TypeError (HTTP 500).
    again = forge.txt2img(PROMPT, infotext=got.infotext, styles=[])
    assert again.param("Delta source") == sd15.model_name, again.infotext
    assert np.array_equal(decode_image(again.image), decode_image(got.image))


def psnr_of(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_img2img_source_equal_to_target_with_its_lora_matches_forges_own_lora(forge, sd15, plain, record_property):
    # denoising 0.6 of 4 steps starts below the largest sigma (t_enc = 2), where the init image counts; at 0.75 the
    # image would be txt2img's again (same seed, prompt, size, steps, sampler) and this would test txt2img twice
    from_txt2img = psnr(plain["sd15_img2img"].image, plain["sd15"].image)
    record_property("psnr_plain_img2img_vs_txt2img_db", round(from_txt2img, 2))
    print(f"PSNR(plain img2img, plain txt2img) = {from_txt2img:.2f} dB")
    assert from_txt2img < CHANGED_BELOW_DB
    lora = f"<lora:{sd15.lora()}:1>"
    got = matches_forges_own(lambda prompt, **kw: forge.img2img(prompt, INIT, **kw), f"{PROMPT} {lora}",
                             dict(enabled=True, source=sd15.model_name, loras=lora, strength=1.0),
                             plain["sd15_img2img"], "lora", record_property, **IMG2IMG)
    assert got.param("Denoising strength") == "0.6" and got.param("Delta source") == sd15.model_name, got.infotext
    assert got.param("Delta LoRAs") == lora
    # the whole PNG after it is Forge's own again (img2img without the extension, from the server before)
    assert forge.img2img(PROMPT, INIT, **IMG2IMG).image == plain["sd15_img2img"].image


def test_inpainting_keeps_the_unmasked_region_forges_own(forge, sd15, plain, record_property):
    lora = f"<lora:{sd15.lora()}:1>"
    own = forge.img2img(f"{PROMPT} {lora}", INIT, **INPAINT)
    got = forge.img2img(PROMPT, INIT, **INPAINT, **delta(enabled=True, source=sd15.model_name, loras=lora,
                                                         strength=1.0))
    ref, mine, yours = (decode_image(x) for x in (plain["sd15_inpaint"].image, got.image, own.image))
    # The unmasked (left) half: exact equality, not a PSNR. Forge pastes the init picture back over every pixel the
    # mask keeps (mask_blur 0, so the edge is sharp), after decoding: whatever the sampler did there, delta or not,
    # those pixels are the init's, bit for bit. Any difference would mean the delta leaked past the mask.
    kept, repainted = np.s_[:, :32], np.s_[:, 32:]
    assert np.array_equal(mine[kept], ref[kept])
    assert np.array_equal(mine[kept], decode_image(INIT)[kept])
    # The repainted half: the delta against Forge's own <lora:L:1> inpainting, there only (the kept half would add
    # 3 dB of agreement for free).
    moved, db = psnr_of(ref[repainted], yours[repainted]), psnr_of(mine[repainted], yours[repainted])
    record_property("psnr_lora_moves_masked_db", round(moved, 2))
    record_property("psnr_delta_vs_forge_lora_masked_db", round(db, 2))
    print(f"inpaint (masked half): PSNR(plain, <lora>) = {moved:.2f} dB; PSNR(delta, <lora>) = {db:.2f} dB")
    assert moved < CHANGED_BELOW_DB
    assert db > CLOSE_DB
    assert forge.img2img(PROMPT, INIT, **INPAINT).image == plain["sd15_inpaint"].image


def test_lycoris_loha_on_the_source_matches_forges_own_loha(forge, sd15, plain, record_property):
    loha = f"<lora:{sd15.lora('loha')}:1>"
    got = matches_forges_own(forge.txt2img, f"{PROMPT} {loha}", dict(enabled=True, source=sd15.model_name,
                             loras=loha, strength=1.0), plain["sd15"], "loha", record_property)
    assert got.param("Delta LoRAs") == loha
    assert forge.txt2img(PROMPT).image == plain["sd15"].image


def test_sd15_as_its_own_source_with_an_adapted_prompt_matches_forges_own_prompt(forge, sd15, plain,
                                                                                record_property):
    got = matches_forges_own(forge.txt2img, f"{PROMPT}, {ADAPTED_PROMPT}", dict(
        enabled=True, source=sd15.model_name, adapted_prompt=ADAPTED_PROMPT, strength=1.0), plain["sd15"], "prompt",
        record_property)
    assert got.param("Delta prompt") == ADAPTED_PROMPT, got.infotext


def test_cond_mode_separate_trajectory_and_the_preview_strip(forge, sd15, plain, record_property):
    lora = f"<lora:{sd15.lora()}:1>"
    full = forge.txt2img(PROMPT, **delta(enabled=True, source=sd15.model_name, loras=lora, strength=1.0))
    got = forge.txt2img(PROMPT, **delta(enabled=True, source=sd15.model_name, loras=lora, strength=1.0,
                                        cfg_mode="cond", trajectory="separate", preview=True))
    assert len(got.images) == 2, "the image, then the x0/delta strip"
    image, strip = decode_image(got.images[0]), decode_image(got.images[1])
    # four rows (target, base and adapted x0, |Δ|) of tiles at least 64 px, a column per kept step
    assert image.shape == (64, 64, 3) and strip.shape[0] >= 4 * 64 and strip.shape[1] >= 64, strip.shape
    assert strip.std() > 5, "the strip shows pictures, not one flat colour"
    moved, apart = psnr(plain["sd15"].image, got.images[0]), psnr(full.image, got.images[0])
    record_property("psnr_cond_separate_vs_plain_db", round(moved, 2))
    record_property("psnr_cond_separate_vs_cfg_shared_db", round(apart, 2))
    print(f"cond + separate: PSNR vs plain {moved:.2f} dB, vs cfg + shared {apart:.2f} dB; strip {strip.shape}")
    assert moved < CHANGED_BELOW_DB  # the delta steers
    assert apart < 60  # and the two settings compute different deltas (identical pixels would be ∞)
    assert got.param("Delta CFG mode") == "cond" and got.param("Delta trajectory") == "separate", got.infotext
    assert forge.txt2img(PROMPT).image == plain["sd15"].image


def test_xyz_plot_over_lambda_gives_the_single_generations(forge, sd15, plain, record_property):
    grid_script = next(s for s in forge.get("/sdapi/v1/script-info")
                       if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axis = grid_script["args"][0]["choices"].index("[Delta] Lambda")  # depends on the installed scripts
    settings = dict(enabled=True, source=sd15.model_name, loras=f"<lora:{sd15.lora()}:1>", strength=1.0)
    # x: λ over three values (overriding the panel's 1.0); no y or z; then the grid's options
    script_args = [axis, "0, 0.5, 1", [], 0, "", [], 0, "", [], *XYZ_OPTIONS]
    grid = forge.txt2img(PROMPT, script_name="x/y/z plot", script_args=script_args, **delta(**settings))
    record_property("seconds_grid", round(grid.seconds, 1))
    assert len(grid.images) == 4, "the grid, then one image per cell"
    assert decode_image(grid.image).shape[1] >= 3 * 64
    cells = grid.images[1:]
    lambdas = [float(Generation([], {"infotexts": [t]}, 0).param("Delta lambda") or "nan")
               for t in grid.info["infotexts"][1:]]
    assert lambdas == [0.0, 0.5, 1.0], grid.info["infotexts"]
    assert len({decode_image(c).tobytes() for c in cells}) == 3
    # a cell has exactly the pixels of the single generation with its λ (the files differ: a cell's infotext also
    # names the axis); λ = 0 is Forge's own image
    single = forge.txt2img(PROMPT, **delta(**{**settings, "strength": 0.5}))
    assert same_pixels(cells[1], single.image)
    assert same_pixels(cells[0], plain["sd15"].image)
    assert forge.txt2img(PROMPT).image == plain["sd15"].image


def test_grids_the_extension_refuses_are_422s_before_they_start(forge, sd15, plain):
    """Refused in the axis's confirm, before any cell (Forge's X/Y/Z plot, like AUTOMATIC1111's, would leave a
    failing cell empty and answer 200): a bad axis value, and an axis that sets every LoRA of the first group, which
    has none (an adapted prompt only). Each a 422 naming it, on the same connection; then Forge's own plain image."""
    grid_script = next(s for s in forge.get("/sdapi/v1/script-info")
                       if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = grid_script["args"][0]["choices"]
    with_lora = dict(enabled=True, source=sd15.model_name, loras=f"<lora:{sd15.lora()}:1>")
    cases = {  # csv mode (the last option) takes the values from the text
        "wobbly": (labels.index("[Delta] Schedule"), "linear, wobbly", with_lora),
        "'[Delta] LoRA weight' sets every LoRA of the first adaptation group, which has none": (
            labels.index("[Delta] LoRA weight"), "0.5, 1",
            dict(enabled=True, source=sd15.model_name, adapted_prompt="a watercolor painting")),
    }
    for words, (axis, values, settings) in cases.items():
        script_args = [axis, values, [], 0, "", [], 0, "", [], *XYZ_OPTIONS[:-1], True]
        with pytest.raises(requests.HTTPError) as err:
            forge.txt2img(PROMPT, script_name="x/y/z plot", script_args=script_args, **delta(**settings))
        assert err.value.response.status_code == 422, err.value
        assert words in err.value.response.json()["detail"], err.value.response.text
        assert forge.txt2img(PROMPT).image == plain["sd15"].image


def test_bad_inputs_are_http_errors_and_the_next_plain_image_is_unchanged(pool, forge, sd15, plain):
    lora = f"<lora:{sd15.lora()}:1>"
    bad = {
        "not among Forge's checkpoints": dict(enabled=True, source="no_such_model", loras=lora),
        "not among Forge's LoRAs": dict(enabled=True, source=sd15.model_name, loras="<lora:no_such_lora:1>"),
        "must lie between": dict(enabled=True, source=sd15.model_name, loras=lora, strength=9.0),
        "Unknown Delta Sampling setting": dict(enabled=True, source=sd15.model_name, loras=lora, lamda=1.0),
        "not a readable .safetensors": dict(enabled=True, source=sd15.model_name,
                                            loras=f"<lora:{sd15.lora('corrupt')}:1>"),
    }
    server = pool.current
    log_start = len(server.log_path.read_text(errors="replace"))
    for words, settings in bad.items():
        with pytest.raises(requests.HTTPError) as err:
            forge.txt2img(PROMPT, **delta(**settings))
        assert err.value.response.status_code == 422, err.value
        assert words in err.value.response.json()["detail"], err.value.response.text
        # on the same keep-alive connection: a refusal that escaped to the ASGI server would have closed it
        assert forge.txt2img(PROMPT).image == plain["sd15"].image
    log = server.log_path.read_text(errors="replace")[log_start:]
    assert "Exception in ASGI application" not in log, \
        "every refusal must be answered by the app itself, not re-raised to the server:\n" + log[-4000:]


def test_base_first_with_the_target_as_its_own_source_is_the_targets_image(forge, sd15, plain, record_property):
    # base-first: x0' = x0_target + λ(t)·(x0_source − x0_target) inside the window. With the target's own checkpoint
    # as the source and no adaptation the source predicts what the target would have (the same file, in the same
    # precision, in a private engine), so the first half of the steps (2 of 4) gives Forge's own image.
    lora = f"<lora:{sd15.lora()}:1>"
    first = dict(enabled=True, source=sd15.model_name, mode="base-first", start=0.0, end=0.5)
    own_steps = forge.txt2img(PROMPT, **delta(**first))
    # The source with the LoRA predicting every step is the adapted model itself: Forge's own <lora:L:1>.
    own_lora = forge.txt2img(f"{PROMPT} {lora}")
    every = forge.txt2img(PROMPT, **delta(**{**first, "end": 1.0, "loras": lora}))
    # Over the first half only, the adapted source starts the picture and the target finishes it.
    half = forge.txt2img(PROMPT, **delta(**first, loras=lora))
    db = {"target_source_vs_plain": psnr(own_steps.image, plain["sd15"].image),
          "lora_moves": psnr(plain["sd15"].image, own_lora.image),
          "adapted_every_step_vs_forge_lora": psnr(every.image, own_lora.image),
          "adapted_first_half_vs_plain": psnr(half.image, plain["sd15"].image),
          "adapted_first_half_vs_forge_lora": psnr(half.image, own_lora.image)}
    for key, value in db.items():
        record_property(f"psnr_{key}_db", round(value, 2))
    record_property("seconds_base_first", round(own_steps.seconds, 1))
    print("base-first: " + "; ".join(f"{k} = {v:.2f} dB" for k, v in db.items()))
    assert db["target_source_vs_plain"] > CLOSE_DB
    assert db["lora_moves"] < CHANGED_BELOW_DB, "the fixture LoRA must move the image for this to mean anything"
    assert db["adapted_every_step_vs_forge_lora"] > CLOSE_DB
    assert db["adapted_first_half_vs_plain"] < CHANGED_BELOW_DB
    assert own_steps.param("Delta mode") == "base-first" and own_steps.param("Delta window") == "0-0.5"
    assert own_steps.param("Delta source") == sd15.model_name and own_steps.param("Delta LoRAs") is None
    assert every.param("Delta mode") == "base-first" and every.param("Delta window") is None
    assert half.param("Delta LoRAs") == lora
    # sent back, the infotext makes the same picture again (mode and window included)
    again = forge.txt2img(PROMPT, infotext=half.infotext, styles=[])
    assert again.param("Delta mode") == "base-first" and again.param("Delta window") == "0-0.5", again.infotext
    assert same_pixels(again.image, half.image)
    assert forge.txt2img(PROMPT).image == plain["sd15"].image


def test_skipped_cfg_steps_run_the_source_unguided_as_in_automatic1111(forge, sd15, plain, record_property):
    # Forge runs some calls at scale 1 by its own choice: skip-early-CFG (an option) and NGMS (a request field: every
    # odd step below its σ). There the source runs unguided too, as AUTOMATIC1111's host does, whatever its own
    # scale: base-first with the target as its own source at the target's scale, over every step, is then Forge's
    # own image with the same skips. A source guided on those steps lands elsewhere.
    settings = dict(enabled=True, source=sd15.model_name, mode="base-first", source_cfg=7.0)
    try:
        forge.set_options(skip_early_cond=0.5)
        own_early = forge.txt2img(PROMPT)
        got_early = forge.txt2img(PROMPT, **delta(**settings))
    finally:
        forge.set_options(skip_early_cond=0.0)
    own_ngms = forge.txt2img(PROMPT, s_min_uncond=100.0)
    got_ngms = forge.txt2img(PROMPT, s_min_uncond=100.0, **delta(**settings))
    db = {"skip_early_moves": psnr(own_early.image, plain["sd15"].image),
          "skip_early_delta_vs_forge": psnr(got_early.image, own_early.image),
          "ngms_moves": psnr(own_ngms.image, plain["sd15"].image),
          "ngms_delta_vs_forge": psnr(got_ngms.image, own_ngms.image)}
    for key, value in db.items():
        record_property(f"psnr_{key}_db", round(value, 2))
    print("skipped CFG: " + "; ".join(f"{k} = {v:.2f} dB" for k, v in db.items()))
    assert own_early.param("Skip Early CFG") == "0.5" and own_ngms.param("NGMS") == "100.0", own_ngms.infotext
    # the skips move Forge's own image (NGMS, on 2 of 4 steps, less), and the delta's lands on it far closer than
    # that: a source guided on the skipped steps would be about as far from it as the skips move it
    for skip in ("skip_early", "ngms"):
        assert db[f"{skip}_moves"] < 60.0, f"{skip} must move the image for this to mean anything"
        assert db[f"{skip}_delta_vs_forge"] > max(CLOSE_DB, db[f"{skip}_moves"] + 10.0)
    assert forge.txt2img(PROMPT).image == plain["sd15"].image


def test_a_source_device_that_does_not_exist_is_refused_by_name(pool, forge, sd15, plain):
    settings = dict(enabled=True, source=sd15.model_name, loras=f"<lora:{sd15.lora()}:1>")
    try:
        forge.set_options(delta_sampling_device="cuda:7")
        with pytest.raises(requests.HTTPError) as err:
            forge.txt2img(PROMPT, **delta(**settings))
    finally:
        forge.set_options(delta_sampling_device="same")
    assert err.value.response.status_code == 422, err.value
    detail = err.value.response.json()["detail"]
    assert "Delta Sampling device 'cuda:7' does not exist on this machine; use 'same' or 'cpu'." in detail, detail
    assert forge.txt2img(PROMPT).image == plain["sd15"].image


def test_two_groups_at_half_strength_equal_one_group_at_full_strength(forge, sd15, plain, record_property):
    # Σ_g λ_g·(x0_adapted_g − x0_base) is linear in λ in cfg mode: two groups holding the same LoRA at λ = 0.5 add
    # two equal halves of one delta. The two paths differ only in float rounding (the adapted rows are evaluated
    # twice, side by side in one batch, and summed), so they agree far above the 35 dB of the other tests, while
    # a second group dropped gives the λ = 0.5 image, which is checked to lie below 35 dB.
    lora = f"<lora:{sd15.lora()}:1>"
    one = forge.txt2img(PROMPT, **delta(enabled=True, source=sd15.model_name, loras=lora, strength=1.0))
    half = forge.txt2img(PROMPT, **delta(enabled=True, source=sd15.model_name, loras=lora, strength=0.5))
    group = {"loras": lora, "strength": 0.5}
    two = forge.txt2img(PROMPT, **delta(enabled=True, source=sd15.model_name, groups=[group, group]))
    db_half, db_two = psnr(half.image, one.image), psnr(two.image, one.image)
    record_property("psnr_one_group_half_vs_full_db", round(db_half, 2))
    record_property("psnr_two_halves_vs_one_full_db", round(db_two, 2))
    record_property("seconds_one_group", round(one.seconds, 1))
    record_property("seconds_two_groups", round(two.seconds, 1))
    print(f"groups: PSNR(λ 0.5, λ 1) = {db_half:.2f} dB; PSNR(2 × λ 0.5, λ 1) = {db_two:.2f} dB; "
          f"{one.seconds:.1f}s with one group, {two.seconds:.1f}s with two")
    assert db_half < CHANGED_BELOW_DB, "half the delta must look different for this to mean anything"
    assert db_two > GROUPS_SUM_DB
    # the infotext: the first group flat, the second as JSON
    assert two.param("Delta LoRAs") == lora and two.param("Delta lambda") == "0.5", two.infotext
    second = json.loads(two.param("Delta group 2") or "null")
    assert second["loras"] == [{"name": sd15.lora(), "weight": 1.0}] and second["strength"] == 0.5, second
    # sent back, it reproduces the two-group image (one group read back would give the λ = 0.5 picture)
    again = forge.txt2img(PROMPT, infotext=two.infotext, styles=[])
    assert again.param("Delta group 2") == two.param("Delta group 2"), again.infotext
    assert same_pixels(again.image, two.image)
    assert forge.txt2img(PROMPT).image == plain["sd15"].image


def _steers(forge: WebUIClient, target: ModelFixture, sd15: ModelFixture, label: str, record_property,
            settings: dict | None = None) -> Generation:
    """The SD1.5 source (by default with its LoRA) on another family's target: runs, names both models, changes the
    image into a picture (NaNs in the latents decode to one flat colour, which would "change" it too), and leaves
    the next plain image as it was."""
    forge.set_model(target.model_name)
    off = forge.txt2img(PROMPT)
    settings = settings or {"loras": f"<lora:{sd15.lora()}:1>"}
    got = forge.txt2img(PROMPT, **delta(enabled=True, source=sd15.model_name, **settings))
    db = psnr(off.image, got.image)
    record_property("psnr_db", round(db, 2))
    record_property("seconds", round(got.seconds, 1))
    print(f"SD1.5 -> {label}: PSNR(off, delta) = {db:.2f} dB in {got.seconds:.1f}s")
    assert got.param("Model") == target.model_name and got.param("Delta source") == sd15.model_name
    assert db < CHANGED_BELOW_DB
    assert decode_image(got.image).std(axis=(0, 1)).min() > 5
    assert forge.txt2img(PROMPT).image == off.image, f"the {label} image after the delta one must be the one before"
    return got


def test_sd15_source_steers_an_sdxl_target(pool, plain, record_property):
    # A full-precision SDXL beside an SD1.5 source needs more RAM than the CPU machines here have to spare;
    # this check (runs, moves the image) holds in half precision too.
    server = pool.get(ServerConfig(extension=True, models=MODELS, extra_args=LOW_MEMORY))
    assert server.client is not None
    fixtures = pool.fixtures(MODELS)
    _steers(server.client, fixtures["sdxl"], fixtures["sd15"], "SDXL", record_property)


def test_a_native_sd15_source_at_twice_its_size_steers_sdxl_and_round_trips(pool, record_property):
    """A 1024 px SDXL image with ``source_resolution: native``: the SD1.5 source runs at its own 512 px, the image
    changes, is not blank, records the setting, and its infotext alone gives the same image again."""
    server = pool.get(ServerConfig(extension=True, models=MODELS, extra_args=LOW_MEMORY))
    assert server.client is not None
    _native_round_trip(server.client, pool.fixtures(MODELS), record_property)


def _native_round_trip(client: WebUIClient, fixtures: dict[str, ModelFixture], record_property) -> None:
    sd15 = fixtures["sd15"]
    client.set_model(fixtures["sdxl"].model_name)
    size = {"width": 1024, "height": 1024, "steps": 2}
    off = client.txt2img(PROMPT, **size)
    got = client.txt2img(PROMPT, **size, **delta(enabled=True, source=sd15.model_name,
                                                  loras=f"<lora:{sd15.lora()}:1>", source_resolution="native"))
    db = psnr(got.image, off.image)
    record_property("psnr_db_vs_target_alone", round(db, 2))
    record_property("seconds", round(got.seconds, 1))
    assert db < CHANGED_BELOW_DB
    assert decode_image(got.image).std(axis=(0, 1)).min() > 5  # NaN latents decode to a flat image
    assert got.param("Delta source resolution") == "native", got.infotext
    again = client.txt2img(PROMPT, **size, infotext=got.infotext, styles=[])  # styles: see the infotext test above
    assert again.param("Delta source resolution") == "native", again.infotext
    assert np.array_equal(decode_image(again.image), decode_image(got.image))


@pytest.fixture
def sd21v_server(pool) -> tuple[WebUIClient, dict[str, ModelFixture]]:
    """Forge with the SD1.5 source and the SD2.1-v target, both in fp32: their own server, no SDXL beside them.
    Forge reads the yaml beside the fixture (parameterization: v) and so loads it as a v-prediction SD2.1."""
    try:
        fixtures = pool.fixtures(("sd15", "sd21v"))
    except LookupError as e:
        pytest.skip(str(e))
    server = pool.get(ServerConfig(extension=True, models=("sd15", "sd21v")))
    assert server.client is not None
    return server.client, fixtures


def test_sd15_source_steers_an_sd21v_target(sd21v_server, record_property):
    # the source is eps-prediction SD1.5, the target v-prediction SD2.1
    client, fixtures = sd21v_server
    _steers(client, fixtures["sd21v"], fixtures["sd15"], "SD2.1-v", record_property)


def test_base_first_with_an_sd15_source_changes_an_sd21v_target(sd21v_server, record_property):
    # Another checkpoint as the source in base-first mode: the SD1.5 (eps) source predicts the first half of the
    # steps of the SD2.1-v target, which finishes them.
    client, fixtures = sd21v_server
    got = _steers(client, fixtures["sd21v"], fixtures["sd15"], "SD2.1-v, base-first", record_property,
                  {"mode": "base-first", "end": 0.5})
    assert got.param("Delta mode") == "base-first" and got.param("Delta window") == "0-0.5", got.infotext
    assert got.param("Delta LoRAs") is None


# ---------------------------------------------------------------------------------------------- SD3
# The reduced SD3 fixture (16 latent channels; Forge loads it as its SD3 engine, T5 off as by default) with the SD1.5
# source, on a server of their own: last, so that no other test pays for the switch.

SD3_MODELS = ("sd3", "sd15")
# An explicit scheduler: with "Automatic" (what a request without one gets) Forge's SD3 sampling reaches sigma 0
# before its last Euler step and returns NaN latents (a black image), with or without the extension.
SD3 = {"scheduler": "Simple"}


def _server_with(pool: ForgeServerPool, models: tuple[str, ...], active: str
                 ) -> tuple[WebUIClient, dict[str, ModelFixture]]:
    """A Forge with the extension and ``models``, ``active`` selected (skips when a fixture cannot be built)."""
    try:
        fixtures = pool.fixtures(models)
    except LookupError as e:
        pytest.skip(str(e))
    server = pool.get(ServerConfig(extension=True, models=models))
    assert server.client is not None
    server.client.set_model(fixtures[active].model_name)
    return server.client, fixtures


@pytest.fixture
def sd3_forge(pool: ForgeServerPool) -> tuple[WebUIClient, dict[str, ModelFixture]]:
    return _server_with(pool, SD3_MODELS, "sd3")


def test_sd15_source_on_an_sd3_target_is_refused_and_the_next_image_is_unchanged(pool, sd3_forge):
    forge, fixtures = sd3_forge
    sd15, sd3 = fixtures["sd15"], fixtures["sd3"]
    plain = forge.txt2img(PROMPT, **SD3)
    assert plain.param("Model") == sd3.model_name, plain.infotext
    assert decode_image(plain.image).std(axis=(0, 1)).min() > 5, "a picture, not one flat colour (NaN latents)"
    server = pool.current
    log_start = len(server.log_path.read_text(errors="replace"))
    with pytest.raises(requests.HTTPError) as err:
        forge.txt2img(PROMPT, **SD3, **delta(enabled=True, source=sd15.model_name, loras=f"<lora:{sd15.lora()}:1>"))
    response = err.value.response
    assert response.status_code == 422, err.value
    detail = response.json()["detail"]
    assert f"'{sd15.model_name}' (SD1, 4 latent channels)" in detail, detail
    assert f"'{sd3.model_name}' (SD3, 16 latent channels)" in detail, detail
    assert "Choose a source of the target's family (a 16-channel model such as SD3, Flux, Chroma)" in detail, detail
    # the whole PNG of the next plain image is the one from before, on the same keep-alive connection
    assert forge.txt2img(PROMPT, **SD3).image == plain.image
    log = server.log_path.read_text(errors="replace")[log_start:]
    assert "Exception in ASGI application" not in log, log[-4000:]


def test_sd3_as_its_own_source_with_an_adapted_prompt_matches_forges_own_prompt(sd3_forge, record_property):
    # Target == source == SD3 (flow matching), adapted prompt P at λ = 1: Forge's own image for "PROMPT, P".
    forge, fixtures = sd3_forge
    sd3 = fixtures["sd3"]
    plain = forge.txt2img(PROMPT, **SD3)
    assert decode_image(plain.image).std(axis=(0, 1)).min() > 5, "a picture, not one flat colour (NaN latents)"
    got = matches_forges_own(forge.txt2img, f"{PROMPT}, {ADAPTED_PROMPT}", dict(
        enabled=True, source=sd3.model_name, adapted_prompt=ADAPTED_PROMPT, strength=1.0), plain, "prompt",
        record_property, **SD3)
    assert got.param("Delta source") == sd3.model_name and got.param("Delta prompt") == ADAPTED_PROMPT, got.infotext
    assert forge.txt2img(PROMPT, **SD3).image == plain.image


# ---------------------------------------------------------------------------------------------- SD3.5
# The reduced SD3.5 fixture (SD3's layout with the q/k norms of SD3.5 large; Forge builds its MMDiT with them) as the
# target, with the SD3 fixture as source: one latent space, so no conversion; and SD3.5 as its own source.

SD35_MODELS = ("sd35", "sd3")


@pytest.fixture
def sd35_forge(pool: ForgeServerPool) -> tuple[WebUIClient, dict[str, ModelFixture]]:
    return _server_with(pool, SD35_MODELS, "sd35")


def test_sd3_source_steers_an_sd35_target_and_sd35_is_its_own_identity(pool, sd35_forge, record_property):
    forge, fixtures = sd35_forge
    sd35, sd3 = fixtures["sd35"], fixtures["sd3"]
    server = pool.current
    log_start = len(server.log_path.read_text(errors="replace"))
    plain = forge.txt2img(PROMPT, **SD3)
    assert plain.param("Model") == sd35.model_name, plain.infotext
    assert decode_image(plain.image).std(axis=(0, 1)).min() > 5, "a picture, not one flat colour (NaN latents)"
    own = forge.txt2img(f"{PROMPT}, {ADAPTED_PROMPT}", **SD3)
    itself = forge.txt2img(PROMPT, **SD3, **delta(enabled=True, source=sd35.model_name,
                                                   adapted_prompt=ADAPTED_PROMPT, strength=1.0))
    crossed = forge.txt2img(PROMPT, **SD3, **delta(enabled=True, source=sd3.model_name,
                                                    adapted_prompt=ADAPTED_PROMPT, strength=1.0))
    moved, db_self = psnr(plain.image, own.image), psnr(itself.image, own.image)
    db_cross_plain, db_cross_own = psnr(crossed.image, plain.image), psnr(crossed.image, own.image)
    for name, value in (("psnr_prompt_moves_db", moved), ("psnr_self_delta_vs_forge_prompt_db", db_self),
                        ("psnr_sd3_source_vs_plain_db", db_cross_plain), ("psnr_sd3_source_vs_own_db", db_cross_own)):
        record_property(name, round(value, 2))
    print(f"SD3.5: PSNR(plain, own prompt) = {moved:.2f} dB; SD3.5 as its own source vs own prompt = {db_self:.2f} dB; "
          f"SD3 source: vs plain {db_cross_plain:.2f} dB, vs own prompt {db_cross_own:.2f} dB")
    assert moved < CHANGED_BELOW_DB, "the appended text must move the image for this to mean anything"
    assert db_self > CLOSE_DB
    # another model's delta: it moves the image, and no conversion was needed between SD3 and SD3.5
    assert db_cross_plain < CHANGED_BELOW_DB
    assert decode_image(crossed.image).std(axis=(0, 1)).min() > 5
    assert crossed.param("Delta source") == sd3.model_name and crossed.param("Delta latent conversion") is None, \
        crossed.infotext
    assert forge.txt2img(PROMPT, **SD3).image == plain.image
    whole = server.log_path.read_text(errors="replace")
    # Forge read the q/k norms into its MMDiT, the target's and the private source's (it lists the keys a model does
    # not take as "Unexpected")
    assert not [line for line in whole.splitlines() if "Unexpected" in line and "ln_q" in line], whole[-4000:]
    assert "Exception in ASGI application" not in whole[log_start:], whole[-4000:]
