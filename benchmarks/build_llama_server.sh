#!/usr/bin/env bash
# Build llama.cpp's `llama-server`, `llama-bench` and `llama-quantize` (shaped_gguf.py) from the
# llama-cpp-python source package (the same llama.cpp revision as the installed Python binding)
# and put them next to the venv's
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

# The CPU's ISA spelled out from /proc/cpuinfo rather than GGML_NATIVE: on the Intel Xeons of
# our machines (KVM guests, AMX) a -march=native build dies with "Illegal instruction" at a
# `tilezero` in llama.cpp's AMX backend (tinygemm_kernel_amx, this revision), so its AMX
# switches stay off unless LLAMA_AMX=ON; its AVX512/VNNI/BF16 paths are on where the CPU has
# them. LLAMA_CPU_ARGS overrides the lot.
cpu_has() { grep -qw "$1" /proc/cpuinfo; }
ISA=(-DGGML_NATIVE=OFF)
for pair in avx:GGML_AVX avx2:GGML_AVX2 fma:GGML_FMA f16c:GGML_F16C bmi2:GGML_BMI2 \
  avx_vnni:GGML_AVX_VNNI avx512f:GGML_AVX512 avx512vbmi:GGML_AVX512_VBMI \
  avx512_vnni:GGML_AVX512_VNNI avx512_bf16:GGML_AVX512_BF16; do
  if cpu_has "${pair%%:*}"; then ISA+=("-D${pair#*:}=ON"); else ISA+=("-D${pair#*:}=OFF"); fi
done
for flag in GGML_AMX_TILE GGML_AMX_INT8 GGML_AMX_BF16; do
  if [ "${LLAMA_AMX:-OFF}" = ON ] && cpu_has amx_tile; then ISA+=("-D$flag=ON"); else ISA+=("-D$flag=OFF"); fi
done
if [ -n "${LLAMA_CPU_ARGS:-}" ]; then read -r -a ISA <<<"$LLAMA_CPU_ARGS"; fi
echo "CPU flags: ${ISA[*]}"
cmake -S "$SRC" -B "$WORK/build" "${GEN[@]}" \
  -DCMAKE_BUILD_TYPE=Release "${ISA[@]}" -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
nice -n 10 cmake --build "$WORK/build" --target llama-server llama-bench llama-quantize -j "$JOBS"

install -m 755 "$WORK/build/bin/llama-server" "$WORK/build/bin/llama-bench" \
    "$WORK/build/bin/llama-quantize" "$VENV/bin/"
echo "installed $VENV/bin/llama-server, llama-bench and llama-quantize"
