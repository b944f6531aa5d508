#!/usr/bin/env bash
# Build (or check) the project's virtual environment at .venv in the repository root.
#
#   bash tools/setup_env.sh [full]   everything: the core below plus mmcv (compiled ops), mmdet,
#                                    mmsegmentation, the deployment runtimes (ONNX Runtime, OpenVINO
#                                    and the project's OpenVINO extension) and the test tools
#                                    (make setup, make test)
#   bash tools/setup_env.sh core     classification only: torch, torchvision, timm, mmengine, the
#                                    project and its CPU kernel (make demo); no mmcv compile
# Both modes build the same .venv: 'full' after 'core' adds the rest without redoing the core.
#
# Every pip call is constrained by requirements/lock.txt, an exact version for every package
# installed here (transitive ones included), so each machine gets the same environment; see
# requirements/README.md for how to refresh the lock on purpose.
#
# Idempotent: when .venv already matches this script, setup.cfg and the lock (one stamp per mode),
# it only checks that the stack imports and exits in a few seconds. The slow part, compiling mmcv's ops, is done once
# per torch version into a wheel cache outside the repository.
#
# Overridable through the environment:
#   HMAIT_PYTHON       interpreter to build the venv with        (default: python3)
#   HMAIT_TORCH        torch version                             (default: the lock's)
#   HMAIT_TORCHVISION  the matching torchvision version          (default: the lock's)
#   HMAIT_TORCH_INDEX  extra index URL for other CUDA builds, e.g. https://download.pytorch.org/whl/cu126
#   HMAIT_WHEEL_CACHE  where the compiled mmcv wheel is kept     (default: ~/.cache/hmait/wheels)
#   MAX_JOBS           parallel compile jobs for mmcv            (default: number of cores)
# Any torch override releases torch, torchvision, triton and the CUDA runtime packages (nvidia-*,
# cuda-*) from the lock; every other package stays pinned.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

fail() { echo "setup_env: ERROR: $*" >&2; exit 1; }
log() { echo "setup_env: $*"; }

mode="${1:-full}"
case "$mode" in
  core) total=4 ;;
  full) total=7 ;;
  *) fail "unknown mode '$mode' (the first argument): use 'core' (classification: torch, torchvision, timm," \
          "mmengine, the project and its CPU kernel) or 'full' (the core plus mmcv, mmdet, mmsegmentation and the" \
          "test tools; the default)" ;;
