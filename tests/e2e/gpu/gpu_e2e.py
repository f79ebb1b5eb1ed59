"""Delta Sampling in a real AUTOMATIC1111 v1.10.1 on a GPU, as its users run it: fp16, SDP attention, the CUDA graph
of the source and LoRA folding on (the defaults), and --medvram.

    python tests/e2e/gpu/gpu_e2e.py --phases sd15,sdxl,medvram [--device cpu] [--out DIR]

Usually started by run.sh on the GPU machine (which installs the carried wheels first); the same script runs on the
CPU with ``--device cpu`` (fp32, small sizes, no memory cap), to check the machinery before a GPU is spent on it.
Environment as for the other end-to-end tests (harness.py): DELTA_E2E_A1111, DELTA_E2E_PYTHON, DELTA_E2E_CACHE,
DELTA_E2E_HF_HOME.

Phases (each starts its own server with this checkout and the probe extension linked in):

- ``sd15``: SD1.5 as its own source with its LoRA at λ = 1 against the WebUI's own ``<lora:L:1>``, at 512 and
  1024 px, 20 Euler steps: no NaN in any step, PSNR recorded; then the CUDA graph off (the setting
  ``delta_sampling_cuda_graph``), folding off (no setting: the probe builds the patch with ``fold=False``), and
  both off, each against the default image and the WebUI's own LoRA.
- ``sdxl``: the full-size SDXL fixture as the target, the SD1.5 fixture as the source, 1024 px, 30 steps: wall
  time and peak VRAM for plain, the WebUI's own LoRA on the target, DS default, DS cond-only, DS window 0-0.5 and
  base-first (window 0-0.25), in interleaved rounds; 20 alternating DS/plain generations (VRAM and RSS growth);
  two SD1.5 sources alternating over 6 DS requests (flat); an out-of-memory error forced during a DS generation by
  a per-process memory cap (a clear HTTP error, VRAM back to its level, the next plain image the fresh server's).
- ``medvram``: the ``sdxl`` requests (plain, own LoRA, DS default, DS cond-only) under ``--medvram``.

Writes results.json (every figure, every check) and one log per server to the output folder; prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/e2e: the harness

import harness  # noqa: E402
from harness import (  # noqa: E402
    A1111Install,
    Generation,
    ModelFixture,
    ServerConfig,
    WebUIClient,
    WebUIServer,
    decode_image,
    ensure_fixtures,
    psnr,
)

PROBE = HERE / "probe_extension"
SCRIPT = "Delta Sampling"
PROMPT = "a photo of a cat sitting on a red chair"
TWIN = "delta_e2e_sd15_twin"  # the SD1.5 fixture listed under a second name: another source to alternate with
IDENTICAL_ABOVE_DB = 35.0  # as in the CPU suite: the fixture LoRA moves an image to about 20 dB
GIB = 1024 ** 3
MIB = 1024 ** 2

# GPU: the WebUI's defaults (fp16 weights and autocast, its automatic attention choice, which is SDP on torch 2
# without xformers); nothing downloaded, loopback only
GPU_ARGS = ("--skip-prepare-environment", "--skip-install", "--skip-python-version-check", "--skip-version-check",
            "--api", "--no-download-sd-model", "--disable-console-progressbars")
CPU_ARGS = (*harness.BASE_ARGS, "--skip-python-version-check", "--skip-version-check")
# the harness starts every server with harness.BASE_ARGS (CPU flags): main() replaces them with one of these


# ---------------------------------------------------------------------------------------------- plumbing


class Report:
    """Every figure and check of the run, written to results.json after each phase."""

    def __init__(self, out: Path, device: str):
        self.out = out
        self.data: dict[str, Any] = {"device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "phases": {}, "checks": []}
        self.phase = ""

    def begin(self, phase: str) -> dict:
        self.phase = phase
        self.data["phases"][phase] = {"started": time.monotonic()}
        return self.data["phases"][phase]

    def put(self, key: str, value: Any) -> None:
        self.data["phases"][self.phase][key] = value
        self.save()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.data["checks"].append({"phase": self.phase, "check": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {self.phase}: {name}{' — ' + detail if detail else ''}", flush=True)
        self.save()
        return ok

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))


class Probed:
    """A harness server (AUTOMATIC1111's or Forge's) with the probe extension linked in beside this checkout; keeps
    its log in the output."""

    log_out: Path | None = None
    data_dir: Path | None
    log_path: Path

    def _prepare_data_dir(self) -> None:
        super()._prepare_data_dir()  # type: ignore[misc]
        assert self.data_dir is not None
        (self.data_dir / "extensions" / "delta-gpu-probe").symlink_to(PROBE, target_is_directory=True)

    def _keep_log(self) -> None:
        super()._keep_log()  # type: ignore[misc]
        if self.log_out is not None:
            with contextlib.suppress(OSError):
                self.log_out.write_text(self.log_path.read_text(errors="replace"))


class ProbedServer(Probed, WebUIServer):
    pass


@contextlib.contextmanager
def server(install: Any, fixtures: dict[str, ModelFixture], models: tuple[str, ...], log_out: Path,
           extra_args: tuple[str, ...] = (), twins: tuple = (), kind: type = ProbedServer, modules: tuple = ()):
    started = time.monotonic()
    s = kind(install, ServerConfig(models=models, extra_args=extra_args, twins=twins, modules=modules), fixtures,
             startup_timeout=900)
    s.log_out = log_out
    with s:
        assert s.client is not None
        s.client.get("/delta-gpu/paths")  # installs the probe's counters before the first generation
        print(f"  server up in {time.monotonic() - started:.0f}s ({', '.join(models)}; "
              f"{' '.join(extra_args) or 'default flags'})", flush=True)
        yield s


def scripts(args: dict) -> dict:
    return {"alwayson_scripts": {SCRIPT: {"args": [args]}}}


def delta(source: ModelFixture, **changes: Any) -> dict:
    return {"enabled": True, "source": source.model_name, "loras": [{"name": source.lora(), "weight": 1.0}],
            "strength": 1.0, **changes}


def mem(c: WebUIClient) -> dict:
    return c.get("/delta-gpu/mem")


def reset(c: WebUIClient) -> dict:
    return c.post("/delta-gpu/reset")


def measured(c: WebUIClient, prompt: str, **params: Any) -> tuple[Generation, dict]:
    """One generation with the allocator's peak counters reset before it; returns it and the memory after."""
    before = reset(c)
    g = c.txt2img(prompt, **params)
    after = mem(c)
    after["before_allocated"] = before.get("allocated")
    return g, after


