"""What a generation leaves behind in a real AUTOMATIC1111 v1.10.1, however it ends (CPU, fp32).

- Switching the source between two SD1.5 checkpoints keeps the server's memory flat: a dropped source is freed at
  once (it used to stay until a full garbage collection, one whole model per switch, until the server died).
- DS generations leave no tensor behind: once the source is cached, the process's live tensors (counted by the fault
  extension) are the same in number and bytes after every DS and plain request.
- Faults injected by a test-only extension (``fault_extension/``): the active model's UNet raising mid-sampling
  (worded as CUDA's out-of-memory error) is an HTTP error and closes the run at once; an interrupt finishes the
  generation and closes it too. After each, the next plain image is byte-identical to a fresh server's.
- A request over a limit, a near-miss name and a pickle the WebUI's safe loader refuses are 422s that load nothing.

Measured values go to the JUnit properties (``record_property``).
"""

from __future__ import annotations

import pickle

import pytest
import requests
from harness import ModelFixture, ServerConfig, ServerPool, WebUIClient, readings_that_changed, tensors_over_pairs
from test_a1111_generation import ADAPTED_PROMPT, PROMPT, SOAK, error_of, rss_mb, scripts

TWIN = "delta_e2e_sd15_twin"  # the SD1.5 fixture listed under a second name: another source to switch to
SMALL = {"prompt": PROMPT, "negative_prompt": "", "seed": 1, "width": 64, "height": 64, "cfg_scale": 7.0,
         "sampler_name": "Euler", **SOAK}  # client.txt2img's defaults, for requests that must fail


@pytest.fixture(scope="module")
def fixtures(model_fixtures: dict[str, ModelFixture]) -> dict[str, ModelFixture]:
    return model_fixtures


@pytest.fixture(scope="module")
def fresh(server_pool: ServerPool, fixtures: dict[str, ModelFixture]) -> bytes:
    server = server_pool.get(ServerConfig(extension=False, models=("sd15",)))
    assert server.client is not None
    return server.client.txt2img(PROMPT, **SOAK).image


@pytest.fixture
def server(server_pool: ServerPool, fresh: bytes):
    return server_pool.get(ServerConfig(models=("sd15",), twins=((TWIN, "sd15"),), faults=True))


def state(client: WebUIClient) -> dict:
    return client.get("/delta-e2e/state")


def adapted(source: str) -> dict:
    return scripts({"enabled": True, "source": source, "adapted_prompt": ADAPTED_PROMPT})


def test_switching_sources_keeps_memory_flat(server, fixtures: dict[str, ModelFixture], fresh: bytes,
                                             record_property) -> None:
    client, pid = server.client, server.process.pid
    sources = [fixtures["sd15"].model_name, TWIN] * 3
    rss = []
    for source in sources:
        client.txt2img(PROMPT, **SOAK, **adapted(source))
        assert state(client) == {"run_open": False, "sources": [source]}
        rss.append(rss_mb(pid))
    record_property("rss_mb_after_each_request", [round(v) for v in rss])
    growth = rss[-1] - rss[1]
    record_property("rss_mb_growth_over_4_switches", round(growth))
    print(f"RSS after each of 6 requests alternating two sources: {[round(v) for v in rss]} MB")
    # one SD1.5 source in fp32 is about 4 GB here; before, each switch added one
    assert growth < 1000, rss
    assert client.txt2img(PROMPT, **SOAK).image == fresh


def test_generations_leave_no_tensor_behind(server, fixtures: dict[str, ModelFixture], fresh: bytes,
                                            record_property) -> None:
    ds = {"prompt": PROMPT, **SOAK, **adapted(fixtures["sd15"].model_name)}
    readings = tensors_over_pairs(server.client, ds, {"prompt": PROMPT, **SOAK}, pairs=3)
    record_property("live_tensors", readings)
    assert readings[0].get("cpu", {}).get("tensors", 0) > 1000, readings[0]  # the models are among them
    changed = readings_that_changed(readings)
    assert not changed, f"after the warm-up {readings[0]}, changed: {changed}"
    assert server.client.txt2img(PROMPT, **SOAK).image == fresh


@pytest.mark.parametrize("fault", ["FAULT_RAISE_AT_3", "FAULT_INTERRUPT_AT_3"])
def test_a_fault_mid_sampling_closes_the_run_at_once(server, fixtures: dict[str, ModelFixture], fresh: bytes,
                                                     fault: str) -> None:
    client = server.client
    payload = {**SMALL, "prompt": f"{PROMPT} {fault}", "steps": 4, **adapted(fixtures["sd15"].model_name)}
    if "RAISE" in fault:
        r = error_of(client, payload)
        assert r.status_code == 500 and "out of memory" in r.text, r.text[:500]
        assert "set CFG mode to cond" in r.json()["detail"], r.text[:800]  # and the ways to make room
    else:
        client.post("/sdapi/v1/txt2img", payload)  # interrupted: the WebUI returns what it has
    assert state(client)["run_open"] is False, "the run outlived its generation"
    assert client.txt2img(PROMPT, **SOAK).image == fresh


def test_refusals_load_nothing(server, fixtures: dict[str, ModelFixture], fresh: bytes, tmp_path) -> None:
    client = server.client
    client.set_options(delta_sampling_cache="free")  # start from nothing loaded
    client.txt2img(PROMPT, **SOAK, **adapted(fixtures["sd15"].model_name))
    assert state(client)["sources"] == []
    client.set_options(delta_sampling_cache="ram", delta_sampling_max_checkpoints=1)
    try:
        sd15 = fixtures["sd15"].model_name
        cases = [
            ({"enabled": True, "source": sd15, "groups": [{"checkpoint": TWIN}]}, "at most 1"),
            ({"enabled": True, "source": sd15[:-2], "adapted_prompt": "x"}, f"Closest: '{sd15}"),
        ]
        for args, words in cases:
            r = error_of(client, {**SMALL, **scripts(args)})
            assert r.status_code == 422 and words in r.json()["detail"], r.text[:500]
            assert state(client)["sources"] == [], args
    finally:
        client.set_options(delta_sampling_max_checkpoints=3)
    assert client.txt2img(PROMPT, **SOAK).image == fresh


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch /tmp/delta-e2e-pickle-ran",)


def test_an_unsafe_pickle_is_refused_and_never_runs(server, fresh: bytes) -> None:
    import pathlib

    marker = pathlib.Path("/tmp/delta-e2e-pickle-ran")
    marker.unlink(missing_ok=True)
    ckpt_dir = server.data_dir / "models" / "Stable-diffusion"
    (ckpt_dir / "delta_e2e_payload.ckpt").write_bytes(pickle.dumps({"state_dict": _Payload()}))
    client = server.client
    client.post("/sdapi/v1/refresh-checkpoints")
    r = error_of(client, {**SMALL, **adapted("delta_e2e_payload")})
    assert r.status_code == 422 and "unsafe pickle" in r.json()["detail"], r.text[:500]
    assert not marker.exists(), "the pickle's code ran"
    assert client.txt2img(PROMPT, **SOAK).image == fresh
    with pytest.raises(requests.HTTPError):  # and the server is still answering errors as errors
        client.post("/sdapi/v1/txt2img", {**SMALL, **adapted("delta_e2e_payload")})
