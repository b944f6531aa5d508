#!/usr/bin/env bash
# Build aoti_runner against the torch wheel of the project's .venv (or the interpreter given as
# $PYTHON): its headers, its libraries, and an rpath to them, so the binary runs without setting
# LD_LIBRARY_PATH. The rpath is an old-style DT_RPATH and libtorch is linked even though the runner
# calls none of its symbols: the package's own library, which torch opens at run time, needs
# libtorch.so and finds it only that way. Needs a C++20 compiler (torch 2.14 headers) ($CXX, default c++).
#
#   bash tools/deploy/aoti_runner/build.sh [OUT]     (default OUT: tools/deploy/aoti_runner/aoti_runner)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../../../.venv/bin/python}"
out="${1:-$here/aoti_runner}"
[[ -x "$python" ]] || { echo "build.sh: error: no Python at $python; run 'make setup' or set PYTHON" >&2; exit 2; }
torch_dir="$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
abi="$("$python" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))')"
"${CXX:-c++}" -O2 -std=c++20 -D_GLIBCXX_USE_CXX11_ABI="$abi" "$here/aoti_runner.cpp" -o "$out" \
  -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
  -L"$torch_dir/lib" -Wl,--disable-new-dtags,-rpath,"$torch_dir/lib" \
  -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -Wl,--as-needed -ldl
echo "built $out"
