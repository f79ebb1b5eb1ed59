"""IP-Adapter units on the source's adapted rows in a real Forge 2 and a real Forge Neo, with their built-in
IP-Adapter.

With the SD1.5 IP-Adapter fixtures `ip_sd15` (plain) and `ip_plus_sd15` (Plus) and the full-size ViT-H CLIP-vision
fixture `clip_h`, written as the safetensors file Forge's "CLIP-ViT-H (IPAdapter)" preprocessor loads (so nothing
downloads; tests/e2e/fixtures.py, forge_harness.py), on the SD1.5 fixture checkpoint, 64x64, 4 Euler steps, cfg mode,
on each host in turn (one server at a time):

- the identity: target == source, one unit, λ = 1 gives the image of the host's own IP-Adapter unit on that checkpoint
  (>= IDENTICAL_ABOVE_DB), and that unit moves the image (<= MOVED_BELOW_DB);
- across families: the SD1.5 IP-Adapter through the SD1.5 source changes the reduced SDXL target's image, which stays
  finite, and the infotext records the unit (never its image);
- bad units (unknown model, not an image, an encoder that does not match the adapter, an SDXL IP-Adapter on the SD1.5
  source, a FaceID adapter whose face model is not installed) are 422s naming the problem, and the next plain image is
  byte-identical to the first. The SDXL adapter, the FaceID adapter and the ViT-bigG encoder are header-only files
  written into the server's folders: they are refused from their headers and never load.

Needs DELTA_E2E_FORGE and/or DELTA_E2E_NEO (see forge_harness.py, neo_harness.py); PSNRs go to the JUnit properties.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from forge_harness import ForgeServerPool
from forge_harness import open_pool as open_forge
from harness import ModelFixture, ServerConfig, WebUIClient, controlnet_units, psnr, same_pixels
from neo_harness import open_pool as open_neo
from test_a1111_ipadapter_units import inverted_png, reference_png

SCRIPT = "Delta Sampling"
PROMPT = "a photo of a cat sitting on a red chair"
ADAPTERS = ("ip_sd15", "ip_plus_sd15")
MODELS = ("sd15", "sdxl", *ADAPTERS, "clip_h")
ENCODER = "CLIP-ViT-H (IPAdapter)"
IDENTICAL_ABOVE_DB = 35.0
MOVED_BELOW_DB = 25.0
CHANGED_BELOW_DB = 35.0
IMAGE = base64.b64encode(reference_png()).decode()


@dataclass
class Host:
    name: str
    client: WebUIClient
    fixtures: dict[str, ModelFixture]
    listed: dict[str, str]  # fixture key (or header-only file stem) -> the name the host lists it under
    plain: dict[str, bytes] = field(default_factory=dict)

    def use(self, key: str) -> None:
        self.client.set_model(self.fixtures[key].model_name)

    def own(self, adapter: str = "ip_sd15", **kw) -> dict:
        """The host's own IP-Adapter unit (Forge's ControlNet script with an IP-Adapter model)."""
        return controlnet_units({"enabled": True, "model": self.listed[adapter], "image": IMAGE, "module": ENCODER,
                                 "weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False,
                                 **kw})

    def ours(self, source: str, units: list[dict], **kw) -> dict:
        settings = {"enabled": True, "source": self.fixtures[source].model_name, "ipadapters": units, **kw}
        return {"alwayson_scripts": {SCRIPT: {"args": [settings]}}}

    def unit(self, adapter: str = "ip_sd15", **kw) -> dict:
        return {"model": self.listed[adapter], "image": IMAGE, "module": ENCODER, **kw}


def _write_header_files(data_dir: Path) -> dict[str, Path]:
    """Files refused from their headers: an SDXL IP-Adapter (to_k_ip reads a 2048-wide context), a FaceID one (its
    LoRA keys), and a ViT-bigG encoder (1664 wide, projection 1280), at a few layers' size."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    controlnets, encoders = data_dir / "models" / "ControlNet", data_dir / "models" / "ControlNetPreprocessor"
    files = {"ip-adapter_delta_e2e_sdxl_header": controlnets / "ip-adapter_delta_e2e_sdxl_header.safetensors",
             "ip-adapter-faceid_delta_e2e_sd15_header": controlnets / "ip-adapter-faceid_delta_e2e_sd15_header"
                                                                      ".safetensors"}
    save_file({"image_proj.proj.weight": rand(4 * 2048, 1280), "image_proj.proj.bias": rand(4 * 2048),
               "image_proj.norm.weight": rand(2048), "image_proj.norm.bias": rand(2048),
               "ip_adapter.1.to_k_ip.weight": rand(640, 2048), "ip_adapter.1.to_v_ip.weight": rand(640, 2048)},
              str(files["ip-adapter_delta_e2e_sdxl_header"]))
    save_file({"image_proj.proj.0.weight": rand(1024, 512), "image_proj.proj.2.weight": rand(3072, 1024),
               "image_proj.norm.weight": rand(768), "ip_adapter.0.to_q_lora.down.weight": rand(128, 320),
               "ip_adapter.1.to_k_ip.weight": rand(320, 768), "ip_adapter.1.to_v_ip.weight": rand(320, 768)},
              str(files["ip-adapter-faceid_delta_e2e_sd15_header"]))
    save_file({"vision_model.embeddings.class_embedding": rand(1664), "visual_projection.weight": rand(1280, 1664)},
              str(encoders / "CLIP-ViT-bigG.safetensors"))
    return files


