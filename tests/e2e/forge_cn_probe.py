"""Inside a real Forge 2 or Forge Neo process, without its server: the host's ControlNet row gate through the host's
own ``calc_cond_uncond_batch`` and ``ControlNet.get_control``.

Run by test_forge_controlnet_inprocess.py with the host's python, in its WebUI folder:
    python forge_cn_probe.py <webui folder> <repo root> <forge|neo>
and prints one JSON object. A tiny ControlNet of the real key layout (devkit) in Forge's own ``ControlNet`` object, a
model that adds each residual's mean to its rows, and one batched call of two images × [base | adapted] rows, cond
and uncond, four ways: plain (no control), the control with the row gate, the control on every row (Forge's own way)
and the gate naming no ControlNet. Reported: whether the base rows equal the plain call bit for bit, how far the
adapted rows are from the control on every row, how far they moved, and whether the empty gate equals plain.
"""

from __future__ import annotations

import json
import os
import sys


def init(root: str, repo: str, host: str) -> None:
    os.chdir(root)
    extra = [os.path.join(root, "modules_forge", "packages")] if host == "neo" else \
        [os.path.join(root, "packages_3rdparty")]
    sys.path[:0] = [root, repo, *extra]
    sys.argv = ["forge_cn_probe", "--cpu"] if host == "neo" else ["forge_cn_probe", "--always-cpu"]
    os.environ["IGNORE_CMD_ARGS_ERRORS"] = "1"


def main() -> None:
    root, repo, host = sys.argv[1:4]
    init(root, repo, host)
    import backend.nn.cnets.cldm  # noqa: F401  (Neo: cldm first, or its import cycle with controlnet fails)
    import torch
    from backend.patcher.controlnet import ControlNet
    from backend.sampling.condition import ConditionCrossAttn
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    from devkit.controlnet import build_controlnet, fill_zero_convs
    from lib_delta.hosts.forge.control import adapted_rows

    torch.manual_seed(0)
    net = fill_zero_convs(build_controlnet("sd1"), torch.Generator().manual_seed(1)).requires_grad_(False)

    class Predictor:
        def timestep(self, sigma):
            return sigma * 10

        def calculate_input(self, sigma, x):
            return x

        def percent_to_sigma(self, percent):
            return 14.6 * (1 - percent)

    class Model:
        predictor = Predictor()

        def memory_required(self, shape):
            return 0

        def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options=None, **kwargs):
            out = x.clone()
            for key in ("middle", "output"):
                for c in (control or {}).get(key, []):
                    if c is not None:
                        out = out + c.float().mean(dim=(1, 2, 3), keepdim=True)
            return out

    model = Model()
    cnet = ControlNet(net, load_device=torch.device("cpu")).copy()
    cnet.set_cond_hint(torch.rand(1, 3, 64, 64), 1.0, (0.0, 1.0))
    cnet.pre_run(model, model.predictor.percent_to_sigma)
    b = 2  # images; rows [base b | adapted b]
    x, sigma, ctx = torch.randn(2 * b, 4, 8, 8), torch.full((2 * b,), 5.0), torch.randn(2 * b, 77, 32)

    def entries(control):
        e = {"model_conds": {"c_crossattn": ConditionCrossAttn(ctx)}}
        return [{**e, "control": control}] if control is not None else [e]

    def call(control, owners=None):
        options = {} if owners is None else \
            {"transformer_options": {"controlnet_model_function_wrapper": adapted_rows(owners, b)}}
        with torch.no_grad():
            return calc_cond_uncond_batch(model, entries(control), entries(control), x, sigma, options)

    plain, gated, everywhere, empty = call(None), call(cnet, {id(cnet): [1]}), call(cnet), call(cnet, {})
    out = {}
    for i, name in enumerate(("cond", "uncond")):
        out[name] = {"base_rows_equal_plain": bool(torch.equal(gated[i][:b], plain[i][:b])),
                     "adapted_vs_everywhere": float((gated[i][b:] - everywhere[i][b:]).abs().max()),
                     "adapted_moved": float((gated[i][b:] - plain[i][b:]).abs().max()),
                     "empty_gate_equals_plain": bool(torch.equal(empty[i], plain[i]))}
    print("FORGE_CN_PROBE " + json.dumps(out))


if __name__ == "__main__":
    main()
