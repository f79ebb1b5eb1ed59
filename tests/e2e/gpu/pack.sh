#!/usr/bin/env bash
# Pack what the GPU end-to-end run needs into one folder that travels to a machine with no package registry:
# the wheels the WebUI needs beyond that machine's image, the WebUI tree (no .git, no venv, no pictures), the CLIP
# tokenizer's HF home, and a snapshot of this checkout (the extension as it will be tested).
#
#   DELTA_E2E_A1111=/path/to/a1111 DELTA_E2E_HF_HOME=/path/to/hf-home DELTA_E2E_CLIP_SRC=/path/to/CLIP \
#       tests/e2e/gpu/pack.sh [--host a1111|forge] [OUT] [PYTHON_VERSION]
#
# --host forge (DELTA_E2E_FORGE too): Forge 2 instead, with wheels-forge.txt; the AUTOMATIC1111 tree travels beside
# it (1 MB compressed) because the fixtures are built from its ldm/sgm classes. OUT then defaults to .gpu-forge.
#
# DELTA_E2E_CLIP_SRC: a checkout of openai/CLIP at d50d76daa670286dd6cacf3bcd80b5e4823fc8e1, the commit the
# WebUIs' launch_utils.py installs (k_diffusion imports it at start-up; it is on no package registry).
#
# OUT defaults to <repo>/.gpu (ignore it in git: it must never be committed; it holds WebUI code). PYTHON_VERSION
# (default 3.12, the GPU machine's) picks the wheels' ABI; 3.11 packs for a CPU dry run with a 3.11 python.
# Nothing is written outside OUT. Run it again to refresh the snapshot: the wheels are kept when present.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
host=a1111
if [ "${1:-}" = "--host" ]; then host=${2:?--host a1111 or forge}; shift 2; fi
case "$host" in
    a1111) out=${1:-$repo/.gpu}; wheels=$here/wheels.txt ;;
    forge) out=${1:-$repo/.gpu-forge}; wheels=$here/wheels-forge.txt
           forge=${DELTA_E2E_FORGE:?set DELTA_E2E_FORGE to the Forge 2 install} ;;
    *) echo "--host: a1111 or forge, not $host" >&2; exit 2 ;;
esac
pyver=${2:-3.12}
webui=${DELTA_E2E_A1111:?set DELTA_E2E_A1111 to the AUTOMATIC1111 v1.10.1 install}
hf_home=${DELTA_E2E_HF_HOME:?set DELTA_E2E_HF_HOME to an HF home holding openai/clip-vit-large-patch14}
clip_src=${DELTA_E2E_CLIP_SRC:?set DELTA_E2E_CLIP_SRC to a checkout of openai/CLIP (see above)}
mkdir -p "$out/whl"

# 1. wheels, for the target's python (binary only, no dependencies: each needed one is listed)
platforms=""
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
grep -v '^\s*#' "$wheels" | grep -v '^\s*$' | while read -r spec; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        $platforms -d "$out/whl" "$spec" 2>&1 | grep -v '^WARNING: Location' || true
done
# two of the WebUI's needs come as sources only: build pure-python wheels of them here
for spec in antlr4-python3-runtime==4.9.3 jsonmerge==1.8.0; do
    name=${spec%%==*}; name=${name//-/_}
    if ! ls "$out/whl/${name}"-*.whl >/dev/null 2>&1; then
        python3 -m pip wheel -q --no-deps --no-binary=:all: -w "$out/whl" "$spec" 2>&1 | grep -v '^WARNING: Location' || true
    fi
done

# openai/CLIP: its setup.py needs pkg_resources, so it is built without isolation, with a setuptools that has it
if ! ls "$out"/whl/clip-1.0-*.whl >/dev/null 2>&1; then
    build=$(mktemp -d)
    python3 -m venv "$build/venv"
    "$build/venv/bin/pip" install -q setuptools==80.9.0 wheel 2>&1 | grep -v '^WARNING: Location' || true
    mkdir "$build/src" && cp -r "$clip_src"/. "$build/src/" && rm -rf "$build/src/.git" "$build/src/build"
    "$build/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$out/whl" "$build/src" 2>&1 \
        | grep -v '^WARNING: Location' || true
    rm -rf "$build"
fi

# 2. the WebUI tree: code and configs only (its helper repositories' pictures are 50 MB of the 70)
tar -C "$webui" --exclude=.git --exclude=venv --exclude=__pycache__ --exclude='*.png' --exclude='*.jpg' \
    --exclude='*.jpeg' --exclude='*.gif' --exclude='*.webp' --exclude='*.ipynb' --exclude='*.mp4' \
    --exclude=./models --exclude=./outputs --exclude=./extensions --exclude=./config.json \
    --exclude=./ui-config.json --exclude=./cache.json -cf - . | xz -6 -T0 > "$out/a1111.tar.xz"
(cd "$webui" && git rev-parse HEAD 2>/dev/null || echo unknown) > "$out/a1111.commit"
if [ "$host" = forge ]; then
    # Forge's tree: its backend/huggingface configs and tokenizers are 46 MB of mostly repeated files, which xz's
    # single-threaded window (-9: 64 MB) finds again; pictures, the models folder and helper repositories' .git stay
    tar -C "$forge" --exclude=.git --exclude=venv --exclude=__pycache__ --exclude='*.png' --exclude='*.jpg' \
        --exclude='*.jpeg' --exclude='*.gif' --exclude='*.webp' --exclude='*.ipynb' --exclude='*.mp4' \
        --exclude=./models --exclude=./outputs --exclude=./extensions --exclude=./config.json \
        --exclude=./ui-config.json --exclude=./cache.json -cf - . | xz -9 -T1 > "$out/forge.tar.xz"
    (cd "$forge" && git rev-parse HEAD 2>/dev/null || echo unknown) > "$out/forge.commit"
fi

# 3. the HF home: the CLIP tokenizer only (SD1.5 and SDXL need it; the T5 one is for SD3)
rm -rf "$out/hf-home" && mkdir -p "$out/hf-home/hub"
cp -r "$hf_home/hub/models--openai--clip-vit-large-patch14" "$out/hf-home/hub/"
[ -f "$hf_home/hub/version.txt" ] && cp "$hf_home/hub/version.txt" "$out/hf-home/hub/"

# 4. the extension under test: this checkout's tracked and untracked-but-not-ignored files
rm -rf "$out/ext" && mkdir -p "$out/ext"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 -I{} sh -c '[ -f "{}" ] && printf "%s\0" "{}"' \
    | tar --null -T - -cf -) | tar -C "$out/ext" -xf -
(cd "$repo" && echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!tests/e2e/gpu' || echo ' (with uncommitted changes)')") \
    > "$out/ext.commit"

du -sh "$out"/whl "$out"/*.tar.xz "$out"/hf-home "$out"/ext
du -sh "$out"