def flat(image: bytes) -> bool:
    """An image of one colour (what NaN latents decode to)."""
    a = decode_image(image)
    return float(a.std()) < 1.0


def db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def log_lines(server: WebUIServer, needle: str, limit: int = 20) -> list[str]:
    return [line for line in server.log_tail(1 << 22).splitlines() if needle in line][-limit:]


# ---------------------------------------------------------------------------------------------- phases


def phase_sd15(r: Report, install: A1111Install, fx: dict[str, ModelFixture], a: argparse.Namespace) -> None:
    r.begin("sd15")
    sd15 = fx["sd15"]
    with server(install, fx, ("sd15",), r.out / "server-sd15.log") as s:
        c = s.client
        assert c is not None
        r.put("attention", log_lines(s, "attention optimization", 3))
        r.put("mem_at_start", mem(c))
        for px in a.sizes:
            base = {"width": px, "height": px, "steps": a.steps, "sampler_name": "Euler", "cfg_scale": 7.0}
            key = f"{px}px"
            c.post("/delta-gpu/nan?on=1")
            plain = c.txt2img(PROMPT, **base)
            own = c.txt2img(f"{PROMPT} <lora:{sd15.lora()}:1>", **base)
            c.get("/delta-gpu/paths")
            variants: dict[str, Generation] = {}
            paths: dict[str, dict] = {}
            for name, graph, fold in (("default", True, True), ("default again", True, True),
                                      ("graph off", False, True), ("fold off", True, False),
                                      ("graph and fold off", False, False)):
                c.set_options(delta_sampling_cuda_graph=graph)
                c.post(f"/delta-gpu/fold?on={int(fold)}")
                variants[name] = c.txt2img(PROMPT, **base, **scripts(delta(sd15)))
                paths[name] = c.get("/delta-gpu/paths")
            c.set_options(delta_sampling_cuda_graph=True)
            c.post("/delta-gpu/fold?on=1")
            nan = c.get("/delta-gpu/nan")
            c.post("/delta-gpu/nan?on=0")
            d = variants["default"]
            row = {
                "psnr_own_vs_plain": psnr(own.image, plain.image),
                **{f"psnr_{n.replace(' ', '_')}_vs_own": psnr(g.image, own.image) for n, g in variants.items()},
                **{f"psnr_{n.replace(' ', '_')}_vs_default": psnr(g.image, d.image)
                   for n, g in variants.items() if n != "default"},
                "seconds": {"plain": plain.seconds, "own": own.seconds,
                            **{n: g.seconds for n, g in variants.items()}},
                "paths": paths, "nan": nan,
                "infotext": d.infotext.splitlines()[-1],
            }
            r.put(key, row)
            r.check(f"{key}: no non-finite step (plain, own LoRA, 5 DS)", nan["bad_steps"] == 0 and nan["steps"] > 0,
                    f"{nan['bad_steps']} of {nan['steps']} steps")
            r.check(f"{key}: no flat image", not any(flat(g.image) for g in (plain, own, *variants.values())))
            r.check(f"{key}: the LoRA moves the image (own vs plain < {IDENTICAL_ABOVE_DB} dB)",
                    row["psnr_own_vs_plain"] < IDENTICAL_ABOVE_DB, f"{db(row['psnr_own_vs_plain'])} dB")
            for n in variants:
                v = row[f"psnr_{n.replace(' ', '_')}_vs_own"]
                r.check(f"{key}: DS {n} equals the WebUI's own <lora:L:1> (> {IDENTICAL_ABOVE_DB} dB)",
                        v > IDENTICAL_ABOVE_DB, f"{db(v)} dB")
            if a.device == "gpu":
                r.check(f"{key}: the default replayed the source as a CUDA graph and folded LoRA layers",
                        paths["default"]["replays"] > 0 and paths["default"]["folded_layers"] > 0,
                        json.dumps(paths["default"]))
                r.check(f"{key}: 'graph off' replayed nothing, 'fold off' folded nothing",
                        paths["graph off"]["replays"] == 0 and paths["fold off"]["folded_layers"] == 0
                        and paths["graph and fold off"]["replays"] == 0
                        and paths["graph and fold off"]["folded_layers"] == 0,
                        json.dumps({k: paths[k] for k in ("graph off", "fold off", "graph and fold off")}))
            print(f"  {key}: " + ", ".join(f"{k} {db(v)}" for k, v in row.items() if k.startswith("psnr")), flush=True)
        if a.device == "gpu" and "leak" not in a.skip and time_for(r, "leak", 60):
            leak_bisect(r, c, sd15, {"width": 512, "height": 512, "steps": a.steps, "sampler_name": "Euler"})