# Forge Neo builds like 5692d2d cannot build any CLIP-vision encoder, whatever their transformers: their ModelPatcher
# assigns `model.device` (backend/patcher/base.py:173), a read-only property of every transformers model, so its own
# IP-Adapter units fail in `process` (the unit is skipped, the image stays plain) and Delta Sampling's get this 422.
# Later Neo builds skip the assignment when it fails; with that, these tests measure the identity in Neo too.
NEO_ENCODER_BROKEN = "property 'device' of 'CLIPVisionModelWithProjection' object has no setter"


def _ours(host: Host, payload: dict, own: bytes | None = None, plain: bytes | None = None):
    """Our generation; on Neo, the host's known encoder failure is an expected failure (the host's own unit, when
    given, must have failed too: its image is the plain one)."""
    try:
        return host.client.txt2img(PROMPT, **payload)
    except requests.HTTPError as e:
        if host.name == "neo" and NEO_ENCODER_BROKEN in str(e) and "422" in str(e):
            # the PNGs differ in their infotext (Neo records the unit it skipped), not in the pixels
            assert own is None or same_pixels(own, plain), "Neo's own IP-Adapter unit worked: its encoder loads"
            pytest.xfail(f"Forge Neo cannot load a CLIP-vision encoder here ({NEO_ENCODER_BROKEN}); Delta "
                         "Sampling refuses with a 422 naming it, Neo's own unit leaves the image plain")
        raise


def _model_hash(path: Path) -> str:
    """Forge 2's ControlNet names carry the WebUI's old short model hash (sd_models.model_hash)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _host(name: str, pool: ForgeServerPool) -> Host:
    server = pool.get(ServerConfig(extension=True, models=("sd15", "sdxl"), controlnets=ADAPTERS,
                                   clip_vision=("clip_h",)))
    assert server.client is not None and server.data_dir is not None
    fixtures = pool.fixtures(MODELS)
    names = server.client.get("/controlnet/model_list")["model_list"]
    listed = {}
    for key in ADAPTERS:
        stem = fixtures[key].model_name
        [listed[key]] = [m for m in names if m == stem or m.startswith(stem + " [")]
    for stem, path in _write_header_files(server.data_dir).items():  # listed once the list is refreshed
        listed[stem] = stem if name == "neo" else f"{stem} [{_model_hash(path)}]"
    return Host(name, server.client, fixtures, listed)


@pytest.fixture(scope="module", params=["forge", "neo"])
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    """Each host's server in turn (every test for one host, then the next), the fixtures in place."""
    pools = (open_forge if request.param == "forge" else open_neo)(MODELS)
    pool = next(pools)  # skips when the host's variable is unset or a fixture is neither cached nor buildable
    try:
        yield _host(request.param, pool)
    finally:
        pools.close()


