"""The ControlNet row gate inside a real Forge 2 and a real Forge Neo process, without a server (forge_cn_probe.py):
through each host's own ``calc_cond_uncond_batch`` and ``ControlNet.get_control``, the base rows of a batched call
with a unit equal the call without it bit for bit, the adapted rows equal Forge's own control on every row (to float
rounding), and a gate naming no ControlNet leaves the call plain. Needs DELTA_E2E_FORGE and/or DELTA_E2E_NEO."""

from __future__ import annotations

import json
import subprocess

import pytest
from forge_harness import ForgeInstall
from harness import E2E_DIR, REPO_ROOT, _server_env
from neo_harness import NeoInstall


@pytest.mark.parametrize("host", ["forge", "neo"])
def test_the_row_gate_in_the_hosts_own_batched_call(host: str, record_property) -> None:
    install = (ForgeInstall if host == "forge" else NeoInstall).from_env()
    if install is None:
        pytest.skip(f"set DELTA_E2E_{host.upper()} to run this test")
    done = subprocess.run([str(install.python), str(E2E_DIR / "forge_cn_probe.py"), str(install.root),
                           str(REPO_ROOT), host], cwd=install.root, env=_server_env(install), capture_output=True,
                          text=True, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("FORGE_CN_PROBE ")), None)
    assert done.returncode == 0 and line is not None, (done.stdout + done.stderr)[-6000:]
    result = json.loads(line.removeprefix("FORGE_CN_PROBE "))
    print(host, json.dumps(result))
    for part in ("cond", "uncond"):
        r = result[part]
        record_property(f"{part}_adapted_vs_everywhere", r["adapted_vs_everywhere"])
        assert r["base_rows_equal_plain"] and r["empty_gate_equals_plain"]
        assert r["adapted_moved"] > 1e-3 and r["adapted_vs_everywhere"] < 1e-5
