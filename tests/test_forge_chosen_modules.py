"""A source checkpoint that holds the diffusion model alone (Flux and Chroma files, GGUF, Neo's newer families
often ship so): Forge builds such a model with the text encoders and VAE chosen in 'VAE / Text Encoder', and the
host builds the source with them too, keys its pool by them, and names them when they do not complete it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_delta.errors import DeltaError
from tests.fake_forge import backend, harness, webui
from tests.fake_forge.harness import ADAPTED, failure

forge, neo = harness.forge, harness.neo  # the fixtures


@pytest.fixture(params=["forge", "neo"])
def host(request):
    return request.getfixturevalue(request.param)


def flux_pair(host) -> tuple[str, str]:
    """One Flux model twice: as a whole checkpoint and as its diffusion model alone."""
    spec = {"family": "flow", "latent_format": "flux", "seed": 2}
    return host.checkpoint("flux", **spec), host.checkpoint("flux_dit", diffusion_only=True, **spec)


def text_encoder(host, name: str = "clip_l") -> str:
    path = host.tmp / f"{name}.safetensors"
    backend.write_text_encoder(path)
    return str(path)


def loads_of(name: str) -> list[tuple[str, ...]]:
    """The modules each build of the named checkpoint was given."""
    return [modules for path, modules in backend.loads if Path(path).stem == name]


def test_a_source_of_the_diffusion_model_alone_is_built_with_the_chosen_modules(host):
    from lib_delta.hosts.forge import models as forge_models

    whole, alone = flux_pair(host)
    target = host.load(whole)
    module = text_encoder(host)
    webui.opts.forge_additional_modules = [module]
    plain = host.generate(target)
    with_whole = host.run(target, whole, {"adapted_prompt": ADAPTED})
    with_alone = host.run(target, alone, {"adapted_prompt": ADAPTED})
    assert not torch.equal(with_alone, plain), "the delta moves the image"
    assert torch.equal(with_alone, with_whole), "the same model, built from its parts"
    assert loads_of("flux_dit") == [(module,)] and loads_of("flux")[-1] == ()  # a whole file takes no module
    assert [e.key[2:] for e in forge_models.cached()] == [(module,)]
    assert torch.equal(host.generate(target), plain)


def test_other_modules_chosen_build_the_source_again(host):
    from lib_delta.hosts.forge import models as forge_models

    whole, alone = flux_pair(host)
    target = host.load(whole)
    first, second = text_encoder(host, "clip_l"), text_encoder(host, "clip_l_other")
    webui.opts.forge_additional_modules = [first]
    host.run(target, alone, {"adapted_prompt": ADAPTED})
    host.run(target, alone, {"adapted_prompt": ADAPTED})  # kept between generations: not built again
    webui.opts.forge_additional_modules = [second]
    host.run(target, alone, {"adapted_prompt": ADAPTED})
    assert loads_of("flux_dit") == [(first,), (second,)]
    assert [e.key[2:] for e in forge_models.cached()] == [(second,)], "the source built with the old ones is gone"


def test_without_modules_the_refusal_says_where_to_choose_them(host):
    from lib_delta.hosts.forge import models as forge_models

    whole, alone = flux_pair(host)
    target = host.load(whole)
    plain = host.generate(target)
    status, message, kind = failure(lambda: host.run(target, alone, {"adapted_prompt": ADAPTED}))
    assert kind == DeltaError.__name__ and status == 422
    assert "'flux_dit.safetensors' holds the diffusion model alone" in message
    assert "'VAE / Text Encoder'" in message and "You do not have CLIP state dict!" in message
    assert forge_models.cached() == []
    assert torch.equal(host.generate(target), plain)


def test_modules_that_do_not_complete_it_are_named(host):
    from lib_delta.hosts.forge import models as forge_models

    whole, alone = flux_pair(host)
    target = host.load(whole)
    vae = host.tmp / "ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(vae))  # a VAE alone: no text encoder
    webui.opts.forge_additional_modules = [str(vae)]
    plain = host.generate(target)
    status, message, _ = failure(lambda: host.run(target, alone, {"adapted_prompt": ADAPTED}))
    assert status == 422 and "with the files chosen in 'VAE / Text Encoder' (ae.safetensors)" in message
    assert "text encoders and VAE of its family" in message
    assert forge_models.cached() == []
    assert torch.equal(host.generate(target), plain)


def test_a_whole_checkpoint_ignores_the_chosen_modules(host):
    """The box holds the active model's files: a source with its own text encoders (an SD1.5 source behind a Flux
    target) is built from its own file alone, and keyed without them."""
    from lib_delta.hosts.forge import models as forge_models

    whole, _ = flux_pair(host)
    webui.opts.forge_additional_modules = [text_encoder(host)]
    target = host.load(whole)
    host.run(target, whole, {"adapted_prompt": ADAPTED})
    assert loads_of("flux")[-1] == ()
    assert [len(e.key) for e in forge_models.cached()] == [2]