def leak_bisect(r: Report, c: WebUIClient, sd15: ModelFixture, base: dict, n: int = 5) -> None:
    """Allocated VRAM after each of n DS generations, per combination of the graph and folding: which one keeps
    memory from one generation to the next."""
    out = {}
    for name, graph, fold in (("default", True, True), ("graph off", False, True), ("fold off", True, False),
                              ("graph and fold off", False, False)):
        c.set_options(delta_sampling_cuda_graph=graph)
        c.post(f"/delta-gpu/fold?on={int(fold)}")
        after = []
        for _ in range(n):
            c.txt2img(PROMPT, **base, **scripts(delta(sd15)))
            after.append(mem(c)["allocated"])
        per_gen = (after[-1] - after[1]) / (n - 2) / MIB
        out[name] = {"allocated_after_each": after, "growth_mib_per_generation": per_gen}
        print(f"  leak, {name}: {per_gen:+.1f} MiB per DS generation "
              f"({' '.join(f'{x / MIB:.0f}' for x in after)} MiB)", flush=True)
    c.set_options(delta_sampling_cuda_graph=True)
    c.post("/delta-gpu/fold?on=1")
    r.put("leak", out)
    for name, v in out.items():
        r.check(f"leak: allocated VRAM flat over DS generations 2-{n}, {name} (< 1 MiB per generation)",
                v["growth_mib_per_generation"] < 1.0, f"{v['growth_mib_per_generation']:+.1f} MiB per generation")


