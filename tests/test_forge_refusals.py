"""What a latent-channel refusal suggests in Forge 2 and Forge Neo: only the families the running Forge loads whose
latents convert into the target's (Neo dropped SD3 and loads Chroma, Lumina 2, Z-Image; Forge 2 loads SD3 and
Chroma), named before anything loads."""

from __future__ import annotations

import pytest

from tests.fake_forge import harness
from tests.fake_forge.harness import ADAPTED, Loads, failure

pytestmark = pytest.mark.usefixtures("one_thread")
forge, neo = harness.forge, harness.neo  # the fixtures


@pytest.mark.parametrize("flavour, named, not_named", [
    ("forge", "such as SD3, Flux, Chroma)", ("Z-Image", "Wan", "SD1")),
    ("neo", "such as Flux, Chroma, Lumina 2, Z-Image)", ("SD3", "Wan", "Qwen", "SD1")),
])
def test_a_channel_refusal_names_what_this_forge_loads(request, monkeypatch, flavour, named, not_named):
    host = request.getfixturevalue(flavour)
    base = host.checkpoint("base", family="sd1", seed=0)
    target = host.load(host.checkpoint("flux", family="flow", latent_format="flux", seed=2))
    loads = Loads(monkeypatch)
    status, message, _ = failure(lambda: host.run(target, base, {"adapted_prompt": ADAPTED}))
    assert status == 422 and "(SD1, 4 latent channels)" in message and named in message
    assert not any(word in message.split("such as")[1] for word in not_named)
    assert loads.engines == []


@pytest.mark.parametrize("flavour, named", [("forge", ["SD1", "SD2", "SDXL"]), ("neo", ["SD1", "SDXL"])])
def test_a_four_channel_target_suggests_sd2_in_forge_2_only(request, flavour, named):
    request.getfixturevalue(flavour)
    from lib_delta.hosts.forge import models as forge_models

    class Sdxl:
        is_sdxl = True

    assert forge_models.sources_for(Sdxl()) == named
