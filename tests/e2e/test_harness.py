"""The harness itself: the extension is linked into a throwaway data dir (or not), and all of it goes on stop."""

from __future__ import annotations

from harness import EXTENSION_SCRIPT_TITLE, REPO_ROOT, ServerConfig, ServerPool


def _txt2img_scripts(server) -> list[str]:
    return server.client.get("/sdapi/v1/scripts")["txt2img"]


def test_plain_server_has_no_extension(server_pool: ServerPool) -> None:
    server = server_pool.get(ServerConfig(extension=False))
    assert server.extension_link is None
    assert EXTENSION_SCRIPT_TITLE.lower() not in _txt2img_scripts(server)


def test_extension_is_linked_then_cleaned_up(server_pool: ServerPool) -> None:
    server = server_pool.get(ServerConfig(extension=True))
    assert server.client is not None and server.extension_link is not None and server.data_dir is not None
    assert server.extension_link.resolve() == REPO_ROOT
    assert EXTENSION_SCRIPT_TITLE.lower() in _txt2img_scripts(server)  # the WebUI loaded the working tree's script
    link, data_dir = server.extension_link, server.data_dir

    server_pool.close()
    assert not link.is_symlink() and not data_dir.exists()
    assert (REPO_ROOT / "tests" / "e2e" / "harness.py").is_file()  # the working tree behind the link is untouched
