"""Baseline for ControlNet: each host's own ControlNet, with the ControlNet fixture, moves the image.

Every test of a ControlNet on the source compares the extension's image with the host's own ControlNet unit, and such
an identity is only as sharp as the unit's effect: a ControlNet that changed nothing (a fixture with its zero
convolutions left at zero) would let any of them pass. So, on WebUIs without this extension (no Delta Sampling
involved), with the fixture `cn_sd15` (tests/e2e/fixtures.py) on the SD1.5 fixture checkpoint, 64x64, 4 Euler steps:

- the host lists the fixture in `/controlnet/model_list`, as "<stem> [<hash>]";
- one unit moves the image to MOVED_BELOW_DB or less from the plain one, with preprocessor "none" and with "canny",
  and the infotext records the unit;
- the same request twice gives byte-identical PNGs;
- "none" and "canny" give different images: the hint reaches the network.

Hosts: AUTOMATIC1111 v1.10.1 with sd-webui-controlnet linked in (DELTA_E2E_A1111 and DELTA_E2E_CONTROLNET) and
Forge 2 with its built-in ControlNet (DELTA_E2E_FORGE; DELTA_E2E_CONTROLNET only to build the fixture). One WebUI runs
at a time: all AUTOMATIC1111 tests, then all Forge tests.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from forge_harness import open_pool
from harness import (
    Generation,
    ModelFixture,
    ServerConfig,
    ServerPool,
    WebUIClient,
    control_image,
    controlnet_from_env,
    controlnet_units,
    decode_image,
    psnr,
)

PROMPT = "a photo of a cat sitting on a red chair"
CHECKPOINT, CONTROLNET = "sd15", "cn_sd15"
# The bar: a unit must move the image this far for the identity tests (>= 35 dB to the host's own unit)
# to tell a ControlNet applied from one left out.
MOVED_BELOW_DB = 25.0
HINT_MATTERS_BELOW_DB = 35.0  # "none" (the filled square) against "canny" (its outline)
CONTROL_IMAGE = base64.b64encode(control_image()).decode()
# The preprocessors' names as each host's API takes them: sd-webui-controlnet's "none" is lower-case; Forge
# registers "None", and a lookup of "none" there finds nothing (and the request fails).
MODULES = {"a1111": {"none": "none", "canny": "canny"}, "forge": {"none": "None", "canny": "canny"}}
LISTED_NAME = re.compile(r"^(?P<stem>.+) \[(?P<hash>[0-9a-f]{8})\]$")


@dataclass
class Host:
    """One host with the ControlNet fixture in place, and the images made so far (each made once)."""

    name: str
    client: WebUIClient
    checkpoint: ModelFixture
    controlnet: ModelFixture
    listed: list[str]
    model: str  # the fixture as the host lists it, which is what a unit names
    plain: Generation
    made: dict[str, Generation] = field(default_factory=dict)

    def unit(self, module: str, **fields) -> dict:
        return {"enabled": True, "model": self.model, "image": CONTROL_IMAGE, "module": MODULES[self.name][module],
                "weight": 1.0, **fields}

    def generate(self, module: str) -> Generation:
        return self.client.txt2img(PROMPT, **controlnet_units(self.unit(module)))

    def with_unit(self, module: str) -> Generation:
        if module not in self.made:
            self.made[module] = self.generate(module)
        return self.made[module]


def _host(name: str, client: WebUIClient, fixtures: dict[str, ModelFixture]) -> Host:
    checkpoint, controlnet = fixtures[CHECKPOINT], fixtures[CONTROLNET]
    client.set_model(checkpoint.model_name)
    listed = client.get("/controlnet/model_list")["model_list"]
    named = [m for m in listed if (LISTED_NAME.match(m) or {"stem": m})["stem"] == controlnet.model_name]
    if len(named) != 1:
        raise LookupError(f"{name} lists the ControlNet fixture {controlnet.model_name!r} not once: {listed}")
    return Host(name, client, checkpoint, controlnet, listed, named[0], client.txt2img(PROMPT))


def _a1111(request: pytest.FixtureRequest) -> Iterator[Host]:
    if controlnet_from_env() is None:
        pytest.skip("set DELTA_E2E_CONTROLNET to an sd-webui-controlnet checkout to run the AUTOMATIC1111 ControlNet "
                    "tests")
    pool: ServerPool = request.getfixturevalue("server_pool")
    try:
        server = pool.get(ServerConfig(extension=False, models=(CHECKPOINT,), controlnet_extension=True,
                                       controlnets=(CONTROLNET,)))
        assert server.client is not None
        yield _host("a1111", server.client, pool.fixtures((CHECKPOINT, CONTROLNET)))
    finally:
        pool.close()  # one WebUI at a time: Forge comes next


def _forge(request: pytest.FixtureRequest) -> Iterator[Host]:
    a1111 = getattr(request.config, "_delta_e2e_pool", None)  # an AUTOMATIC1111 left running by an earlier module
    if a1111 is not None:
        a1111.close()
    pools = open_pool((CHECKPOINT, CONTROLNET))
    pool = next(pools)  # skips without DELTA_E2E_FORGE, or when the fixtures are neither cached nor buildable
    try:
        server = pool.get(ServerConfig(extension=False, models=(CHECKPOINT,), controlnets=(CONTROLNET,)))
        assert server.client is not None
        yield _host("forge", server.client, pool.fixtures((CHECKPOINT, CONTROLNET)))
    finally:
        pools.close()  # stops the server


@pytest.fixture(scope="module", params=["a1111", "forge"])
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    """The host's server with the ControlNet fixture, the checkpoint fixture active and its plain image made.
    Module-scoped and parametrized: pytest runs every test for one host, then stops it before starting the next."""
    yield from (_a1111 if request.param == "a1111" else _forge)(request)


def test_the_host_lists_the_fixture_with_its_hash(host: Host, record_property) -> None:
    record_property("model_list", host.listed)
    print(f"{host.name}: /controlnet/model_list = {host.listed}")
    match = LISTED_NAME.match(host.model)
    assert match is not None and match["stem"] == host.controlnet.model_name, host.listed


@pytest.mark.parametrize("module", ["none", "canny"])
def test_a_unit_moves_the_image(host: Host, module: str, record_property) -> None:
    gen = host.with_unit(module)
    assert gen.param("Model") == host.checkpoint.model_name, gen.infotext
    recorded = gen.param("ControlNet 0") or ""
    assert host.model in recorded, gen.infotext  # the unit ran, with the fixture
    pixels = decode_image(gen.image)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 5
    db = psnr(host.plain.image, gen.image)
    record_property("psnr_db", round(db, 2))
    record_property("seconds", round(gen.seconds, 1))
    record_property("seconds_plain", round(host.plain.seconds, 1))
    record_property("images_returned", len(gen.images))
    record_property("infotext_unit", recorded)
    print(f"{host.name}: PSNR(plain, ControlNet {module}) = {db:.2f} dB; {gen.seconds:.1f}s (plain "
          f"{host.plain.seconds:.1f}s); {len(gen.images)} images returned; ControlNet 0: {recorded}")
    assert db <= MOVED_BELOW_DB


@pytest.mark.parametrize("module", ["none", "canny"])
def test_the_same_request_twice_is_byte_identical(host: Host, module: str) -> None:
    first = host.with_unit(module)
    again = host.generate(module)
    assert again.image == first.image


def test_the_hint_reaches_the_network(host: Host, record_property) -> None:
    db = psnr(host.with_unit("none").image, host.with_unit("canny").image)
    record_property("psnr_db", round(db, 2))
    print(f"{host.name}: PSNR(ControlNet none, ControlNet canny) = {db:.2f} dB")
    assert db < HINT_MATTERS_BELOW_DB
