#!/usr/bin/env bash
# Configure and build moecpt (Release) into ./build. Extra args go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j"$(nproc)"
