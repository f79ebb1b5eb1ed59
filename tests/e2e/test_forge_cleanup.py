"""What a generation leaves behind in a real Forge 2, and what it never runs (see forge_harness.py for the variables).

- Switching the source between two SD1.5 checkpoints keeps the server's memory flat: a dropped source engine is
  freed at once (it used to stay until a full garbage collection, one whole engine per switch).
- DS generations leave no tensor behind: once the source is cached, the process's live tensors (counted by the fault
  extension) are the same in number and bytes after every DS and plain request.
- Pickled files never run code: a ``.ckpt`` named as the source (a bare pickle, and one written by ``torch.save``)
  and a ``.pt`` named as a LoRA, each carrying a payload that would create a marker file, are refused with a 422
  that says what to do, the marker never appears, and the next plain image is unchanged.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from forge_harness import ForgeServerPool, open_pool
from harness import SMALL_REQUEST, ServerConfig, WebUIClient, readings_that_changed, tensors_over_pairs
from test_a1111_generation import rss_mb
from test_forge_api import ADAPTED_PROMPT, PROMPT, delta

MODELS = ("sd15",)
TWIN = "delta_e2e_sd15_twin"  # the SD1.5 fixture listed under a second name: another source to switch to
MARKER = Path("/tmp/delta-e2e-forge-pickle-ran")


class Payload:
    def __reduce__(self):
        import os

        return os.system, (f"touch {MARKER}",)


@pytest.fixture(scope="module")
def pool() -> Iterator[ForgeServerPool]:
    yield from open_pool(MODELS)


@pytest.fixture(scope="module")
def fresh(pool: ForgeServerPool) -> bytes:
    server = pool.get(ServerConfig(extension=False, models=MODELS))
    assert server.client is not None
    server.client.set_model(pool.fixtures(MODELS)["sd15"].model_name)
    return server.client.txt2img(PROMPT).image


@pytest.fixture
def server(pool: ForgeServerPool, fresh: bytes):
    server = pool.get(ServerConfig(extension=True, models=MODELS, twins=((TWIN, "sd15"),), faults=True))
    server.client.set_model(pool.fixtures(MODELS)["sd15"].model_name)
    return server


def refused(client: WebUIClient, settings: dict) -> str:
    r = client.session.post(client.base_url + "/sdapi/v1/txt2img",
                            json={"prompt": PROMPT, **SMALL_REQUEST, **delta(**settings)}, timeout=client.timeout)
    assert r.status_code == 422, r.text[:500]
    return r.json()["detail"]


def test_switching_sources_keeps_memory_flat(server, pool: ForgeServerPool, fresh: bytes, record_property) -> None:
    client, pid = server.client, server.process.pid
    sd15 = pool.fixtures(MODELS)["sd15"].model_name
    rss = []
    for source in [sd15, TWIN] * 3:
        client.txt2img(PROMPT, **delta(enabled=True, source=source, adapted_prompt=ADAPTED_PROMPT))
        rss.append(rss_mb(pid))
    record_property("rss_mb_after_each_request", [round(v) for v in rss])
    growth = rss[-1] - rss[1]
    record_property("rss_mb_growth_over_4_switches", round(growth))
    print(f"RSS after each of 6 requests alternating two sources: {[round(v) for v in rss]} MB")
    assert growth < 1000, rss  # one SD1.5 engine in fp32 is about 4 GB here; before, each switch kept one
    assert client.txt2img(PROMPT).image == fresh


def test_generations_leave_no_tensor_behind(server, pool: ForgeServerPool, fresh: bytes, record_property) -> None:
    source = pool.fixtures(MODELS)["sd15"].model_name
    ds = {"prompt": PROMPT, **delta(enabled=True, source=source, adapted_prompt=ADAPTED_PROMPT)}
    readings = tensors_over_pairs(server.client, ds, {"prompt": PROMPT}, pairs=3)
    record_property("live_tensors", readings)
    assert readings[0].get("cpu", {}).get("tensors", 0) > 1000, readings[0]  # the models are among them
    changed = readings_that_changed(readings)
    assert not changed, f"after the warm-up {readings[0]}, changed: {changed}"
    assert server.client.txt2img(PROMPT).image == fresh


def test_pickled_files_are_refused_and_never_run(server, fresh: bytes) -> None:
    import torch

    MARKER.unlink(missing_ok=True)
    ckpts = server.data_dir / "models" / "Stable-diffusion"
    (ckpts / "delta_e2e_bare.ckpt").write_bytes(pickle.dumps({"state_dict": Payload()}))
    buf = io.BytesIO()
    torch.save({"state_dict": {"model.diffusion_model.x": Payload()}}, buf)
    (ckpts / "delta_e2e_saved.ckpt").write_bytes(buf.getvalue())
    loras = server.data_dir / "models" / "Lora"
    (loras / "delta_e2e_payload.pt").write_bytes(buf.getvalue())
    client = server.client
    client.post("/sdapi/v1/refresh-checkpoints")
    client.post("/sdapi/v1/refresh-loras")
    for settings in ({"source": "delta_e2e_bare", "adapted_prompt": ADAPTED_PROMPT},
                     {"source": "delta_e2e_saved", "adapted_prompt": ADAPTED_PROMPT},
                     {"source": TWIN,
                      "loras": [{"name": "delta_e2e_payload", "weight": 1.0}]}):
        detail = refused(client, {"enabled": True, **settings})
        assert "safetensors" in detail, detail
        assert not MARKER.exists(), f"the pickle's code ran ({settings})"
    assert client.txt2img(PROMPT).image == fresh