SDXL_REQUESTS = ("plain", "own LoRA", "DS default", "DS cond-only", "DS window 0-0.5", "base-first 0-0.25")


def sdxl_request(name: str, fx: dict[str, ModelFixture], target: str) -> tuple[str, dict]:
    sd15 = fx["sd15"]
    if name == "plain":
        return PROMPT, {}
    if name == "own LoRA":
        return f"{PROMPT} <lora:{fx[target].lora()}:1>", {}
    if name == "DS default":
        return PROMPT, scripts(delta(sd15))
    if name == "DS cond-only":
        return PROMPT, scripts(delta(sd15, cfg_mode="cond"))
    if name == "DS window 0-0.5":
        return PROMPT, scripts(delta(sd15, start=0.0, end=0.5))
    if name == "base-first 0-0.25":
        return PROMPT, scripts(delta(sd15, mode="base-first", start=0.0, end=0.25))
    raise ValueError(name)


def timing_rounds(r: Report, c: WebUIClient, fx: dict[str, ModelFixture], target: str, names: tuple[str, ...],
                  base: dict, rounds: int) -> dict:
    """Round 0 warms up (loads the source, records graphs' first shapes); rounds 1.. are measured, interleaved."""
    table: dict[str, dict] = {n: {"seconds": [], "peak_allocated": [], "peak_reserved": [], "device_used": []}
                              for n in names}
    images: dict[str, bytes] = {}
    for rnd in range(rounds + 1):
        for n in names:
            prompt, extra = sdxl_request(n, fx, target)
            g, m = measured(c, prompt, **base, **extra)
            images[n] = g.image
            if rnd == 0:
                table[n]["first_seconds"] = g.seconds
                continue
            table[n]["seconds"].append(g.seconds)
            table[n]["peak_allocated"].append(m.get("max_allocated"))
            table[n]["peak_reserved"].append(m.get("max_reserved"))
            table[n]["device_used"].append(m.get("device_used"))
            table[n]["allocated_after"] = m.get("allocated")
            table[n]["flat"] = flat(g.image)
    plain = statistics.median(table["plain"]["seconds"])
    for n in names:
        t = table[n]
        t["median_seconds"] = statistics.median(t["seconds"])
        t["x_plain"] = t["median_seconds"] / plain
        t["psnr_vs_plain"] = psnr(images[n], images["plain"])
        if t["peak_allocated"][0] is not None:
            t["max_peak_allocated"] = max(t["peak_allocated"])
            t["max_peak_reserved"] = max(t["peak_reserved"])
        print(f"  {n:20s} {t['median_seconds']:6.2f} s  ×{t['x_plain']:.2f}  first {t['first_seconds']:.2f} s  "
              f"peak alloc {gib(t.get('max_peak_allocated'))} GiB reserved {gib(t.get('max_peak_reserved'))} GiB  "
              f"PSNR vs plain {db(t['psnr_vs_plain'])}", flush=True)
    for n in names:
        r.check(f"{n}: image not flat (no NaN)", not table[n]["flat"])
    for n in names:
        if n.startswith("DS"):
            r.check(f"{n}: the delta changes the image", table[n]["psnr_vs_plain"] < IDENTICAL_ABOVE_DB,
                    f"{db(table[n]['psnr_vs_plain'])} dB from plain")
    return table