def _record(record_property, host: Host, **figures: float) -> None:
    for key, value in figures.items():
        record_property(f"{host.name}_{key}", round(value, 2))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_target_equal_to_source_equals_the_hosts_own_unit(host: Host, adapter: str, record_property) -> None:
    host.use("sd15")
    plain = host.client.txt2img(PROMPT)
    host.plain.setdefault("sd15", plain.image)
    own = host.client.txt2img(PROMPT, **host.own(adapter))
    ours = _ours(host, host.ours("sd15", [host.unit(adapter)]), own.image, plain.image)
    # the unit's picture follows its reference image: identity is not two images saturated alike by the adapter
    other = host.client.txt2img(PROMPT, **host.own(adapter, image=base64.b64encode(inverted_png()).decode()))
    db_own, db_plain = psnr(ours.image, own.image), psnr(own.image, plain.image)
    db_reference = psnr(other.image, own.image)
    _record(record_property, host, **{f"{adapter}_psnr_db_vs_own_unit": db_own,
                                      f"{adapter}_psnr_db_own_unit_vs_plain": db_plain,
                                      f"{adapter}_psnr_db_own_unit_other_reference": db_reference,
                                      f"{adapter}_seconds_own": own.seconds, f"{adapter}_seconds_delta": ours.seconds})
    print(f"{host.name} {adapter}: PSNR(delta, own IP-Adapter unit) = {db_own:.2f} dB, PSNR(own unit, plain) = "
          f"{db_plain:.2f} dB, PSNR(own unit, own unit with the inverted reference) = {db_reference:.2f} dB; "
          f"{ours.seconds:.1f}s vs {own.seconds:.1f}s")
    assert db_plain <= MOVED_BELOW_DB and db_reference < CHANGED_BELOW_DB
    assert db_own >= IDENTICAL_ABOVE_DB
    recorded = ours.param("Delta IP Adapters") or ""
    assert host.listed[adapter] in recorded and IMAGE[:40] not in ours.infotext


def test_an_sd15_ipadapter_through_an_sd15_source_changes_an_sdxl_image(host: Host, record_property) -> None:
    import numpy as np
    from harness import decode_image

    host.use("sdxl")
    plain = host.client.txt2img(PROMPT)
    ours = _ours(host, host.ours("sd15", [host.unit(weight=0.8)]))
    db = psnr(ours.image, plain.image)
    _record(record_property, host, psnr_db_vs_plain_sdxl=db)
    print(f"{host.name} SDXL target: PSNR(delta with the SD1.5 IP-Adapter, plain) = {db:.2f} dB")
    assert db < CHANGED_BELOW_DB
    assert np.isfinite(decode_image(ours.image)).all() and decode_image(ours.image).std() > 1
    recorded = (ours.param("Delta IP Adapters") or "").replace(" ", "").replace("\\", "")
    assert host.listed["ip_sd15"] in ours.param("Delta IP Adapters") and '"weight":0.8' in recorded
    assert IMAGE[:40] not in ours.infotext


