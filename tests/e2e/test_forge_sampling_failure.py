"""A failure while sampling in a real Forge 2 and Forge Neo (see forge_harness.py and neo_harness.py for the
variables): an out-of-memory error in the middle of a DS generation, raised by the fault extension in the target's
UNet at its third call (where a memory cap made it on the GPU, run Q in docs/e2e.md), comes back as a 500 whose
``detail`` names it and the ways to make room, on a connection the server keeps; the run is closed at once and the
next plain image is the fresh server's. Before, Forge's catch-all handler answered the same 500 and then re-raised
the exception to the server, which logged it as an error of the app and dropped the connection.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from forge_harness import serve
from harness import SMALL_REQUEST, ServerConfig, WebUIClient
from test_forge_api import ADAPTED_PROMPT, PROMPT, delta
from test_forge_split_source import HOSTS

MODELS = ("sd15",)


@pytest.fixture(scope="module", params=list(HOSTS))
def forge(request) -> Iterator[tuple[WebUIClient, str, bytes]]:
    """The host's server with the extension and the fault extension, the source's name and the fresh server's image."""
    kind, pool_class, variable, what = HOSTS[request.param]
    pools = serve(kind.from_env(), pool_class, MODELS, variable, what)
    pool = next(pools)
    try:
        sd15 = pool.fixtures(MODELS)["sd15"].model_name
        plain = pool.get(ServerConfig(extension=False, models=MODELS))
        plain.client.set_model(sd15)
        fresh = plain.client.txt2img(PROMPT).image
        server = pool.get(ServerConfig(extension=True, models=MODELS, faults=True))
        server.client.set_model(sd15)
        yield server.client, sd15, fresh
    finally:
        pools.close()


def test_out_of_memory_mid_sampling_is_answered_and_the_server_goes_on(forge) -> None:
    client, source, fresh = forge
    payload = {**SMALL_REQUEST, "prompt": f"{PROMPT} FAULT_RAISE_AT_3",
               **delta(enabled=True, source=source, adapted_prompt=ADAPTED_PROMPT)}
    r = client.session.post(client.base_url + "/sdapi/v1/txt2img", json=payload, timeout=client.timeout)
    assert r.status_code == 500 and r.headers.get("content-type", "").startswith("application/json"), r.text[:500]
    detail = r.json()["detail"]
    assert "out of memory" in detail and "set CFG mode to cond" in detail and "--medvram" in detail, detail
    # the same session: the server kept the connection it answered on
    assert client.get("/delta-e2e/state")["run_open"] is False, "the run outlived its generation"
    assert client.txt2img(PROMPT).image == fresh