def phase_sdxl(r: Report, install: A1111Install, fx: dict[str, ModelFixture], a: argparse.Namespace) -> None:
    r.begin("sdxl")
    target = a.sdxl
    sd15 = fx["sd15"]
    base = {"width": a.big, "height": a.big, "steps": a.sdxl_steps, "sampler_name": "Euler", "cfg_scale": 7.0}
    with server(install, fx, (target, "sd15"), r.out / "server-sdxl.log", twins=((TWIN, "sd15"),)) as s:
        c = s.client
        assert c is not None and s.process is not None
        r.put("attention", log_lines(s, "attention optimization", 3))
        fresh, fresh_mem = measured(c, PROMPT, **base)  # this server's first image: the fresh server's
        r.put("fresh_plain_mem", fresh_mem)

        print(f"  timings: {a.big} px, {a.sdxl_steps} steps, {a.rounds} measured rounds", flush=True)
        table = timing_rounds(r, c, fx, target, SDXL_REQUESTS, base, a.rounds)
        r.put("timings", table)
        r.put("paths", c.get("/delta-gpu/paths"))

        # 20 alternating DS/plain generations
        soak = {**base, "steps": a.soak_steps}
        if "soak" not in a.skip and not time_for(r, "soak", 60 if a.device == "gpu" else 600):
            return
        alternate(r, c, sd15, soak, 0 if "soak" in a.skip else a.soak_pairs, a.soak_control)

        # two SD1.5 sources, alternating
        if "two-sources" not in a.skip and not time_for(r, "two sources", 45 if a.device == "gpu" else 600):
            return
        switch = []
        for i in range(0 if "two-sources" in a.skip else 6):
            src = sd15.model_name if i % 2 == 0 else TWIN
            g = c.txt2img(PROMPT, **soak, **scripts({**delta(sd15), "source": src}))
            m = mem(c)
            switch.append({"request": i + 1, "source": src, "seconds": g.seconds, "rss": m["rss"],
                           "allocated": m.get("allocated"), "reserved": m.get("reserved"),
                           "device_used": m.get("device_used"),
                           "loaded": log_lines(s, "Delta Sampling: loaded", 1)})
        r.put("two_sources", switch)
        for k in ("rss", "allocated"):
            if len(switch) > 1 and switch[1].get(k):
                values = [x[k] for x in switch[1:]]
                spread = (max(values) - min(values)) / min(values)
                r.check(f"two sources: {k} flat over requests 2-6 (spread <= 5 %)", spread <= 0.05,
                        " ".join(f"{v / MIB:.0f}" for v in [x[k] for x in switch]) + " MiB")

        # an out-of-memory error forced during a DS generation
        if a.device == "gpu" and "oom" not in a.skip and time_for(r, "oom", 40):
            phase_oom(r, c, s, fx, target, base, table, fresh.image)
        r.put("log_delta_lines", log_lines(s, "Delta Sampling", 40) + log_lines(s, "source calls", 40))


def alternate(r: Report, c: WebUIClient, source: ModelFixture, soak: dict, pairs: int, control: int = 0) -> None:
    """DS and plain generations in turn: RSS and VRAM may not grow by more than 1 % from the first pair to the last,
    and every plain image must be the same. Memory is read after each request; `control` pairs of two plain
    requests first show what the WebUI's own requests leave (recorded, not checked)."""
    if control:
        r.put("soak_control", [_pair_memory(c, i + 1, {}, soak)[0] for i in range(control)])
    samples = []
    plain_images = []
    for i in range(pairs):
        sample, image = _pair_memory(c, i + 1, scripts(delta(source)), soak)
        samples.append(sample)
        plain_images.append(image)
    r.put("soak", samples)
    first, last = (samples[0], samples[-1]) if samples else ({}, {})
    for k in ("rss", "allocated", "reserved", "device_used"):
        if first.get(k):
            growth = (last[k] - first[k]) / first[k]
            r.check(f"soak: {k} growth from pair 1 to pair {pairs} <= 1 %", growth <= 0.01,
                    f"{first[k] / MIB:.0f} -> {last[k] / MIB:.0f} MiB ({100 * growth:+.2f} %)")
    if plain_images:
        r.check("soak: every plain image identical", all(p == plain_images[0] for p in plain_images))


def _pair_memory(c: WebUIClient, pair: int, first: dict, soak: dict) -> tuple[dict, bytes]:
    """The soak's request with `first`'s script args, then plain: the memory after each, and the plain image."""
    c.txt2img(PROMPT, **soak, **first)
    after_first = mem(c)
    g = c.txt2img(PROMPT, **soak)
    m = mem(c)
    return ({"pair": pair, "rss": m["rss"], "allocated": m.get("allocated"), "reserved": m.get("reserved"),
             "device_used": m.get("device_used"), "allocated_after_first": after_first.get("allocated")}, g.image)


