"""pytest fixtures for the end-to-end suite against a real AUTOMATIC1111 (see harness.py for the variables).

Everything here is skipped unless DELTA_E2E_A1111 names an install. One server runs at a time; tests that need
the extension linked (`webui`) and tests that need it absent (`webui_plain`) share the pool, so group them to
avoid restarts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ALL_MODELS, A1111Install, ModelFixture, ServerConfig, ServerPool, WebUIClient, WebUIServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the running server's log tail to a failed test's report."""
    report = yield
    pool = getattr(item.config, "_delta_e2e_pool", None)
    if report.failed and pool is not None and pool.current is not None:
        server = pool.current
        process = server.process
        if process is not None and process.poll() is not None:  # -9: killed, most often by the OOM killer
            report.sections.append(("AUTOMATIC1111 exit", f"the server exited with {process.returncode}"))
        report.sections.append(("AUTOMATIC1111 log (tail)", server.log_tail()))
    return report


@pytest.fixture(scope="session")
def a1111_install() -> A1111Install:
    install = A1111Install.from_env()
    if install is None:
        pytest.skip("set DELTA_E2E_A1111 to an AUTOMATIC1111 v1.10.1 install to run the end-to-end tests")
    problems = install.problems()
    if problems:
        pytest.fail("DELTA_E2E_A1111 is set but unusable:\n" + "\n".join(problems), pytrace=False)
    return install


@pytest.fixture(scope="session")
def server_pool(a1111_install: A1111Install, pytestconfig: pytest.Config) -> Iterator[ServerPool]:
    pool = ServerPool(a1111_install)
    pytestconfig._delta_e2e_pool = pool  # type: ignore[attr-defined]  # for the report hook
    try:
        yield pool
    finally:
        pool.close()
        pytestconfig._delta_e2e_pool = None  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def model_fixtures(server_pool: ServerPool) -> dict[str, ModelFixture]:
    """All fixture checkpoints and LoRA files (generated into the cache on first use: minutes)."""
    return server_pool.fixtures(ALL_MODELS)


@pytest.fixture
def webui(server_pool: ServerPool, model_fixtures: dict[str, ModelFixture]) -> WebUIServer:
    """A server with the working tree linked in as the extension sd-webui-delta-sampling."""
    return server_pool.get(ServerConfig(extension=True))


@pytest.fixture
def webui_plain(server_pool: ServerPool, model_fixtures: dict[str, ModelFixture]) -> WebUIServer:
    """A server without the extension: the reference for "identical to the extension not installed"."""
    return server_pool.get(ServerConfig(extension=False))


@pytest.fixture
def client(webui: WebUIServer) -> WebUIClient:
    assert webui.client is not None
    return webui.client


@pytest.fixture
def plain_client(webui_plain: WebUIServer) -> WebUIClient:
    assert webui_plain.client is not None
    return webui_plain.client


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium the browser tests drive (``DELTA_E2E_CHROMIUM``, default /usr/bin/chromium) through Playwright;
    a skip naming what is missing."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright to run the browser test")
    path = os.environ.get("DELTA_E2E_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).is_file():
        pytest.skip(f"no Chromium at {path} (set DELTA_E2E_CHROMIUM)")
    return path
