"""The host's private loading inside a real Forge Neo process, without a server (see neo_probe.py, and
neo_harness.py for the variables).

- Every engine class Neo's loader builds: the host reads its family and latent format from Neo's own guess classes
  (Neo's VAE keeps no scale), and an SD1.5 source is refused with the channel message on every 16-, 32- or
  128-channel one, accepted on the 4-channel SD1.5 / SDXL / SDXL refiner.

- Neo's ``forge_loader`` resets the global model-type flags and the reference latents of the active model; loaded
  through the host (``model_flags_kept``) it leaves them as they were, the very list object included.
- A private engine whose text encoder and UNet Neo's memory manager has loaded: released by the host, every part of
  it dies by reference counting alone and Neo's loaded-model list names none of them; only dropped, what survives
  without a collection is recorded (the answer to whether Neo needs the release at all).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import E2E_DIR, REPO_ROOT, _server_env
from neo_harness import NeoInstall, neo_fixtures


@pytest.fixture(scope="module")
def probe() -> dict:
    install = NeoInstall.from_env()
    if install is None:
        pytest.skip("set DELTA_E2E_NEO to a Forge Neo WebUI folder to run these end-to-end tests")
    problems = install.problems()
    if problems:
        pytest.fail("DELTA_E2E_NEO is set but unusable:\n" + "\n".join(problems), pytrace=False)
    try:
        checkpoint = neo_fixtures(install, ("sd15",))["sd15"].checkpoint
    except LookupError as e:
        pytest.skip(str(e))
    with tempfile.TemporaryDirectory(prefix="delta-e2e-neo-probe-") as data_dir:
        done = subprocess.run([str(install.python), str(E2E_DIR / "neo_probe.py"), str(REPO_ROOT), data_dir,
                               str(checkpoint)], cwd=install.root, env=_server_env(install), capture_output=True,
                              text=True, timeout=1200)
    line = next((x for x in done.stdout.splitlines() if x.startswith("NEO_PROBE ")), None)
    assert done.returncode == 0 and line is not None, (done.stdout + done.stderr)[-6000:]
    result = json.loads(line.removeprefix("NEO_PROBE "))
    print(json.dumps(result, indent=2))
    (install.cache / "logs").mkdir(parents=True, exist_ok=True)
    Path(install.cache / "logs" / "neo-probe.json").write_text(json.dumps(result, indent=2))
    return result


def test_neos_loader_resets_the_active_models_flags_and_the_host_keeps_them(probe, record_property) -> None:
    bare, kept = probe["bare"], probe["kept"]
    record_property("flags_after_bare_load", bare)
    assert (bare["kontext"], bare["klein"], bare["wan"], bare["ref_latents"]) == (False, False, False, 0), \
        "Neo's loader no longer resets the flags: this test shows nothing"
    assert (kept["kontext"], kept["klein"], kept["wan"]) == (True, True, True)
    assert kept["ref_latents_same_list"] and kept["ref_latents"] == 1 and kept["concat_latent_kept"]
    assert kept["ops"] == "ActiveOperations"


def test_a_released_engine_dies_by_reference_counting_and_leaves_neos_list(probe, record_property) -> None:
    released, dropped = probe["released"], probe["dropped"]
    record_property("dropped_alive_without_collection", dropped["alive_without_collection"])
    record_property("dropped_listed_after", dropped["listed_after"])
    assert released["listed_before"], "Neo's memory manager never loaded the engine: this test shows nothing"
    assert released["alive_without_collection"] == [] and released["listed_after"] == []
    assert dropped["alive_after_collection"] == []


def test_every_neo_family_reads_its_latent_format_and_refuses_a_four_channel_source_by_channels(probe) -> None:
    families = probe["families"]
    four = {name for name, f in families.items() if f["format"][1] == 4}
    assert four == {"StableDiffusion", "StableDiffusionXL", "StableDiffusionXLRefiner"}, families
    assert families["StableDiffusion"]["format"] == ["SD1", 4, 0.18215, 0.0]
    assert families["StableDiffusionXL"]["format"] == ["SDXL", 4, 0.13025, 0.0]
    assert families["Flux"]["format"] == ["Flux", 16, 0.3611, 0.1159]
    assert families["Mugen"]["family"] == "mugen" and families["Mugen"]["format"][1] == 32
    for name, f in families.items():
        if name in four:
            assert f["sd1_source"] == "accepted", (name, f)
        else:
            assert f["sd1_source"].startswith("refused: ") and "latent channels" in f["sd1_source"], (name, f)