def phase_oom(r: Report, c: WebUIClient, s: WebUIServer, fx: dict[str, ModelFixture], target: str, base: dict,
              table: dict, fresh: bytes) -> None:
    sd15 = fx["sd15"]
    plain_g, before = measured(c, PROMPT, **base)  # the level before, with the target resident
    total = before["device_total"]
    # halfway between the allocated peaks: the cap bounds what the allocator may reserve, and it frees its cache
    # before failing, so a cap between the reserved peaks can still fit the DS request (it did, once the run left
    # the GPU before the VAE decode)
    plain_peak = table["plain"]["max_peak_allocated"]
    ds_peak = table["DS default"]["max_peak_allocated"]
    cap_bytes = (plain_peak + ds_peak) / 2 if ds_peak > plain_peak else plain_peak * 1.02
    fraction = cap_bytes / total
    capped = c.post(f"/delta-gpu/cap?fraction={fraction:.6f}")
    t0 = time.monotonic()
    try:
        g = c.txt2img(PROMPT, **base, **scripts(delta(sd15)))
        outcome = {"status": 200, "seconds": g.seconds, "flat": flat(g.image)}
    except Exception as e:  # HTTPError: the WebUI's API answers 500 with the exception's text
        response = getattr(e, "response", None)
        body = response.text if response is not None else str(e)
        outcome = {"status": getattr(response, "status_code", None), "body": body[:1500],
                   "seconds": time.monotonic() - t0}
    uncapped = c.post("/delta-gpu/cap?fraction=1.0")
    after = reset(c)
    plain_after = c.txt2img(PROMPT, **base)
    after_plain = mem(c)
    ds_after = c.txt2img(PROMPT, **base, **scripts(delta(sd15)))
    record = {"cap_fraction": fraction, "cap_bytes": cap_bytes, "plain_peak_allocated": plain_peak,
              "ds_peak_allocated": ds_peak, "mem_before": before, "mem_capped": capped, "outcome": outcome,
              "mem_uncapped": uncapped, "mem_after_reset": after, "mem_after_plain": after_plain,
              "ds_after_seconds": ds_after.seconds, "ds_after_flat": flat(ds_after.image),
              "log": log_lines(s, "out of memory", 5) + log_lines(s, "OutOfMemoryError", 5)}
    r.put("oom", record)
    body = str(outcome.get("body", ""))
    r.check("oom: the capped DS request fails with an HTTP error naming out-of-memory",
            outcome["status"] is not None and outcome["status"] >= 400 and "out of memory" in body.lower(),
            f"HTTP {outcome['status']}: {body[:300]}")
    r.check("oom: the error names the ways to make room", "set CFG mode to cond" in body and "--medvram" in body)
    r.check("oom: allocated VRAM back to its level before (within 64 MiB)",
            abs(after["allocated"] - before["allocated"]) <= 64 * MIB,
            f"before {before['allocated'] / MIB:.0f} MiB, after {after['allocated'] / MIB:.0f} MiB")
    r.check("oom: the next plain image is the fresh server's (same PNG bytes)", plain_after.image == fresh,
            f"PSNR {db(psnr(plain_after.image, fresh))} dB")
    r.check("oom: plain right before the cap was the fresh server's too", plain_g.image == fresh)
    r.check("oom: a DS request after lifting the cap works", not ds_after.image or not flat(ds_after.image))


def phase_medvram(r: Report, install: A1111Install, fx: dict[str, ModelFixture], a: argparse.Namespace) -> None:
    r.begin("medvram")
    target = a.sdxl
    extra = ("--medvram",)
    base = {"width": a.big, "height": a.big, "steps": a.sdxl_steps, "sampler_name": "Euler", "cfg_scale": 7.0}
    with server(install, fx, (target, "sd15"), r.out / "server-medvram.log", extra) as s:
        c = s.client
        assert c is not None
        names = tuple(a.medvram_requests.split(","))
        print(f"  --medvram timings: {a.big} px, {a.sdxl_steps} steps, {a.medvram_rounds} measured rounds",
              flush=True)
        table = timing_rounds(r, c, fx, target, names, base, a.medvram_rounds)
        r.put("timings", table)
        r.put("paths", c.get("/delta-gpu/paths"))
        r.put("log_delta_lines", log_lines(s, "Delta Sampling", 20) + log_lines(s, "source calls", 20))


DEADLINE = [math.inf]


def time_for(r: Report, section: str, needs: float) -> bool:
    """Whether `needs` seconds are left before --budget runs out; records a skip when not."""
    if time.monotonic() + needs <= DEADLINE[0]:
        return True
    r.check(f"{section}: not run (the --budget would run out)", False, f"needs about {needs:.0f}s")
    return False


