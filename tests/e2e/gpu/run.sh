#!/usr/bin/env bash
# Run the GPU end-to-end phases on a machine that has python3 with CUDA torch but no registry, from a folder made
# by pack.sh:
#
#   tests/e2e/gpu/run.sh BUNDLE PHASE[,PHASE...] [gpu_e2e.py options]      e.g.  .gpu/ext/tests/e2e/gpu/run.sh .gpu sd15
#
# It installs the bundle's wheels into $DELTA_GPU_TMP/site (default /tmp/delta-gpu), unpacks the WebUI beside them,
# and runs gpu_e2e.py from the bundle's extension snapshot with a python that sees those wheels first. Everything
# lives under $DELTA_GPU_TMP and is reused by a later call while it is still there (fixtures take minutes to
# build); nothing is written into the bundle. Results go to $DELTA_GPU_OUT (default: $tmp/out).
set -euo pipefail
bundle=$(cd "${1:?bundle folder}" && pwd)
shift
tmp=${DELTA_GPU_TMP:-/tmp/delta-gpu}
mkdir -p "$tmp"
started=$(date +%s)

if [ ! -f "$tmp/site.ok" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$tmp/site" \
        "$bundle"/whl/*.whl 2>&1 | grep -v -i 'warning' || true
    # PYTHONPATH folders get no .pth processing: run the carried setuptools' distutils-precedence.pth, so that
    # `import distutils` (gradio 3 imports it; Python 3.12 has none) finds setuptools' copy
    printf 'import site\nsite.addsitedir(%s)\n' "'$tmp/site'" > "$tmp/site/sitecustomize.py"
    touch "$tmp/site.ok"
fi
if [ ! -f "$tmp/a1111.ok" ]; then
    rm -rf "$tmp/a1111" && mkdir -p "$tmp/a1111"
    tar -C "$tmp/a1111" -xJf "$bundle/a1111.tar.xz"
    touch "$tmp/a1111.ok"
fi
# the WebUI's python: the image's python3 with the carried packages first on the path (the harness clears
# PYTHONPATH for the servers it starts, so the variable is set here, in the interpreter it starts)
cat > "$tmp/python" <<EOF
#!/bin/sh
PYTHONPATH="$tmp/site" exec python3 "\$@"
EOF
chmod +x "$tmp/python"
echo "setup: $(( $(date +%s) - started )) s"

export DELTA_E2E_A1111="$tmp/a1111" DELTA_E2E_PYTHON="$tmp/python" DELTA_E2E_CACHE="${DELTA_E2E_CACHE:-$tmp/cache}" \
    DELTA_E2E_HF_HOME="$bundle/hf-home" PYTHONUNBUFFERED=1
export DELTA_GPU_OUT=${DELTA_GPU_OUT:-$tmp/out}
mkdir -p "$DELTA_GPU_OUT"
exec "$tmp/python" "$bundle/ext/tests/e2e/gpu/gpu_e2e.py" --phases "$@"
