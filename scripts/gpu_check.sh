#!/usr/bin/env bash
# The GPU check of issue 21 on a fresh machine, from the repository: install psm, then run
# `psm bench gpu` (about 6 minutes on one GPU; 8 at most with the install).
#
#   bash scripts/gpu_check.sh [psm bench gpu flags...]
#   bash scripts/gpu_check.sh --append docs/benchmarks.md      # record the table
#   bash scripts/gpu_check.sh --cpu --quick                     # the code path, no GPU needed
#
# Install step: a virtual environment (PSM_GPU_VENV, default $TMPDIR/psm-gpu-venv, outside the
# repository) that sees the machine's own packages (--system-site-packages), so a CUDA torch
# already installed there is used as is;
# without any torch, the registry's default torch is installed (on Linux x86-64 that is the
# CUDA build; the CPU wheel is never pinned here). Then `pip install -e .`. A machine that cannot
# reach a registry takes the missing wheels from PSM_WHEELS (a folder, e.g. .whl), offline.
# Exit codes: those of `psm bench gpu` (2: no CUDA device present, or a bad flag), 1 when the
# install fails.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${PSM_GPU_VENV:-${TMPDIR:-/tmp}/psm-gpu-venv}"
WHEELS="${PSM_WHEELS:-}"
START=$(date +%s)

say() { echo "gpu_check: $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (with the system's packages) from $PYTHON, $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv --system-site-packages "$VENV"
  # a python that is itself a venv (the GPU image's python3 is /opt/torch/.venv/bin/python3)
  # hands a new venv its base's packages only: make its own packages (torch) visible too
  parent_sites=$("$PYTHON" -c "import site, sys
if sys.prefix != sys.base_prefix:
    print(*site.getsitepackages(), sep='\n')")
  if [ -n "$parent_sites" ]; then
    purelib=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    printf '%s\n' "$parent_sites" >"$purelib/_psm_parent_venv.pth"
  fi
fi
PY="$VENV/bin/python"

pip_args=(-q --disable-pip-version-check)
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { say "PSM_WHEELS=$WHEELS is not a folder"; exit 1; }
  pip_args+=(--no-index --find-links "$WHEELS")
fi

# torch: the machine's if it has one (a CUDA build where a GPU is present), else the registry's
if ! "$PY" -c "import torch" 2>/dev/null; then
  say "no torch here: installing the registry's default build"
  "$PY" -m pip install "${pip_args[@]}" torch || { say "torch install failed"; exit 1; }
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
  && [ "$("$PY" -c 'import torch; print(torch.version.cuda is None)')" = True ]; then
  say "a GPU is present but this torch is a CPU build: installing the registry's CUDA build"
  "$PY" -m pip install "${pip_args[@]}" --ignore-installed torch \
    || { say "torch install failed"; exit 1; }
fi

# psm itself, editable, built with the venv's setuptools (no isolated build environment to
# download): upgraded first where older than pyproject.toml's setuptools>=68
recent_setuptools() {
  "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 68)" \
    2>/dev/null
}
if ! recent_setuptools; then
  say "setuptools missing or older than 68: installing it"
  "$PY" -m pip install "${pip_args[@]}" "setuptools>=68" || { say "setuptools failed"; exit 1; }
fi
pip_args+=(--no-build-isolation)
"$PY" -m pip install "${pip_args[@]}" -e . || { say "pip install -e . failed"; exit 1; }

"$PY" - <<'EOF' >&2
import torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), {name}")
EOF
say "install took $(($(date +%s) - START)) s"

set +e
"$VENV/bin/psm" bench gpu "$@"
code=$?
set -e
say "finished with exit code $code after $(($(date +%s) - START)) s"
exit "$code"
