#!/usr/bin/env bash
# Run the GPU end-to-end phases on a machine that has python3 with CUDA torch but no registry, from a folder made
# by pack.sh:
#
#   tests/e2e/gpu/run.sh [--host forge] BUNDLE PHASE[,PHASE...] [gpu_e2e.py options]
#       e.g.  .gpu/ext/tests/e2e/gpu/run.sh .gpu sd15
#             tests/e2e/gpu/run.sh --host forge .gpu-forge forge-id,forge-sdxl
#
# It installs the bundle's wheels into $DELTA_GPU_TMP/site (Forge: site-forge; default /tmp/delta-gpu), unpacks the
# WebUI beside them, and runs gpu_e2e.py from the bundle's extension snapshot (when it was carried; else from the
# checkout this script is in) with a python that sees those wheels
# first. Everything lives under $DELTA_GPU_TMP and is reused by a later call while it is still there (fixtures take
# minutes to build; the two hosts share them); nothing is written into the bundle. Results go to $DELTA_GPU_OUT
# (default: $tmp/out).
#
# The phase `install` installs and unpacks whatever parts of the bundle are present, then stops: a bundle larger
# than one call can carry goes over in parts (the wheels in one call, the rest in the next; README.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
host=a1111
if [ "${1:-}" = "--host" ]; then host=${2:?--host a1111 or forge}; shift 2; fi
bundle=$(cd "${1:?bundle folder}" && pwd)
shift
tmp=${DELTA_GPU_TMP:-/tmp/delta-gpu}
mkdir -p "$tmp"
started=$(date +%s)
case "$host" in
    a1111) site=$tmp/site; tree=a1111; python=$tmp/python ;;
    forge) site=$tmp/site-forge; tree=forge; python=$tmp/python-forge ;;
    *) echo "--host: a1111 or forge, not $host" >&2; exit 2 ;;
esac

if [ ! -f "$site.ok" ]; then
    if ! ls "$bundle"/whl/*.whl >/dev/null 2>&1; then
        echo "no wheels in $bundle/whl and none installed in $site yet: carry the bundle's whl folder" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$bundle"/whl/*.whl 2>&1 | grep -v -i 'warning' || true
    # PYTHONPATH folders get no .pth processing: run the carried setuptools' distutils-precedence.pth, so that
    # `import distutils` (gradio 3 imports it; Python 3.12 has none) finds setuptools' copy
    printf 'import site\nsite.addsitedir(%s)\n' "'$site'" > "$site/sitecustomize.py"
    touch "$site.ok"
fi
# the WebUI's tree, and for Forge AUTOMATIC1111's too (the fixtures are built from its ldm/sgm classes)
for t in $tree $( [ "$host" = forge ] && echo a1111 ); do
    if [ ! -f "$tmp/$t.ok" ] && [ -f "$bundle/$t.tar.xz" ]; then
        rm -rf "${tmp:?}/$t" && mkdir -p "$tmp/$t"
        tar -C "$tmp/$t" -xJf "$bundle/$t.tar.xz"
        touch "$tmp/$t.ok"
    fi
done
# the HF home is kept too, so that a later call need not carry it again
if [ -d "$bundle/hf-home" ]; then
    rm -rf "$tmp/hf-home" && cp -r "$bundle/hf-home" "$tmp/hf-home"
fi
# the WebUI's python: the image's python3 with the carried packages first on the path (the harness clears
# PYTHONPATH for the servers it starts, so the variable is set here, in the interpreter it starts)
cat > "$python" <<EOF
#!/bin/sh
PYTHONPATH="$site" exec python3 "\$@"
EOF
chmod +x "$python"
echo "setup: $(( $(date +%s) - started )) s; in $tmp: $(cd "$tmp" && ls -d ./*.ok | tr '\n' ' ')"
if [ "${1:-}" = install ]; then
    exit 0
fi
for t in $tree $( [ "$host" = forge ] && echo a1111 ); do
    [ -f "$tmp/$t.ok" ] || { echo "$t is not unpacked in $tmp: carry $t.tar.xz" >&2; exit 2; }
done
[ -d "$tmp/hf-home" ] || { echo "no HF home in $tmp: carry the bundle's hf-home" >&2; exit 2; }
# the extension under test: the bundle's snapshot when it was carried, else the checkout this script is in
if [ -d "$bundle/ext" ]; then ext=$bundle/ext; else ext=$(cd "$here/../../.." && pwd); fi
echo "extension under test: $ext"

export DELTA_E2E_A1111="$tmp/a1111" DELTA_E2E_PYTHON="$python" DELTA_E2E_CACHE="${DELTA_E2E_CACHE:-$tmp/cache}" \
    DELTA_E2E_HF_HOME="$tmp/hf-home" PYTHONUNBUFFERED=1
if [ "$host" = forge ]; then
    export DELTA_E2E_FORGE="$tmp/forge" DELTA_E2E_FORGE_PYTHON="$python"
fi
export DELTA_GPU_OUT=${DELTA_GPU_OUT:-$tmp/out} DELTA_GPU_BUNDLE=$bundle
mkdir -p "$DELTA_GPU_OUT"
exec "$python" "$ext/tests/e2e/gpu/gpu_e2e.py" --host "$host" --phases "$@"