PHASES = {"sd15": phase_sd15, "sdxl": phase_sdxl, "medvram": phase_medvram}


# ---------------------------------------------------------------------------------------------- main


def environment(install: A1111Install) -> dict:
    probe = ("import json, sys, torch, numpy, transformers, PIL, gradio, fastapi, pydantic; "
             "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "
             "'numpy': numpy.__version__, 'transformers': transformers.__version__, 'pillow': PIL.__version__, "
             "'gradio': gradio.__version__, 'fastapi': fastapi.__version__, 'pydantic': pydantic.VERSION}))")
    try:
        out = subprocess.run([str(install.python), "-c", probe], capture_output=True, text=True, timeout=300,
                             env=harness._server_env(install))
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-2000:]}
    except Exception as e:  # the run goes on: the servers will show what is wrong
        return {"error": repr(e)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="sd15,sdxl,medvram")
    p.add_argument("--host", choices=("a1111", "forge"), default="a1111",
                   help="forge: Forge 2 (DELTA_E2E_FORGE, DELTA_E2E_FORGE_PYTHON), phases forge-id, forge-sdxl, "
                        "forge-flux")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("DELTA_GPU_OUT", "gpu-e2e-out")))
    p.add_argument("--sizes", default=None, help="sd15 identity sizes, px (gpu: 512,1024; cpu: 64)")
    p.add_argument("--steps", type=int, default=None, help="sd15 identity steps (gpu: 20; cpu: 4)")
    p.add_argument("--big", type=int, default=None, help="sdxl size, px (gpu: 1024; cpu: 64)")
    p.add_argument("--sdxl-steps", type=int, default=None, help="sdxl steps (gpu: 30; cpu: 4)")
    p.add_argument("--rounds", type=int, default=2, help="measured rounds per sdxl request (after a warm-up)")
    p.add_argument("--medvram-rounds", type=int, default=1)
    p.add_argument("--soak-pairs", type=int, default=10, help="DS/plain pairs (10 pairs = 20 generations)")
    p.add_argument("--soak-steps", type=int, default=None, help="steps of the soak's requests (gpu: 10; cpu: 2)")
    p.add_argument("--soak-control", type=int, default=0, help="plain/plain pairs before the soak, memory recorded: "
                                                               "what the WebUI's own requests leave")
    p.add_argument("--sdxl", default=None, help="the SDXL fixture (gpu: sdxl_full; cpu: sdxl, the reduced one)")
    p.add_argument("--attention", choices=("auto", "sdp"), default="sdp",
                   help="sdp: --opt-sdp-attention; auto: the WebUI's own choice (Doggettx on CUDA without flags)")
    p.add_argument("--skip", default="", help="sections to leave out: soak, two-sources, leak, oom, fixture-check")
    p.add_argument("--medvram-requests", default="plain,own LoRA,DS default,DS cond-only")
    p.add_argument("--fixtures", default="", help="build these fixtures too, in the background while the phases "
                                                  "run (e.g. sdxl_full ahead of a later call)")
    p.add_argument("--budget", type=float, default=0, help="seconds: sections that would start after it are "
                                                             "skipped and said so (0: no limit)")
    a = p.parse_args(argv)
    gpu = a.device == "gpu"
    a.sizes = [int(x) for x in (a.sizes or ("512,1024" if gpu else "64")).split(",")]
    a.steps = a.steps or (20 if gpu else 4)
    a.big = a.big or (1024 if gpu else 64)
    a.sdxl_steps = a.sdxl_steps or (30 if gpu else 4)
    a.soak_steps = a.soak_steps or (10 if gpu else 2)
    a.sdxl = a.sdxl or ("sdxl_full" if gpu else "sdxl")
    if not gpu:
        a.soak_pairs = min(a.soak_pairs, 3)
    a.out.mkdir(parents=True, exist_ok=True)
    harness.BASE_ARGS = (GPU_ARGS + (("--opt-sdp-attention",) if a.attention == "sdp" else ())) if gpu else CPU_ARGS
    a.skip = set(a.skip.split(","))

    builder_install = A1111Install.from_env()  # the fixtures are built from its classes, whichever host runs
    if builder_install is None or builder_install.problems():
        print("DELTA_E2E_A1111 is unset or unusable:", builder_install and builder_install.problems())
        return 2
    install: Any = builder_install
    build = ensure_fixtures
    phase_table: dict = PHASES
    if a.host == "forge":
        import forge_gpu

        install = forge_gpu.forge_install(a.device)
        if install is None or install.problems():
            print("DELTA_E2E_FORGE is unset or unusable:", install and install.problems())
            return 2
        build, phase_table = forge_gpu.fixtures, forge_gpu.PHASES
    r = Report(a.out, a.device)
    phases = [x for x in a.phases.split(",") if x]
    r.data["args"] = {k: str(v) for k, v in vars(a).items()}
    r.data["host"] = platform.node()
    r.data["environment"] = environment(install)
    print("environment:", json.dumps(r.data["environment"]), flush=True)
    bundle = Path(os.environ.get("DELTA_GPU_BUNDLE") or HERE.parent.parent.parent.parent)  # pack.sh's folder
    r.data["extension"] = str(HERE.parent.parent.parent)
    snapshot = (bundle / "ext").is_dir() and HERE.is_relative_to((bundle / "ext").resolve())
    for name in ("a1111.commit", "forge.commit") + (("ext.commit",) if snapshot else ()):
        f = bundle / name
        if f.is_file():
            r.data[name] = f.read_text().strip()

    t0 = time.monotonic()
    DEADLINE[0] = t0 + a.budget if a.budget else math.inf
    # SD1.5 first (the first phase needs it); the SDXL fixture builds on the CPU while the SD1.5 phase uses the GPU
    # the Flux phase uses its own fixture alone (reduced on the CPU); every other phase SD1.5
    fx = {} if set(phases) == {"forge-flux"} else build(install, ("sd15",))
    r.data["fixtures_seconds"] = time.monotonic() - t0
    print(f"fixtures ready in {r.data['fixtures_seconds']:.0f}s: {', '.join(fx) or 'none needed'}", flush=True)
    ahead = [m for m in ([a.sdxl] if {"sdxl", "medvram", "forge-sdxl"} & set(phases) else []) + a.fixtures.split(",")
             if m]
    ahead = list(dict.fromkeys(m for m in ahead if m != "sd15"))
    builder = None
    if ahead:
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import harness; "
                "harness.ensure_fixtures(harness.A1111Install.from_env(), tuple(sys.argv[2:]), timeout=1800)")
        builder = subprocess.Popen([sys.executable, "-c", code, str(HERE.parent), *ahead])

    def wait_for_builder() -> None:
        nonlocal builder
        if builder is None:
            return
        left = DEADLINE[0] - time.monotonic() if math.isfinite(DEADLINE[0]) else 1800
        try:
            code = builder.wait(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            builder.kill()
            code = "killed at the budget"
        r.data["fixtures_ahead"] = {"models": ahead, "returncode": code, "seconds": time.monotonic() - t0}
        print(f"fixtures built beside the first phase: {r.data['fixtures_ahead']}", flush=True)
        builder = None
        if code == 0:
            fx.update(build(install, tuple(ahead)))  # reads what the builder wrote

    failed_phases = []
    for name in phases:
        if name not in phase_table:
            r.check(f"phase {name}: exists for --host {a.host}", False, f"phases: {', '.join(phase_table)}")
            continue
        if not time_for(r, f"phase {name}", 120):
            continue
        print(f"== {name}", flush=True)
        t = time.monotonic()
        try:
            if name not in ("sd15", "forge-id"):  # the phases on SD1.5 alone run beside the build
                wait_for_builder()
            phase_table[name](r, install, fx, a)
        except Exception:
            failed_phases.append(name)
            r.data["phases"].setdefault(name, {})["error"] = traceback.format_exc()
            print(traceback.format_exc(), flush=True)
        r.data["phases"].setdefault(name, {})["seconds"] = time.monotonic() - t
        r.save()
        print(f"== {name} done in {time.monotonic() - t:.0f}s", flush=True)
    wait_for_builder()
    checks = r.data["checks"]
    bad = [x for x in checks if not x["ok"]]
    print(f"{len(checks) - len(bad)} passed, {len(bad)} failed" + (f"; phases with errors: {failed_phases}"
                                                                 if failed_phases else ""))
    return 1 if bad or failed_phases else 0


if __name__ == "__main__":
    sys.exit(main())
