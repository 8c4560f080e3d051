#!/usr/bin/env bash
# convkit's GPU bundle (made by `cargo xtask gpu-bundle`; docs/contributing.md says how to take
# it to a GPU machine). Run it from anywhere: `bash run.sh`. Results go to $OUT (default: `out`
# beside this script): summary.md, one log per step, compare.md/compare.json per comparison.
#
# Steps, each with a time limit so that the whole run stays within 8 minutes:
#   machine       nvidia-smi, the CPU and the CUDA libraries found (no limit: nvidia-smi has 20 s)
#   backends      `convkit backends`: which engines are built in and whether their device starts
#   conformance-* `convkit compare` of each CUDA engine against candle-cpu (the reference) on
#                 two small specs that use every layer kind: forward, one SGD step, an epoch
#   compare       `convkit compare` of tutorial-mnist on the CUDA engines and the CPU engines
# A CUDA engine whose device does not start (no GPU, no driver) is reported as skipped, and the
# run goes on to the end. Exit status: 0 when every step that ran passed, 1 otherwise.
#
# Variables: OUT (results), LIMIT (images per split for `compare`, default 30000 of the
# bundle's 30000 training and 5000 test images), EPOCHS (default 1).
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${OUT:-$here/out}
limit=${LIMIT:-30000}
epochs=${EPOCHS:-1}
mkdir -p "$out"
summary=$out/summary.md
: >"$summary"
failed=0

say() { printf '%s\n' "$*" | tee -a "$summary"; }

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in $out/NAME.log.
step() {
    local name=$1 limit_s=$2
    shift 2
    local start=$SECONDS rc verdict
    timeout --kill-after=10 "$limit_s" "$@" >"$out/$name.log" 2>&1
    rc=$?
    case $rc in
        0) verdict=PASS ;;
        3) verdict="FAIL (an agreement check failed)" ;;
        124 | 137) verdict="FAIL (over its ${limit_s} s limit)" ;;
        *) verdict=FAIL ;;
    esac
    ((rc == 0)) || failed=1
    say "- $name: $verdict, $((SECONDS - start)) s, exit $rc (log: $name.log)"
}

# The bundle's CUDA runtime (libcudart, which candle's kernels link), then the machine's CUDA
# libraries (driver, cuBLAS, NVRTC), which candle and burn load when they start a device.
lib=$here/lib
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
    /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib; do
    [ -d "$dir" ] && lib=$lib:$dir
done
export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The bundle's Fashion-MNIST subset, and no downloads: the GPU machine has no network.
export CONVKIT_DATA=$here/data CONVKIT_OFFLINE=1
# The binary travels compressed: stripped, it is 174 MB, mostly candle's and CubeCL's CUDA code.
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
convkit=$unpacked/convkit
if command -v xz >/dev/null; then
    xz --decompress --stdout "$here/bin/convkit.xz" >"$convkit"
else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$here/bin/convkit.xz" "$convkit"
fi || { echo "cannot unpack $here/bin/convkit.xz" >&2; exit 1; }
chmod +x "$convkit"
# burn-cuda's kernels are compiled by NVRTC against the CUDA headers: the machine's where
# CubeCL finds them ($CUDA_PATH, /usr/local/cuda, /opt/cuda), else the bundle's (CUDA 13.0).
cuda_headers=
for dir in ${CUDA_PATH:-} /usr/local/cuda /opt/cuda; do
    [ -f "$dir/include/cuda_runtime.h" ] && cuda_headers=$dir/include && export CUDA_PATH=$dir && break
done
if [ -z "$cuda_headers" ]; then
    mkdir -p "$unpacked/cuda" && tar --extract --xz --file "$here/cuda-include.tar.xz" \
        --directory "$unpacked/cuda" && export CUDA_PATH=$unpacked/cuda &&
        cuda_headers="the bundle's ($CUDA_PATH/include)"
fi

say "# convkit GPU bundle, $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname)"
say ""
gpu=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
    --format=csv,noheader 2>/dev/null) || gpu="no GPU (nvidia-smi is missing or failed)"
{
    echo "GPU (name, driver, memory, compute capability): $gpu"
    lscpu | grep -E '^(Model name|CPU\(s\)):' || true
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "CUDA headers for NVRTC: $cuda_headers"
    for name in libcuda.so libcublas.so libcublasLt.so libnvrtc.so libcurand.so; do
        found=$(ldconfig -p | grep -F "$name" | head -1)
        for dir in ${LD_LIBRARY_PATH//:/ }; do
            [ -n "$found" ] && break
            found=$(ls "$dir/$name"* 2>/dev/null | head -1)
        done
        echo "$name: ${found:-not found}"
    done
    "$convkit" --version
} >"$out/machine.log" 2>&1
say "- machine: $gpu; $(lscpu | sed -n 's/^Model name: *//p' | head -1) (log: machine.log)"

step backends 60 "$convkit" backends
cuda=()
for engine in candle-cuda burn-cuda; do
    line=$(grep -E "^$engine " "$out/backends.log" || true)
    case $line in
        "")
            say "- $engine: not built into this bundle"
            failed=1
            ;;
        *"unavailable:"*) say "- $engine: skipped, its device did not start:${line#*unavailable:}" ;;
        *) cuda+=("$engine") ;;
    esac
done

if ((${#cuda[@]})); then
    engines=candle-cpu,$(IFS=,; echo "${cuda[*]}")
    for spec in every-layer global-pooling; do
        step "conformance-$spec" 70 "$convkit" compare --backends "$engines" \
            --model "$here/specs/$spec.json" --limit 1024 --out "$out/conformance-$spec"
    done
else
    say "- conformance: skipped, no CUDA engine started"
fi

engines=$(IFS=,; echo "candle-cpu,burn-flex${cuda[*]:+,${cuda[*]}}")
step compare 210 "$convkit" compare --backends "$engines" --model tutorial-mnist \
    --limit "$limit" --epochs "$epochs" --out "$out/compare"

say ""
if [ -f "$out/compare/compare.md" ]; then
    cat "$out/compare/compare.md" >>"$summary"
fi
say ""
say "$([ "$failed" = 0 ] && echo "every step that ran passed" || echo "a step failed")"
exit "$failed"
