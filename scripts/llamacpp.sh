#!/usr/bin/env bash
# Install llama-cpp-python (its OpenAI-compatible server and quantize API: what comptrust.engine.llamacpp uses) into the
# active venv, compiling only the C/C++ its Python code loads: libllama and ggml, from the llama.cpp sources that
# its own sdist vendors (so the ctypes bindings and the libraries are the same commit). Plain
# `pip install llama-cpp-python` also compiles llama.cpp's `common` library, which the Python package never loads,
# and PyPI has no Linux wheel of it. The built libraries are kept in
# $COMPTRUST_HOME/llama-cpp/<version>-<build key>/ (default ~/.cache/comptrust), so a later set-up (a fresh venv,
# an empty pip cache) installs in seconds. `rm -r` that folder (or `comptrust cache clear --llama-cpp`) to rebuild.
#
# Cost on the 2-core CI CPU (bench/results/llamacpp_install.md; measured at load 5-9, so wall times are inflated):
# first run 485 CPU-s with libllama at -O3 (compiling libllama 334, ggml 139; the rest pip), 1,860 s wall at that
# load, ~4-5 min quiet; with libllama at -O1 (below) 365 CPU-s, 465 s wall at load 3-6;
# with the libraries cached, 68 s wall / 15 CPU-s (pip installing the Python package from the cached sdist).
#
# libllama itself (model graphs, loader, sampler: not the matrix kernels, which are ggml's and stay at -O3) is compiled
# at -O1: 218 instead of 334 CPU-s, and a 96-token completion on the embedded model took the same time within the
# noise of this shared machine (12.2/15.8 s vs 15.5/14.3 s, best of 3, load ~5).
#
# Knobs: COMPTRUST_LLAMACPP_VERSION (default below), COMPTRUST_LLAMACPP_LLAMA_OPT (libllama's optimisation flag,
# default -O1; empty = the Release default -O3), CMAKE_BUILD_PARALLEL_LEVEL (default: all cores). Portable CPU build
# (GGML_NATIVE=OFF: AVX2/FMA/F16C, no AVX-512), as the previous `CMAKE_ARGS=-DGGML_NATIVE=OFF pip install` was.
set -euo pipefail
VERSION="${COMPTRUST_LLAMACPP_VERSION:-0.3.36}"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
LLAMA_OPT="${COMPTRUST_LLAMACPP_LLAMA_OPT--O1}"
FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
       -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
       -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON "-DCMAKE_INSTALL_RPATH=\$ORIGIN")
CC_VERSION="$(${CXX:-c++} -dumpfullversion 2>/dev/null || echo unknown)"
KEY="$(printf '%s\n' "$VERSION" "${FLAGS[*]}" "$(uname -m)" "$CC_VERSION" "llama:$LLAMA_OPT" | sha256sum | cut -c1-12)"
CACHE="${COMPTRUST_HOME:-$HOME/.cache/comptrust}/llama-cpp/$VERSION-$KEY"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
t0=$SECONDS
say() { echo "llama.cpp: $* ($((SECONDS - t0)) s)"; }

mkdir -p "$CACHE"
if [ ! -s "$SDIST" ]; then
  tmp="$(mktemp -d "$CACHE/dl.XXXXXX")"
  python -m pip download -q --no-deps --no-binary=llama-cpp-python "llama-cpp-python==$VERSION" -d "$tmp"
  mv "$tmp"/llama_cpp_python-*.tar.gz "$SDIST" && rm -rf "$tmp"
  say "downloaded $(basename "$SDIST")"
fi

# the Python package and its server's dependencies, without compiling anything (LLAMA_BUILD=OFF is the sdist's own
# switch). --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, so a cached library-less wheel
# could later be handed to a plain `pip install llama-cpp-python`.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python -m pip install -q --no-cache-dir \
  "llama-cpp-python[server] @ file://$SDIST"
say "installed the Python package (llama-cpp-python $VERSION, no native code)"

if [ ! -s "$CACHE/lib/libllama.so" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  tar -xzf "$SDIST" -C "$work" "llama_cpp_python-$VERSION/vendor/llama.cpp"
  src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
  if [ -n "$LLAMA_OPT" ]; then  # the last -O on the command line wins over the Release -O3
    echo "target_compile_options(llama PRIVATE $LLAMA_OPT)" >>"$src/src/CMakeLists.txt"
  fi
  cmake -S "$src" -B "$work/build" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    "${FLAGS[@]}" >"$work/configure.log" 2>&1 || { tail -20 "$work/configure.log"; exit 1; }
  say "configured; compiling libllama + ggml with $JOBS jobs (the one slow step, once per $CACHE)"
  cmake --build "$work/build" --target llama -j "$JOBS" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
  rm -rf "$CACHE/lib.tmp" && mkdir -p "$CACHE/lib.tmp"
  find "$work/build" -name 'lib*.so*' \( -type f -o -type l \) -exec cp -P {} "$CACHE/lib.tmp/" \;
  [ -s "$CACHE/lib.tmp/libllama.so" ] || { echo "llama.cpp: the build made no libllama.so"; exit 1; }
  rm -rf "$CACHE/lib" && mv "$CACHE/lib.tmp" "$CACHE/lib"  # a half-copied folder is never taken for a build
  say "built $(ls "$CACHE/lib" | tr '\n' ' ')"
else
  say "reusing the libraries built earlier in $CACHE/lib"
fi

pkg="$(python -c 'import importlib.util as u; print(u.find_spec("llama_cpp").submodule_search_locations[0])')"
mkdir -p "$pkg/lib"
cp -P "$CACHE"/lib/lib*.so* "$pkg/lib/"
python -c "import llama_cpp, llama_cpp.server; print('llama.cpp: llama-cpp-python', llama_cpp.__version__, 'loads', \
llama_cpp.llama_print_system_info().decode().split('|')[0].strip())"
say "ready"
