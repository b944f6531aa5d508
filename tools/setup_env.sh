#!/usr/bin/env bash
# Build (or check) the project's virtual environment at .venv in the repository root.
#
# Idempotent: when .venv already matches this script and setup.cfg, it only checks that the
# stack imports and exits in a few seconds. The slow part, compiling mmcv's ops, is done
# once per torch version into a wheel cache outside the repository.
#
# Overridable through the environment:
#   HMAIT_PYTHON       interpreter to build the venv with        (default: python3)
#   HMAIT_TORCH        torch version                             (default: 2.14.1)
#   HMAIT_TORCHVISION  the matching torchvision version          (default: 0.29.1)
#   HMAIT_TORCH_INDEX  extra index URL for other CUDA builds, e.g. https://download.pytorch.org/whl/cu126
#   HMAIT_WHEEL_CACHE  where the compiled mmcv wheel is kept     (default: ~/.cache/hmait/wheels)
#   MAX_JOBS           parallel compile jobs for mmcv            (default: number of cores)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

python_bin="${HMAIT_PYTHON:-python3}"
torch_version="${HMAIT_TORCH:-2.14.1}"
torchvision_version="${HMAIT_TORCHVISION:-0.29.1}"
mmcv_version="2.1.0"
wheel_cache="${HMAIT_WHEEL_CACHE:-$HOME/.cache/hmait/wheels}"
venv="$repo/.venv"
stamp="$venv/.hmait-setup-stamp"

fail() { echo "setup_env: ERROR: $*" >&2; exit 1; }
log() { echo "setup_env: $*"; }

# Fingerprint of everything that decides the environment's contents.
fingerprint="$(cat "$0" setup.cfg | sha256sum | cut -c1-16)-torch${torch_version}-tv${torchvision_version}"

check_imports() {
  "$venv/bin/python" - <<'PY'
import hmait, mmcv.ops, mmdet.models, mmseg.models, timm, torchvision  # noqa: F401
PY
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
  if check_imports 2>/dev/null; then
    log "environment at .venv is up to date"
    exit 0
  fi
  log "environment at .venv is stamped but does not import; rebuilding the missing parts"
fi

# ---- preconditions: fail fast with what is missing and how to fix it ----
command -v "$python_bin" >/dev/null 2>&1 \
  || fail "no Python interpreter '$python_bin' found; install Python 3.10-3.12 or set HMAIT_PYTHON=/path/to/python3.11"
"$python_bin" - <<'PY' || fail "Python $("$python_bin" -c 'import platform; print(platform.python_version())') is not supported; need 3.10, 3.11 or 3.12 (set HMAIT_PYTHON to one)"
import sys
sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)
PY
"$python_bin" -c "import venv, ensurepip" 2>/dev/null \
  || fail "Python '$python_bin' lacks the venv/ensurepip modules; on Debian/Ubuntu: apt install python3-venv"
cxx="${CXX:-}"
if [[ -z "$cxx" ]]; then
  for c in g++ c++ clang++; do command -v "$c" >/dev/null 2>&1 && { cxx="$c"; break; }; done
fi
[[ -n "$cxx" ]] || fail "no C++ compiler found (mmcv's ops are compiled from source); install one, e.g. apt install g++"

if [[ ! -x "$venv/bin/python" ]]; then
  log "creating virtual environment at .venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# The registry is needed from here on; a quick probe gives a clear message instead of a long pip retry loop.
"${pip[@]}" download --no-deps --dest "$(mktemp -d)" --timeout 30 --retries 1 "pip" >/dev/null 2>&1 \
  || fail "cannot reach the Python package registry (pip download failed); check the network or proxy (PIP_INDEX_URL)"

torch_args=()
[[ -n "${HMAIT_TORCH_INDEX:-}" ]] && torch_args+=(--extra-index-url "$HMAIT_TORCH_INDEX")

log "installing build tools and torch==$torch_version torchvision==$torchvision_version"
# setuptools<82: mmcv's setup.py and mmengine import pkg_resources, which setuptools 82 removed.
"${pip[@]}" install -q "setuptools<82" wheel ninja
"${pip[@]}" install -q "${torch_args[@]}" "torch==$torch_version" "torchvision==$torchvision_version"

# ---- mmcv with compiled ops, built once per torch version ----
mmcv_dir="$wheel_cache/torch-$torch_version"
mkdir -p "$mmcv_dir"
if ! "$venv/bin/python" -c "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '$mmcv_version')" 2>/dev/null; then
  wheel="$(ls "$mmcv_dir"/mmcv-"$mmcv_version"-*.whl 2>/dev/null | head -n 1 || true)"
  if [[ -z "$wheel" ]]; then
    log "building mmcv $mmcv_version with ops from source (about 12 minutes on 2 cores; cached afterwards in $mmcv_dir)"
    build="$(mktemp -d)"
    "${pip[@]}" download -q --no-deps --no-binary :all: --no-build-isolation --dest "$build" "mmcv==$mmcv_version"
    tar -xzf "$build"/mmcv-"$mmcv_version".tar.gz -C "$build"
    # torch >= 2.14 headers need C++20; mmcv 2.1.0 hard-codes -std=c++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-$mmcv_version/setup.py"
    (cd "$build/mmcv-$mmcv_version" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "${pip[@]}" wheel --no-build-isolation --no-deps -w "$mmcv_dir" .)
    rm -rf "$build"
    wheel="$(ls "$mmcv_dir"/mmcv-"$mmcv_version"-*.whl | head -n 1)"
  fi
  log "installing $(basename "$wheel")"
  "${pip[@]}" install -q --no-deps --force-reinstall "$wheel"
fi

log "installing the project and its dependencies"
# --no-build-isolation keeps the editable build on the venv's setuptools<82.
# setuptools<82 again: a dependency may otherwise upgrade it past pkg_resources, which mmengine needs.
"${pip[@]}" install -q --no-build-isolation -e ".[dev]" "setuptools<82"

check_imports || fail "the environment was built but 'import hmait, mmcv.ops, mmdet.models, mmseg.models, timm' fails; see the traceback above"
echo "$fingerprint" > "$stamp"
log "environment ready: $venv"
