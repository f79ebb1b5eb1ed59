"""The IP-Adapter row gate inside a real Forge 2 and a real Forge Neo process, without a server (forge_ip_probe.py):
over the patches of each host's own ``apply_ipadapter`` and its ``attention_function``, the base rows of a batched call
equal the plain attention bit for bit, the adapted rows equal Forge's patch run on every row, and Neo's class state is
what the host adapter puts back. Needs DELTA_E2E_FORGE and/or DELTA_E2E_NEO."""

from __future__ import annotations

import json
import subprocess

import pytest
from forge_harness import ForgeInstall
from harness import E2E_DIR, REPO_ROOT, _server_env
from neo_harness import NeoInstall

from lib_delta.hosts.forge.ipadapter import _CLASS_STATE


@pytest.mark.parametrize("host", ["forge", "neo"])
def test_the_ip_adapter_row_gate_over_the_hosts_own_patches(host: str, record_property) -> None:
    install = (ForgeInstall if host == "forge" else NeoInstall).from_env()
    if install is None:
        pytest.skip(f"set DELTA_E2E_{host.upper()} to run this test")
    done = subprocess.run([str(install.python), str(E2E_DIR / "forge_ip_probe.py"), str(install.root),
                           str(REPO_ROOT), host], cwd=install.root, env=_server_env(install), capture_output=True,
                          text=True, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("FORGE_IP_PROBE ")), None)
    assert done.returncode == 0 and line is not None, (done.stdout + done.stderr)[-6000:]
    result = json.loads(line.removeprefix("FORGE_IP_PROBE "))
    print(host, json.dumps(result))
    record_property("adapted_vs_everywhere", result["adapted_vs_everywhere"])
    assert result["patches"] == 16 and result["base_rows_equal_plain"]
    assert result["adapted_moved"] > 1e-3 and result["adapted_vs_everywhere"] < 1e-5
    assert result["apply_is_classmethod"] == (host == "neo")
    assert set(result["class_state_added"]) <= set(_CLASS_STATE)  # all of it is put back after each unit
