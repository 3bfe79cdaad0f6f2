#!/usr/bin/env bash
# Two moeflux builds' prompt and decode speed on one GPU, alternated, with
# llama.cpp beside them on the same files: the comparison behind the GPU
# sections of bench/BENCHMARKS.md (their device scripts, `.devpack/runN.sh`,
# were this with the builds and files of each run).
#
# Usage: scripts/bench/gpu_ab.sh BASE_BIN NEW_BIN [QUANT ...]
#
#   BASE_BIN, NEW_BIN  moeflux binaries built with `--features gpu`
#   QUANT              the large matrices' type of each file, written by
#                      `moeflux synth --preset qwen3-30b-a3b` into $WORK
#                      unless there already (default: q4_0)
#
# Environment:
#   WORK=/tmp          where the model files go (16.2 GiB each at full size)
#   LAYERS=N           keep only N layers (a quick check; not a benchmark)
#   P=512 N=128 R=5    prompt tokens, decode tokens, repetitions
#   PROFILE=1          first print each build's GPU time by kernel
#                      (MOEFLUX_GPU_PROFILE; it slows the run it profiles)
#   LLAMA_SRC=DIR      llama.cpp's source (the one llama-cpp-python vendors):
#                      built with CUDA for CUDA_ARCH (default 90) while the
#                      builds run, then `llama-bench -ngl 99` on each file
#   LLAMA_VK=BIN       a llama-bench built with -DGGML_VULKAN=ON: run on
#                      each file after the builds (the same driver as
#                      moeflux's; see bench/BENCHMARKS.md, fifteenth GPU
#                      session, for how it was built)
#
# Each build runs twice per file, in the order base, new, base, new, so a
# drift of the machine shows as a difference between the two runs of one
# build. Medians of R runs are printed, with the runs.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
base=$1
new=$2
shift 2
quants=("${@:-q4_0}")
work=${WORK:-/tmp}
mkdir -p "$work"
p=${P:-512}
n=${N:-128}
r=${R:-5}
for bin in "$base" "$new"; do
    [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
done

# The model file of type $1 (the same name for the builds and llama.cpp).
model_file() { echo "$work/qwen3-30b-a3b-$1${LAYERS:+-$LAYERS}.gguf"; }

t0=$(date +%s)
say() { echo "[$(($(date +%s) - t0))s] $*"; }

llama=""
if [ -n "${LLAMA_SRC:-}" ]; then
    build="$work/llama-build"
    (cmake -S "$LLAMA_SRC" -B "$build" -G Ninja -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DLLAMA_CURL=OFF \
        -DCMAKE_BUILD_TYPE=Release >"$work/llama-build.log" 2>&1 &&
        cmake --build "$build" -j "$(nproc)" --target llama-bench \
            >>"$work/llama-build.log" 2>&1) &
    llama=$!
fi

summary='import json, sys
d = json.load(open(sys.argv[1]))
def runs(k): return ", ".join("%.1f" % v for v in d[k])
print("prompt %.1f (%s)  decode %.1f (%s)  load %.1f s" % (d["prompt_tok_s"], runs("prompt_tok_s_runs"),
      d["decode_tok_s"], runs("decode_tok_s_runs"), d["load_s"]))'

for q in "${quants[@]}"; do
    file=$(model_file "$q")
    if [ ! -f "$file" ]; then
        say "synth $q"
        "$base" synth --preset qwen3-30b-a3b --quant "$q" ${LAYERS:+--layers "$LAYERS"} -o "$file" | tail -n 1
    fi
    if [ -n "${PROFILE:-}" ]; then
        for bin in "$base" "$new"; do
            say "profile $q $bin"
            MOEFLUX_GPU_PROFILE=1 "$bin" bench -m "$file" --backend gpu -p "$p" -n 32 --warmup |
                grep '^kernels' || true
        done
    fi
    for bin in "$base" "$new" "$base" "$new"; do
        say "$q $bin"
        "$bin" bench -m "$file" --backend gpu -p "$p" -n "$n" -r "$r" --warmup --json >"$work/ab.json"
        python3 -c "$summary" "$work/ab.json"
    done
done

if [ -n "${LLAMA_VK:-}" ]; then
    for q in "${quants[@]}"; do
        say "llama.cpp Vulkan $q"
        "$LLAMA_VK" -m "$(model_file "$q")" -ngl 99 -p "$p" -n "$n" -r 3 |
            grep -E "pp$p|tg$n|build"
    done
fi

if [ -n "$llama" ]; then
    say "waiting for the llama.cpp build"
    wait "$llama" || { tail -n 20 "$work/llama-build.log"; exit 1; }
    for q in "${quants[@]}"; do
        file=$(model_file "$q")
        say "llama.cpp $q"
        "$work/llama-build/bin/llama-bench" -m "$file" -ngl 99 -p "$p" -n "$n" -r 3 |
            grep -E "pp$p|tg$n|build"
    done
fi
say end