esac
(( $# <= 1 )) || fail "too many arguments ($*): the only one is the mode, 'core' or 'full'"

# HMAIT_LOCK: another constraints file, only for refreshing the lock (requirements/README.md).
lock="${HMAIT_LOCK:-$repo/requirements/lock.txt}"
[[ -f "$lock" ]] || fail "the lock file $lock is missing; restore it with 'git checkout requirements/lock.txt'"
locked_version() {  # locked_version NAME -> the version pinned in the lock (empty if none)
  sed -n -E "s/^$1==([^ ;#]+).*/\1/p" "$lock" | head -n 1
}

python_bin="${HMAIT_PYTHON:-python3}"
torch_version="${HMAIT_TORCH:-$(locked_version torch)}"
torchvision_version="${HMAIT_TORCHVISION:-$(locked_version torchvision)}"
mmcv_version="$(locked_version mmcv)"
[[ -n "$torch_version" && -n "$torchvision_version" && -n "$mmcv_version" ]] \
  || fail "$lock pins no torch, torchvision or mmcv version (torch==X lines); restore it with 'git checkout requirements/lock.txt'"
wheel_cache="${HMAIT_WHEEL_CACHE:-$HOME/.cache/hmait/wheels}"
venv="$repo/.venv"
stamp="$venv/.hmait-setup-stamp"            # the full environment
core_stamp="$venv/.hmait-setup-core-stamp"  # the core (also valid under a full environment)
# Packages the lock no longer pins in this environment (a torch override); the drift test reads it.
released_file="$venv/.hmait-lock-released"

torch_override=0
if [[ "$torch_version" != "$(locked_version torch)" || "$torchvision_version" != "$(locked_version torchvision)" \
      || -n "${HMAIT_TORCH_INDEX:-}" ]]; then
  torch_override=1
fi

# Fingerprint of everything that decides the environment's contents.
fingerprint="$(cat "$0" setup.cfg "$lock" | sha256sum | cut -c1-16)-torch${torch_version}-tv${torchvision_version}"
fingerprint+="-index${HMAIT_TORCH_INDEX:-}"

core_modules="hmait, timm, torchvision, mmengine"
full_modules="$core_modules, mmcv.ops, mmdet.models, mmseg.models"
check_imports() {  # check_imports MODULES
  "$venv/bin/python" -c "import $1  # noqa: F401"
}
stamped() { [[ -f "$1" && "$(cat "$1")" == "$fingerprint" ]]; }

if [[ "$mode" == full ]] && stamped "$stamp"; then
  if check_imports "$full_modules" 2>/dev/null; then
    log "environment at .venv is up to date"
    exit 0
  fi
  log "environment at .venv is stamped but does not import; rebuilding the missing parts"
fi
core_ready=0
if { stamped "$core_stamp" || stamped "$stamp"; } && check_imports "$core_modules" 2>/dev/null; then
  core_ready=1
  if [[ "$mode" == core ]]; then
    log "environment at .venv is up to date (core: classification)"
    exit 0
  fi
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
[[ -n "$cxx" ]] || fail "no C++ compiler found (the project's CPU kernel and mmcv's ops are compiled from source); install one, e.g. apt install g++"

if [[ ! -x "$venv/bin/python" ]]; then
  log "creating virtual environment at .venv"
  "$python_bin" -m venv "$venv"
fi

# The constraints every pip call uses: the lock, less what a torch override releases.
constraints="$venv/.hmait-constraints.txt"
if (( torch_override )); then
  grep -v -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' "$lock" > "$constraints"
  grep -o -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' "$lock" | tr -d '=' > "$released_file"
  log "torch override (torch $torch_version, torchvision $torchvision_version${HMAIT_TORCH_INDEX:+, index $HMAIT_TORCH_INDEX}):" \
      "torch, torchvision, triton and the CUDA runtime packages are not taken from the lock"
else
  cp "$lock" "$constraints"
  : > "$released_file"
fi
# PIP_CONSTRAINT also reaches pip's own subprocesses (build environments of source packages).
export PIP_CONSTRAINT="$constraints"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
step_log="$venv/.hmait-setup.log"

# What to try after a failed step, from the most telling line of pip's output; HINT otherwise.
diagnose() {  # diagnose HINT
  local missing
  missing="$(grep -o -m 1 'No matching distribution found for [^ ]*' "$step_log" || true)"
  if grep -q -E 'ResolutionImpossible|conflicting dependencies' "$step_log"; then
    echo "pip found no set of versions that satisfies both the request and the lock (see 'The conflict is" \
         "caused by' above): the lock and setup.cfg disagree, or a pin does not exist; refresh the lock as" \
         "requirements/README.md describes."
  elif [[ -n "$missing" ]]; then
    echo "pip reports '$missing' for Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')" \
         "on $(uname -m): the lock was resolved on CPython 3.11 for x86-64; use that (HMAIT_PYTHON=python3.11)" \
         "or refresh the lock as requirements/README.md describes."
  elif grep -q -i -E 'connection|timed out|name resolution|proxy|ssl' "$step_log"; then
    echo "The package registry could not be reached reliably; check the network or proxy (PIP_INDEX_URL)" \
         "and run the command again: the steps already done are kept."
  else
    echo "$1"
  fi
}

# run_step STEP PACKAGE HINT COMMAND...: run one install step; on failure, say which step and
# package failed and what to try, with the end of pip's output, instead of a bare traceback.
run_step() {
  local step="$1" package="$2" hint="$3"
  shift 3
  log "$step"
  if ! "$@" >"$step_log" 2>&1; then
    echo "----- last lines of the output (all of it: $step_log) -----" >&2
    tail -n 25 "$step_log" >&2
    echo "-----" >&2
    fail "step '$step' failed while installing $package. $(diagnose "$hint")"
  fi
}
retry_hint="Run the command again: the steps already done are kept. The full output names the failing package."

# The registry is needed from here on; a quick probe gives a clear message instead of a long pip retry loop.
"${pip[@]}" download --no-deps --dest "$(mktemp -d)" --timeout 30 --retries 1 "pip" >/dev/null 2>&1 \
  || fail "cannot reach the Python package registry (pip download failed); check the network or proxy (PIP_INDEX_URL)"

torch_args=()
[[ -n "${HMAIT_TORCH_INDEX:-}" ]] && torch_args+=(--extra-index-url "$HMAIT_TORCH_INDEX")

# ---- the core: what classification (tools/train.py, tools/predict.py, timm.create_model) needs ----
if (( core_ready )); then
  log "[1-4/$total] the core (torch, timm, mmengine, the project, its CPU kernel) is already set up"
else
  # setuptools<82 (pinned in the lock): mmcv's setup.py and mmengine import pkg_resources, which setuptools 82 removed.
  run_step "[1/$total] installing the build tools (pip, setuptools, wheel, ninja) at their locked versions" \
    "pip/setuptools/wheel/ninja" "$retry_hint" \
    "${pip[@]}" install pip setuptools wheel ninja
  run_step "[2/$total] installing torch==$torch_version and torchvision==$torchvision_version (a large download)" \
    "torch==$torch_version torchvision==$torchvision_version" \
    "$retry_hint For another CUDA build set HMAIT_TORCH, HMAIT_TORCHVISION and HMAIT_TORCH_INDEX (requirements/README.md)." \
    "${pip[@]}" install "${torch_args[@]}" "torch==$torch_version" "torchvision==$torchvision_version"
  # --no-build-isolation keeps the editable build on the venv's locked setuptools.
  run_step "[3/$total] installing the project and its core dependencies (timm, mmengine) at their locked versions" \
    "hmait and its dependencies" "$retry_hint" \
    "${pip[@]}" install --no-build-isolation -e .
  # The compiled CPU kernel of the masked heads (hmait/ops/csrc), built into ~/.cache/hmait/extensions
  # (HMAIT_EXTENSION_DIR) now rather than on a model's first forward pass.
  run_step "[4/$total] compiling the CPU masked-attention kernel (about a minute)" "the hmait CPU kernel (hmait/ops/csrc)" \
    "The C++ compiler failed on hmait/ops/csrc (it needs C++17 and OpenMP, e.g. g++ >= 9); see the compiler's lines above." \
    env MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$venv/bin/python" -c \
    "from hmait.ops import cpu_kernel; import sys; ok = cpu_kernel.build(verbose=True); print(cpu_kernel.cpu_kernel_status()[1]); sys.exit(not ok)"
  check_imports "$core_modules" \
    || fail "the core environment was built but 'import $core_modules' fails; see the traceback above"
  echo "$fingerprint" > "$core_stamp"
fi
if [[ "$mode" == core ]]; then
  log "core environment ready (classification): $venv; 'make setup' adds detection, segmentation and the tests"
  exit 0
fi

# ---- mmcv with compiled ops, built once per torch version ----
mmcv_dir="$wheel_cache/torch-$torch_version"
mkdir -p "$mmcv_dir" || fail "cannot create the wheel cache $mmcv_dir; set HMAIT_WHEEL_CACHE to a writable folder"
if ! "$venv/bin/python" -c "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '$mmcv_version')" 2>/dev/null; then
  wheel="$(ls "$mmcv_dir"/mmcv-"$mmcv_version"-*.whl 2>/dev/null | head -n 1 || true)"
  if [[ -z "$wheel" ]]; then
    build="$(mktemp -d)"
    run_step "[5/$total] downloading the mmcv $mmcv_version source" "mmcv==$mmcv_version (source)" "$retry_hint" \
      "${pip[@]}" download --no-deps --no-binary :all: --no-build-isolation --dest "$build" "mmcv==$mmcv_version"
    tar -xzf "$build"/mmcv-"$mmcv_version".tar.gz -C "$build"
    # torch >= 2.14 headers need C++20; mmcv 2.1.0 hard-codes -std=c++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-$mmcv_version/setup.py"
    (cd "$build/mmcv-$mmcv_version" && export MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      && run_step "[5/$total] compiling mmcv $mmcv_version with its ops (about 10 minutes on 2 cores; cached afterwards in $mmcv_dir)" \
        "mmcv==$mmcv_version (compiled ops)" \
        "The compiler ($cxx) failed: check that it supports C++20 (g++ >= 10 or clang++ >= 10), or lower MAX_JOBS if it ran out of memory." \
        "${pip[@]}" wheel --no-build-isolation --no-deps -w "$mmcv_dir" .)
    rm -rf "$build"
    wheel="$(ls "$mmcv_dir"/mmcv-"$mmcv_version"-*.whl | head -n 1)"
  else
    log "[5/$total] using the cached mmcv wheel $wheel"
  fi
  run_step "[5/$total] installing $(basename "$wheel")" "mmcv==$mmcv_version" \
    "The cached wheel may be damaged: delete $mmcv_dir and run the command again to rebuild it." \
    "${pip[@]}" install --no-deps --force-reinstall "$wheel"
else
  log "[5/$total] mmcv $mmcv_version with ops is already installed"
fi

run_step "[6/$total] installing mmdet, mmsegmentation, the deployment runtimes and the test tools at their locked versions" \
  "hmait[dev] and its dependencies" "$retry_hint" \
  "${pip[@]}" install --no-build-isolation -e ".[dev]"

check_imports "$full_modules" || fail "the environment was built but 'import $full_modules' fails; see the traceback above"

# The OpenVINO extension of the masked heads (hmait/ops/csrc), built against the openvino wheel into the
# extension folder now rather than when an export first needs it.
run_step "[7/$total] compiling the OpenVINO extension of the masked heads (about half a minute)" \
  "the hmait OpenVINO extension (hmait/ops/csrc/masked_attention_openvino.cpp)" \
  "The C++ compiler failed on the extension (it needs C++17); see the compiler's lines above." \
  env MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$venv/bin/python" -c \
  "from hmait.ops import openvino_extension as e; import sys; ok = e.build(verbose=True); print(e.status()[1]); sys.exit(not ok)"
echo "$fingerprint" > "$core_stamp"
echo "$fingerprint" > "$stamp"
log "environment ready: $venv"
