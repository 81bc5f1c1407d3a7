#!/usr/bin/env bash
# Build llama.cpp's `llama-server` and `llama-bench` from the llama-cpp-python source package
# (the same llama.cpp revision as the installed Python binding) and put them next to the venv's
# Python, where bench_server.py finds them. Needs cmake, ninja (or make) and a C++17 compiler;
# no network beyond PyPI. About 15 minutes on 2 cores.
#
#   benchmarks/build_llama_server.sh [VENV]     # VENV defaults to .venv
set -euo pipefail

VENV=${1:-.venv}
VERSION=$("$VENV/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)" 2>/dev/null || echo 0.3.36)
WORK=${LLAMA_BUILD_DIR:-$(mktemp -d -t llama-server-build-XXXXXX)}
JOBS=${JOBS:-$(nproc)}

echo "building llama-server from llama-cpp-python $VERSION in $WORK"
"$VENV/bin/pip" download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$WORK" -q
tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$SRC" -B "$WORK/build" "${GEN[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
nice -n 10 cmake --build "$WORK/build" --target llama-server llama-bench -j "$JOBS"

install -m 755 "$WORK/build/bin/llama-server" "$WORK/build/bin/llama-bench" "$VENV/bin/"
echo "installed $VENV/bin/llama-server and $VENV/bin/llama-bench"
