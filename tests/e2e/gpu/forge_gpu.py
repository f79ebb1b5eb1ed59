"""The Forge 2 phases of the GPU end-to-end run (``gpu_e2e.py --host forge``): Forge on CUDA as its users run it, fp16
weights and PyTorch's SDP attention, its memory manager deciding what stays on the GPU. Forge's host neither records
the source as a CUDA graph nor folds LoRA layers (its layers are its own operations, moved by that manager), so there
is no graph/fold variant here; the probe's path counters must stay at zero.

- ``forge-id``: SD1.5 as its own source with its LoRA at λ = 1 against Forge's own ``<lora:L:1>``, at 512 and 1024 px,
  20 Euler steps; no non-finite step, PSNR recorded; the DS request twice (repeatable), then plain again (Forge's
  own image: nothing of the delta outlives its generation).
- ``forge-sdxl``: the full-size SDXL fixture as the target, the SD1.5 fixture and its LoRA as the source, 1024 px,
  30 steps: wall time and peak VRAM for plain, Forge's own LoRA on the target, DS default, DS cond-only, DS window
  0-0.5 and base-first 0-0.25, interleaved; the target and the source both held on the GPU by Forge's memory manager
  during the DS steps; then 20 alternating DS/plain generations (RSS and VRAM growth <= 1 %), and (GPU) an
  out-of-memory error forced in a DS generation by a per-process cap: an HTTP error naming the ways out, VRAM back
  to its level, the next plain image the fresh server's.
- ``forge-flux``: a full-size random-weight Flux.1-dev (``flux_fixture.py``, built on the machine: Forge loads no
  smaller Flux) in the layout its users keep, the diffusion model alone with its VAE, CLIP-L and T5-XXL chosen in
  'VAE / Text Encoder'; as its own source with its LoRA at λ = 1 against Forge's own ``<lora:L:1>``, 512 px, 8
  Euler steps, CFG 1 with the distilled guidance 3.5 (Flux-dev's defaults): no non-finite step, PSNR recorded,
  peak VRAM of plain, own LoRA and DS (two 12 B models), then plain again (Forge's own image). On the CPU a
  smaller Flux in the same layout (reduced_flux.py: width 768, 4 + 8 blocks, T5 at 2 layers) served from a copy of
  Forge's tree that sizes Flux so (256 px, 4 steps): the same Flux path through Forge's loader, predictor and
  schedule, its module box and the extension, at a size the CPU runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import flux_fixture
import harness
import reduced_flux
from forge_harness import FORGE_ARGS, ForgeInstall, ForgeServer, forge_fixtures
from gpu_e2e import (
    HERE,
    IDENTICAL_ABOVE_DB,
    MIB,
    PROMPT,
    SDXL_REQUESTS,
    Probed,
    Report,
    alternate,
    db,
    delta,
    flat,
    measured,
    phase_oom,
    scripts,
    server,
    time_for,
    timing_rounds,
)
from harness import Generation, ModelFixture, WebUIClient, psnr

# GPU: Forge's defaults (fp16, its own choice of what stays on the GPU) with PyTorch's SDP attention named; nothing
# downloaded, loopback only
FORGE_GPU_ARGS = ("--skip-prepare-environment", "--skip-install", "--skip-version-check",
                  "--skip-python-version-check", "--api", "--no-download-sd-model", "--disable-console-progressbars",
                  "--attention-pytorch")
FORGE_CPU_ARGS = (*FORGE_ARGS, "--skip-python-version-check")


class ProbedForgeServer(Probed, ForgeServer):
    pass


def forge_install(device: str) -> ForgeInstall | None:
    """DELTA_E2E_FORGE with the flags of the device."""
    install = ForgeInstall.from_env()
    if install is None:
        return None
    return dataclasses.replace(install, launch_args=FORGE_GPU_ARGS if device == "gpu" else FORGE_CPU_ARGS)


def fixtures(install: ForgeInstall, models: tuple[str, ...]) -> dict[str, ModelFixture]:
    """The fixtures as Forge reads them (built with DELTA_E2E_A1111 when missing)."""
    return forge_fixtures(install, models)


def resident_during(c: WebUIClient, prompt: str, **params: Any) -> tuple[Generation, dict]:
    """One generation with the probe's watch of Forge's loaded models on: the step with the most models fully on
    their load device, and the list after the generation."""
    c.post("/delta-gpu/resident?on=1")
    g = c.txt2img(prompt, **params)
    seen = c.get("/delta-gpu/resident")
    c.post("/delta-gpu/resident?on=0")
    return g, seen


def unets(loaded: list[dict]) -> list[dict]:
    """Forge's diffusion models among its loaded ones (KModel wraps each checkpoint's UNet)."""
    return [m for m in loaded if m["model"] == "KModel"]


def phase_forge_id(r: Report, install: ForgeInstall, fx: dict[str, ModelFixture], a: argparse.Namespace) -> None:
    r.begin("forge-id")
    sd15 = fx["sd15"]
    with server(install, fx, ("sd15",), r.out / "server-forge-id.log", kind=ProbedForgeServer) as s:
        c = s.client
        assert c is not None
        c.set_model(sd15.model_name)
        r.put("attention", [line for line in s.log_tail(1 << 22).splitlines() if "attention" in line.lower()][-3:])
        for px in a.sizes:
            base = {"width": px, "height": px, "steps": a.steps, "sampler_name": "Euler", "cfg_scale": 7.0}
            key = f"{px}px"
            c.post("/delta-gpu/nan?on=1")
            plain, plain_mem = measured(c, PROMPT, **base)
            own, own_mem = measured(c, f"{PROMPT} <lora:{sd15.lora()}:1>", **base)
            c.get("/delta-gpu/paths")
            ds, ds_mem = measured(c, PROMPT, **base, **scripts(delta(sd15)))
            again = c.txt2img(PROMPT, **base, **scripts(delta(sd15)))
            paths = c.get("/delta-gpu/paths")
            after = c.txt2img(PROMPT, **base)
            nan = c.get("/delta-gpu/nan")
            c.post("/delta-gpu/nan?on=0")
            row = {
                "psnr_own_vs_plain": psnr(own.image, plain.image),
                "psnr_ds_vs_own": psnr(ds.image, own.image),
                "psnr_ds_again_vs_ds": psnr(again.image, ds.image),
                "seconds": {"plain": plain.seconds, "own": own.seconds, "ds": ds.seconds, "ds again": again.seconds},
                "peak_allocated": {"plain": plain_mem.get("max_allocated"), "own": own_mem.get("max_allocated"),
                                   "ds": ds_mem.get("max_allocated")},
                "paths": paths, "nan": nan, "infotext": ds.infotext.splitlines()[-1],
            }
            r.put(key, row)
            r.check(f"{key}: no non-finite step (plain, own LoRA, 2 DS, plain)",
                    nan["bad_steps"] == 0 and nan["steps"] > 0, f"{nan['bad_steps']} of {nan['steps']} steps")
            r.check(f"{key}: no flat image", not any(flat(g.image) for g in (plain, own, ds, again, after)))
            r.check(f"{key}: the LoRA moves the image (own vs plain < {IDENTICAL_ABOVE_DB} dB)",
                    row["psnr_own_vs_plain"] < IDENTICAL_ABOVE_DB, f"{db(row['psnr_own_vs_plain'])} dB")
            r.check(f"{key}: DS equals Forge's own <lora:L:1> (> {IDENTICAL_ABOVE_DB} dB)",
                    row["psnr_ds_vs_own"] > IDENTICAL_ABOVE_DB, f"{db(row['psnr_ds_vs_own'])} dB")
            r.check(f"{key}: DS twice gives the same image (> {IDENTICAL_ABOVE_DB} dB)",
                    row["psnr_ds_again_vs_ds"] > IDENTICAL_ABOVE_DB, f"{db(row['psnr_ds_again_vs_ds'])} dB")
            r.check(f"{key}: plain after DS is Forge's own image (same pixels)", psnr(after.image, plain.image)
                    == float("inf"), f"{db(psnr(after.image, plain.image))} dB")
            r.check(f"{key}: Forge's host used no CUDA graph and folded no layer",
                    paths["replays"] == 0 and paths["captures"] == 0 and paths["folded_layers"] == 0,
                    json.dumps(paths))
            print(f"  {key}: own vs plain {db(row['psnr_own_vs_plain'])}, DS vs own {db(row['psnr_ds_vs_own'])}, "
                  f"DS again {db(row['psnr_ds_again_vs_ds'])} dB", flush=True)


def phase_forge_sdxl(r: Report, install: ForgeInstall, fx: dict[str, ModelFixture], a: argparse.Namespace) -> None:
    r.begin("forge-sdxl")
    target = a.sdxl
    sd15 = fx["sd15"]
    base = {"width": a.big, "height": a.big, "steps": a.sdxl_steps, "sampler_name": "Euler", "cfg_scale": 7.0}
    with server(install, fx, (target, "sd15"), r.out / "server-forge-sdxl.log", kind=ProbedForgeServer) as s:
        c = s.client
        assert c is not None
        c.set_model(fx[target].model_name)
        fresh, fresh_mem = measured(c, PROMPT, **base)  # this server's first image: the fresh server's
        r.put("fresh_plain_mem", fresh_mem)

        # two models resident: the target and the source, both on the GPU during the DS steps
        _, seen = resident_during(c, PROMPT, **base, **scripts(delta(sd15)))
        r.put("resident", seen)
        most = unets(seen["most"])
        full = [m for m in most if m["bytes"] and m["bytes_there"] == m["bytes"]]
        r.check("two models resident: the target's and the source's UNet both wholly on the load device during a DS "
                "step", len(full) >= 2 and len({m["bytes"] for m in full}) >= 2,
                "; ".join(f"{m['model']} {m['bytes'] / MIB:.0f} MiB, {m['bytes_there'] / MIB:.0f} there "
                          f"({m['device']})" for m in most) + f" over {seen['steps']} steps")

        # the reduced SDXL of a CPU run is re-laid for Forge and has no LoRA of its own (forge_harness.forge_sdxl)
        names = tuple(n for n in SDXL_REQUESTS if n != "own LoRA" or fx[target].manifest.get("loras"))
        r.put("requests", names)
        print(f"  timings: {a.big} px, {a.sdxl_steps} steps, {a.rounds} measured rounds: {', '.join(names)}",
              flush=True)
        table = timing_rounds(r, c, fx, target, names, base, a.rounds)
        r.put("timings", table)
        r.put("paths", c.get("/delta-gpu/paths"))
        plain_again = c.txt2img(PROMPT, **base)
        r.check("plain after the timed DS requests is the fresh server's image (same pixels)",
                psnr(plain_again.image, fresh.image) == float("inf"), f"{db(psnr(plain_again.image, fresh.image))} dB")

        if "soak" not in a.skip and time_for(r, "soak", 60 if a.device == "gpu" else 600):
            alternate(r, c, sd15, {**base, "steps": a.soak_steps}, a.soak_pairs, a.soak_control)
            r.put("loaded_after_soak", c.get("/delta-gpu/resident")["now"])

        # an out-of-memory error forced during a DS generation, as AUTOMATIC1111's (Forge's memory manager decides
        # what it loads from the device's free memory, which a per-process cap does not lower)
        if a.device == "gpu" and "oom" not in a.skip and time_for(r, "oom", 40):
            phase_oom(r, c, s, fx, target, base, table, fresh.image)


# Forge's Flux preset (Euler, Simple): the API's "Automatic" schedule asks a Flux predictor for sigmas in its pseudo
# timesteps (9999 … 0, not 1 … 0), and every image comes out one flat colour
FLUX_REQUEST = {"width": 512, "height": 512, "steps": 8, "sampler_name": "Euler", "scheduler": "Simple",
                "cfg_scale": 1.0, "distilled_cfg_scale": 3.5}
FLUX_ON_CPU = {"width": 256, "height": 256, "steps": 4}  # the CPU run's request, with the reduced Flux


def reduced_flux_install(install: ForgeInstall) -> ForgeInstall:
    """The install served from a copy of its tree that sizes Flux as reduced_flux.REDUCED (same python)."""
    copy = reduced_flux.reduced_forge(install.root, install.cache / "forge-reduced-flux", flux_fixture.FLUX_DEV)
    return dataclasses.replace(install, root=copy)


def flux(install: ForgeInstall, reduced: bool = False) -> ModelFixture:
    """The Flux fixture, built with Forge's python into the cache when missing (about 34 GB; reduced, for the CPU
    and a reduced_flux_install, 1.8 GB)."""
    directory = install.cache / f"flux-v{flux_fixture.VERSION}{'-reduced' if reduced else ''}"
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        for old in install.cache.glob("flux-v*"):  # two 34 GB fixtures do not fit the GPU machine's 64 GiB disk
            if old != directory and old.name.endswith("-reduced") == reduced:
                shutil.rmtree(old, ignore_errors=True)
        started = time.monotonic()
        subprocess.run([str(install.python), str(HERE / "flux_fixture.py"), "--forge", str(install.root),
                        "--out", str(directory), *(["--reduced", "--device", "cpu"] if reduced else [])],
                       check=True, timeout=1200, env=harness._server_env(install), cwd=install.root)
        print(f"  Flux fixture built in {time.monotonic() - started:.0f}s", flush=True)
    return ModelFixture("flux", directory, json.loads(manifest.read_text()))


def fixture_report(install: ForgeInstall, model: ModelFixture, device: str, px: int, out: Path) -> dict:
    """fixture_check.py's report on ``model``: one prediction through Forge's engine, in a process of its own."""
    report = out / f"fixture-check-{model.key}.json"
    done = subprocess.run([str(install.python), str(HERE / "fixture_check.py"), "--forge", str(install.root),
                           "--dir", str(model.directory), "--device", device, "--px", str(px), "--out", str(report)],
                          timeout=600, env=harness._server_env(install), cwd=install.root, capture_output=True,
                          text=True)
    if not report.is_file():
        return {"ok": False, "error": (done.stdout + done.stderr)[-4000:]}
    return json.loads(report.read_text())


def phase_forge_flux(r: Report, install: ForgeInstall, fx: dict[str, ModelFixture], a: argparse.Namespace) -> None:
    r.begin("forge-flux")
    gpu = a.device == "gpu"
    if not gpu:  # Forge loads no Flux smaller than Flux.1-dev: on the CPU a copy of it that sizes Flux smaller
        install = reduced_flux_install(install)
    model = flux(install, reduced=not gpu)
    request = FLUX_REQUEST if gpu else {**FLUX_REQUEST, **FLUX_ON_CPU}
    r.put("fixture", model.manifest)
    # a random model can keep every step finite and still decode to one colour: see that it makes an image first
    # (skipped only where the same check has just run on this fixture; the phase's "no flat image" check remains)
    if "fixture-check" not in a.skip:
        report = fixture_report(install, model, "cuda" if gpu else "cpu", request["width"], r.out)
        r.put("fixture_check", report)
        x0 = {s: row.get("x0_absmax") for s, row in report.get("sigmas", {}).items()}
        if not r.check("the fixture makes an image (Forge's engine in-process: x0 in range, no NaN, not one colour)",
                       report.get("ok") is True, f"|x0| by sigma {x0}" if x0 else report.get("error", "")[-300:]):
            return  # every image of the server would be the same flat colour: its identities would prove nothing
    modules = tuple((str(model.directory / name), folder) for name, folder in model.manifest["modules"].items())
    with server(install, {**fx, "flux": model}, ("flux",), r.out / "server-forge-flux.log", kind=ProbedForgeServer,
                modules=modules) as s:
        c = s.client
        assert c is not None
        c.set_options(forge_additional_modules=[file for file, _ in modules])
        c.set_model(model.model_name)
        c.post("/delta-gpu/nan?on=1")
        plain, plain_mem = measured(c, PROMPT, **request)
        # the DiT's LoRA, then (the Flux fixture) one that also changes CLIP-L and T5-XXL
        kinds = [k for k in ("lora", "lora_te") if k in model.manifest["loras"]]
        rows, images = {}, [plain]
        for kind in kinds:
            name = model.lora(kind)
            own, own_mem = measured(c, f"{PROMPT} <lora:{name}:1>", **request)
            ds, ds_mem = measured(c, PROMPT, **request, **scripts({**delta(model), "loras": [{"name": name,
                                                                                                "weight": 1.0}]}))
            images += [own, ds]
            for label, g in (("own", own), ("ds", ds)):
                (r.out / f"forge-flux-{kind}-{label}.png").write_bytes(g.image)
            rows[kind] = {
                "psnr_own_vs_plain": psnr(own.image, plain.image), "psnr_ds_vs_own": psnr(ds.image, own.image),
                "seconds": {"plain": plain.seconds, "own": own.seconds, "ds": ds.seconds},
                "peak_allocated": {"plain": plain_mem.get("max_allocated"), "own": own_mem.get("max_allocated"),
                                   "ds": ds_mem.get("max_allocated")},
                "infotext": ds.infotext.splitlines()[-1],
            }
        after = c.txt2img(PROMPT, **request)
        (r.out / "forge-flux-plain.png").write_bytes(plain.image)
        nan = c.get("/delta-gpu/nan")
        c.post("/delta-gpu/nan?on=0")
        r.put(f"{request['width']}px", {**rows, "nan": nan, "log": s.log_tail(1 << 16).splitlines()[-40:]})
        r.check("no non-finite step (plain, own LoRAs, DS, plain)", nan["bad_steps"] == 0 and nan["steps"] > 0,
                f"{nan['bad_steps']} of {nan['steps']} steps")
        r.check("no flat image", not any(flat(g.image) for g in (*images, after)))
        for kind, row in rows.items():
            r.check(f"{kind}: the LoRA moves the image (own vs plain < {IDENTICAL_ABOVE_DB} dB)",
                    row["psnr_own_vs_plain"] < IDENTICAL_ABOVE_DB, f"{db(row['psnr_own_vs_plain'])} dB")
            r.check(f"{kind}: DS (the diffusion model alone as the source) equals Forge's own <lora:L:1> (> "
                    f"{IDENTICAL_ABOVE_DB} dB)", row["psnr_ds_vs_own"] > IDENTICAL_ABOVE_DB,
                    f"{db(row['psnr_ds_vs_own'])} dB")
            peaks = " / ".join(f"{(v or 0) / 2**30:.1f}" for v in row["peak_allocated"].values())
            print(f"  {model.model_name} {request['width']}px {kind}: own vs plain {db(row['psnr_own_vs_plain'])}, "
                  f"DS vs own {db(row['psnr_ds_vs_own'])} dB; peak allocated plain / own / DS {peaks} GiB",
                  flush=True)
        r.check("plain after DS is Forge's own image (same pixels)", psnr(after.image, plain.image) == float("inf"),
                f"{db(psnr(after.image, plain.image))} dB")


PHASES = {"forge-id": phase_forge_id, "forge-sdxl": phase_forge_sdxl, "forge-flux": phase_forge_flux}
