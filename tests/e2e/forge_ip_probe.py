"""Inside a real Forge 2 or Forge Neo process, without its server: the IP-Adapter row gate over the host's own
``IPAdapterApply.apply_ipadapter`` patches and ``attention_function``.

Run by test_forge_ipadapter_inprocess.py with the host's python, in its WebUI folder:
    python forge_ip_probe.py <webui folder> <repo root> <forge|neo>
and prints one JSON object. A small IP-Adapter of the real SD1.5 key layout (16 cross-attentions, plain image
projection) applied by Forge's own ``apply_ipadapter`` (the image embedding given, so no encoder runs) to a patcher
stand-in; then one batched attention call of two images × [base | adapted] rows, cond and uncond, through each of
Forge's 16 patches three ways: the gate (the patch on the adapted rows only), the patch on every row (Forge's own
way) and plain attention. Reported: whether the base rows equal the plain attention bit for bit, how far the adapted
rows are from the patch on every row, how far they moved, and whether Neo's class state was left on the class.
"""

from __future__ import annotations

import inspect
import json
import os
import sys


def init(root: str, repo: str, host: str) -> None:
    os.chdir(root)
    extra = [os.path.join(root, "modules_forge", "packages")] if host == "neo" else \
        [os.path.join(root, "packages_3rdparty")]
    sys.path[:0] = [root, repo, os.path.join(root, "extensions-builtin", "sd_forge_ipadapter"), *extra]
    sys.argv = ["forge_ip_probe", "--cpu"] if host == "neo" else ["forge_ip_probe", "--always-cpu"]
    os.environ["IGNORE_CMD_ARGS_ERRORS"] = "1"


def main() -> None:
    root, repo, host = sys.argv[1:4]
    init(root, repo, host)
    import torch
    from backend.attention import attention_function
    from lib_ipadapter.IPAdapterPlus import IPAdapterApply

    from lib_delta.hosts.forge.ip_rows import gated

    ctx, clip, inner, heads = 32, 24, 64, 2
    g = torch.Generator().manual_seed(0)
    adapter = {"image_proj": {"proj.weight": torch.randn(4 * ctx, clip, generator=g) / clip ** 0.5,
                              "proj.bias": torch.randn(4 * ctx, generator=g) * 0.02,
                              "norm.weight": torch.ones(ctx), "norm.bias": torch.randn(ctx, generator=g) * 0.02},
               "ip_adapter": {f"{2 * n + 1}.to_{kind}_ip.weight": torch.randn(inner, ctx, generator=g) / ctx ** 0.5
                              for n in range(16) for kind in ("k", "v")}}

    class Predictor:
        def percent_to_sigma(self, percent):
            return 999999999.9 if percent <= 0 else 0.0 if percent >= 1 else 14.6 * (1 - percent)

    class Patcher:
        def __init__(self):
            self.model = type("Model", (), {"predictor": Predictor()})()
            self.model_options = {"transformer_options": {}}

        def clone(self):
            return Patcher()

    embeds = torch.stack([torch.randn(1, clip, generator=g), torch.zeros(1, clip)])
    state_before = {k for k in vars(IPAdapterApply)}
    classmethod_ = isinstance(inspect.getattr_static(IPAdapterApply, "apply_ipadapter"), classmethod)
    apply = IPAdapterApply.apply_ipadapter if classmethod_ else IPAdapterApply().apply_ipadapter
    with torch.no_grad():
        work = apply(ipadapter=adapter, model=Patcher(), weight=0.8, embeds=embeds, weight_type="original",
                     noise=0.0, unfold_batch=False, attn_mask=None, start_at=0.0, end_at=1.0)
    work = work[0] if isinstance(work, tuple) else work
    patches = work.model_options["transformer_options"]["patches_replace"]["attn2"]
    b = 2  # images; each chunk's rows [base b | adapted b]
    rows = 2 * 2 * b
    q, k, v = (torch.randn(rows, n, inner, generator=g) for n in (16, 77, 77))
    extra = {"cond_or_uncond": [0, 1], "sigmas": torch.full((rows,), 5.0), "n_heads": heads,
             "original_shape": [rows, 4, 4, 4]}
    gates = gated([(patches, [1])], b)
    adapted = torch.cat([torch.arange(b, 2 * b), torch.arange(3 * b, 4 * b)])
    base = torch.cat([torch.arange(0, b), torch.arange(2 * b, 3 * b)])
    worst, moved, base_equal = 0.0, float("inf"), True
    with torch.no_grad():
        for key, patch in patches.items():
            plain = attention_function(q, k, v, heads)
            got = gates[key](q, k, v, extra)
            everywhere = patch(q, k, v, extra)
            base_equal &= bool(torch.equal(got[base], plain[base]))
            worst = max(worst, float((got[adapted] - everywhere[adapted]).abs().max()))
            moved = min(moved, float((got[adapted] - plain[adapted]).abs().max()))
    out = {"patches": len(patches), "base_rows_equal_plain": base_equal, "adapted_vs_everywhere": worst,
           "adapted_moved": moved, "apply_is_classmethod": classmethod_,
           "class_state_added": sorted({k for k in vars(IPAdapterApply)} - state_before)}
    print("FORGE_IP_PROBE " + json.dumps(out))


if __name__ == "__main__":
    main()