@pytest.mark.parametrize(("unit", "message"), [
    ({"model": "ip-adapter_delta_e2e_sd1"}, "is not among Forge's ControlNet models"),
    ({"image": base64.b64encode(b"not an image").decode()}, "is not a readable image"),
    ({"module": "CLIP-ViT-bigG (IPAdapter)"}, "reads a 1024-wide image embedding, but 'CLIP-ViT-bigG (IPAdapter)' "
                                              "is ViT-bigG"),
    ({"model": "ip-adapter_delta_e2e_sdxl_header"}, "(SDXL) is not made for the source"),
    ({"model": "ip-adapter-faceid_delta_e2e_sd15_header", "module": "InsightFace+CLIP-H (IPAdapter)"},
     "needs its face model"),
    ({"model": "ip-adapter-faceid_delta_e2e_sd15_header"}, "is a FaceID adapter and needs the encoder"),
], ids=["unknown-model", "not-an-image", "encoder-mismatch", "sdxl-adapter", "faceid-without-face-model",
        "faceid-with-clip-encoder"])
def test_bad_units_are_422s_and_leave_nothing_behind(host: Host, unit: dict, message: str, record_property) -> None:
    host.use("sd15")
    first = host.plain.get("sd15") or host.client.txt2img(PROMPT).image
    host.plain.setdefault("sd15", first)
    unit = {**host.unit(), **unit}
    unit["model"] = host.listed.get(unit["model"], unit["model"])
    payload = {"prompt": PROMPT, "negative_prompt": "", "seed": 1, "steps": 4, "width": 64, "height": 64,
               "cfg_scale": 7.0, "sampler_name": "Euler", **host.ours("sd15", [unit])}
    r = host.client.session.post(host.client.base_url + "/sdapi/v1/txt2img", json=payload, timeout=600)
    detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else r.text
    record_property(f"{host.name}_status", r.status_code)
    record_property(f"{host.name}_detail", str(detail)[:300])
    print(f"{host.name} {r.status_code}: {str(detail)[:300]}")
    assert r.status_code == 422 and message in str(detail)
    assert host.client.txt2img(PROMPT).image == first
    with pytest.raises(requests.HTTPError):
        host.client.post("/sdapi/v1/txt2img", payload)


def test_script_info_lists_the_ipadapter_controls_and_the_panels_form_runs_them(host: Host) -> None:
    """The panel's IP-Adapter units in this host: their model dropdowns list Forge's IP-Adapters (not in the
    ControlNet dropdowns), their encoder dropdowns Forge's IP-Adapter preprocessors, and the positional form the
    panel sends makes the settings object's image."""
    from lib_delta.args import POSITIONAL_FIELDS, DeltaSettings, to_positional

    host.use("sd15")
    ours = [s for s in host.client.get("/sdapi/v1/script-info") if s["name"] == SCRIPT.lower()]
    assert len(ours) == 2  # txt2img and img2img
    adapters = {host.listed[a] for a in ADAPTERS}
    for s in ours:
        args = s["args"]
        assert len(args) == len(POSITIONAL_FIELDS)
        model = args[POSITIONAL_FIELDS.index("group2_ipadapter2_model")]
        choices = [c[0] if isinstance(c, list) else c for c in model["choices"]]  # gradio 4: (value, label)
        assert choices[0] == "None" and adapters <= set(choices), model
        controlnets = args[POSITIONAL_FIELDS.index("controlnet1_model")]
        assert not adapters & {c[0] if isinstance(c, list) else c for c in controlnets["choices"]}, controlnets
        module = args[POSITIONAL_FIELDS.index("ipadapter1_module")]
        assert ENCODER in [c[0] if isinstance(c, list) else c for c in module["choices"]], module
    values = to_positional(DeltaSettings())
    for name, value in {"enabled": True, "source": host.fixtures["sd15"].model_name,
                        "ipadapter1_model": host.listed["ip_sd15"], "ipadapter1_image": IMAGE,
                        "ipadapter1_module": ENCODER, "ipadapter1_weight": 0.8}.items():
        values[POSITIONAL_FIELDS.index(name)] = value
    by_dict = _ours(host, host.ours("sd15", [host.unit(weight=0.8)]))
    by_position = _ours(host, {"alwayson_scripts": {SCRIPT: {"args": values}}})
    assert by_position.image == by_dict.image and by_position.infotext == by_dict.infotext
