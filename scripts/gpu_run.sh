#!/usr/bin/env bash
# The GPU checks and measurements of issues 5 and 6, on a lent GPU machine.
#
#   scripts/gpu_pack.sh                     # here, first: builds and packs .gpu/
#   # device tool, carry [".gpu"], two calls (each well under the 10-minute limit):
#   scripts/gpu_run.sh check big            # correctness, then OPT-6.7B memory (~7 min)
#   scripts/gpu_run.sh perf sanitize        # speed against ceilings and PyTorch (~8 min)
#   scripts/gpu_run.sh wgmma                # wgmma GEMM + tensor-core attention vs PyTorch (~8 min)
#   scripts/gpu_run.sh local                # here, no GPU: the perf, big and wgmma plumbing
#                                           # at tiny shapes on --device cpu
#
# Phases run in the order given, sharing one time budget:
# check: tests/cuda_ops.rs in full (per-op max errors), tests/wgpu_ops.rs on the GPU through
#   Vulkan, the GPU-touching CLI/bench/streaming tests, the MiniLM SST-2-1000 fine-tune on
#   --device cuda twice (dev accuracy against the CPU's, bit-for-bit repeatability), a
#   MiniLM epoch on --device wgpu (throughput against CUDA).
# perf: the op table against the card's ceilings (JSON + PNG); beft vs PyTorch eager and
#   torch.compile training steps at bert-base 32x512 and opt-1.3b 8x1024, in one run.
# big: OPT-6.7B at 4x1024: training vs forward-only peak, resident vs streamed, kept vs
#   recomputed activations, the streamed step against the upload bound.
# sanitize: compute-sanitizer memcheck over the op tests, in the time left.
# wgmma (H100/H200 only): the matmul and attention rows of the op table with the mma.sync
#   GEMM and f32 attention (BEFT_CUDA_GEMM=bf16) and with the wgmma GEMM and tensor-core
#   attention (wgmma-bf16, BEFT_CUDA_ATTN=bf16) side by side against cuBLAS (and the
#   attention rows at OPT-6.7B's head dimension 128), then beft
#   with the latter (PyTorch bf16 autocast's numerics) vs PyTorch eager and torch.compile
#   at the perf phase's configs. (Correctness is in check: tests/cuda_ops.rs runs both
#   wgmma modes on sm_90 and both attention kernel families.)
#
# Everything goes to $OUT (at most 8 files come back: check + big make 8): summary.md (each
# step, exit code, seconds), env.txt and one log per step group; perf and big add results.tgz (every JSON,
# the PNG, the comparison tables). Each step runs under a timeout cut from the call's
# budget (GPU_RUN_BUDGET seconds, default 560: a device call may run 600), so the files
# come back even when a step hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASES=$*
[ -n "$PHASES" ] || PHASES=none
for p in $PHASES; do
    case "$p" in check | perf | big | sanitize | wgmma | local) ;; *)
        echo "usage: scripts/gpu_run.sh PHASE... (check, perf, big, sanitize, wgmma; or local alone)" >&2
        exit 2
        ;;
    esac
done
has() { case " $PHASES " in *" $1 "*) return 0 ;; esac; return 1; }
PHASE=gpu
if has local; then PHASE=local; fi
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET:-560}
OUT=${OUT:-$PWD/runs/gpu-${PHASES// /-}}
mkdir -p "$OUT"
W=${GPU_RUN_WORK:-/tmp/beft-gpu}
SUMMARY=$OUT/summary.md
RESERVE=15 # seconds kept for packing the results

log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$SUMMARY" >&2; }
left() { echo $((BUDGET - RESERVE - ($(date +%s) - START))); }

# step NAME MAX_SECONDS LOGFILE cmd...: run cmd under a timeout of min(MAX, time left),
# appending its output to LOGFILE, and note the outcome in the summary.
step() {
    local name=$1 max=$2 logf=$3
    shift 3
    local t
    t=$(left)
    [ "$t" -gt "$max" ] && t=$max
    if [ "$t" -lt 5 ]; then
        log "SKIP $name (no time left)"
        return 0
    fi
    echo "=== $name (timeout ${t}s): $*" >> "$logf"
    local s=$(date +%s)
    timeout --kill-after=5 "$t" "$@" >> "$logf" 2>&1
    local rc=$?
    local took=$(($(date +%s) - s))
    case $rc in
        0) log "ok   $name (${took}s)" ;;
        124 | 137) log "TIME $name (killed after ${took}s)" ;;
        *) log "FAIL $name (exit $rc, ${took}s)" ;;
    esac
    return 0
}

echo "# scripts/gpu_run.sh $PHASES, $(date -u +%FT%TZ)" > "$SUMMARY"

# --- the packed executables and data --------------------------------------------------
if [ "$PHASE" = local ]; then
    # Here: the beft binary of this checkout (local runs perf and big, which need no
    # test executable).
    DEV=${GPU_RUN_DEVICE:-cpu}
    BIN=$W/bin
    rm -rf "$W" && mkdir -p "$BIN"
    target=${CARGO_TARGET_DIR:-target}
    cargo build --release --quiet --features cuda,wgpu --bin beft && cp "$target/release/beft" "$BIN/"
    export BEFT_CACHE=${BEFT_CACHE:-$HOME/.cache/beft}
    SST2=${BEFT_SHARED:-../shared}/data/glue/SST-2
    MINILM=$BEFT_CACHE/models/all-MiniLM-L6-v2
    PY=${PYTHON:-$(scripts/python_env.sh)}
else
    DEV=cuda
    [ -f .gpu/bin.txz ] || { log "FAIL no .gpu/bin.txz: run scripts/gpu_pack.sh here and carry .gpu"; exit 1; }
    rm -rf "$W" && mkdir -p "$W"
    tar -C "$W" -xJf .gpu/bin.txz
    [ -f .gpu/minilm.txz ] && tar -C "$W" -xJf .gpu/minilm.txz
    BIN=$W/bin
    # The test executables read fixtures from the directory they were built in and run
    # the beft binary from its build path: recreate both here.
    # shellcheck disable=SC1091
    . "$BIN/paths"
    if [ "$MANIFEST_DIR" != "$PWD" ] && [ ! -e "$MANIFEST_DIR/tests/fixtures" ]; then
        mkdir -p "$(dirname "$MANIFEST_DIR")" && rm -rf "$MANIFEST_DIR" && ln -s "$PWD" "$MANIFEST_DIR"
    fi
    mkdir -p "$(dirname "$BEFT_EXE")" && cp "$BIN/beft" "$BEFT_EXE"
    export BEFT_CACHE=$W/cache
    SST2=$W/data/SST-2
    MINILM=$BEFT_CACHE/models/all-MiniLM-L6-v2
    PY=${PYTHON:-python3}
    # CUDA: the image's toolkit has NVRTC and cuBLAS; cudarc (built for 12.x) looks for
    # libcublas.so / .so.12, so point a plain name at whatever version is there.
    export PATH=/usr/local/cuda/bin:$PATH
    mkdir -p "$W/lib"
    for lib in cublas cublasLt nvrtc; do
        f=$(ls /usr/local/cuda/lib64/lib$lib.so* 2>/dev/null | sort -V | tail -1)
        [ -n "$f" ] && ln -sf "$f" "$W/lib/lib$lib.so"
    done
    export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    # wgpu: Vulkan loaders carried as .debs when the image has none (device README).
    if ! ldconfig -p | grep -q libvulkan && ls .gpu/gl/*.deb > /dev/null 2>&1; then
        for f in .gpu/gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
        export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
        export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    fi
fi
log "built: ${BUILT:-this checkout, $(git rev-parse --short HEAD)}"

ENV=$OUT/env.txt
{
    date -u
    uname -a
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv 2>&1 || true
    nvcc --version 2>&1 | tail -2 || true
    ls -l "$W/lib" 2>&1 || true
    ldconfig -p | grep -E 'libvulkan|libcublas|libnvrtc' || true
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' 2>&1 || true
    "$BIN/beft" devices 2>&1 || true
} > "$ENV" 2>&1
log "device: $(nvidia-smi -L 2>/dev/null | head -1 || true) $("$BIN/beft" devices 2>/dev/null | tr '\n' ' ')"

# MiniLM SST-2-1000, the run of README/docs/cuda.md (prints each epoch's dev accuracy):
# minilm DEVICE OUTDIR EPOCHS prints the command.
minilm() {
    echo "$BIN/beft" train --model "$MINILM" --task sst2 --data "$SST2" --train-size 1000 --bias v \
        --epochs "$3" --lr 1e-3 --batch 16 --pooling mean --seed 0 --device "$1" --out "$2"
}

if has check; then
    export BEFT_REQUIRE_WGPU=1
    step "tests/cuda_ops.rs (every op and training step against the CPU)" 300 "$OUT/cuda_ops.log" \
        "$BIN/cuda_ops" --nocapture --test-threads 1
    grep -E '^(test result|test .* (FAILED|ok))' "$OUT/cuda_ops.log" | tail -3 | while read -r l; do log "    $l"; done
    step "tests/wgpu_ops.rs on this GPU" 150 "$OUT/wgpu_ops.log" \
        "$BIN/wgpu_ops" --nocapture --test-threads 1
    grep -E '^test result' "$OUT/wgpu_ops.log" | tail -1 | while read -r l; do log "    $l"; done
    for t in bench cli streaming; do
        step "tests/$t.rs" 90 "$OUT/tests.log" "$BIN/$t" --test-threads 4
    done
    grep -E '^test result' "$OUT/tests.log" | while read -r l; do log "    $l"; done
    if [ -f "$MINILM/model.safetensors" ] && [ -f "$SST2/train.tsv" ]; then
        rm -rf "$W/runs"
        step "MiniLM SST-2-1000 --device $DEV (run 1)" 150 "$OUT/minilm.log" $(minilm "$DEV" "$W/runs/a" 4)
        step "MiniLM SST-2-1000 --device $DEV (run 2, repeatability)" 150 "$OUT/minilm.log" $(minilm "$DEV" "$W/runs/b" 4)
        if [ -f "$W/runs/a/biases.safetensors" ] && [ -f "$W/runs/b/biases.safetensors" ]; then
            if cmp -s "$W/runs/a/biases.safetensors" "$W/runs/b/biases.safetensors"; then
                log "    two $DEV runs: bit-identical biases"
            else
                log "    two $DEV runs: biases DIFFER"
            fi
        fi
        grep -E 'dev accuracy|tokens/s' "$OUT/minilm.log" | while read -r l; do log "    $l"; done
        [ "$DEV" = cuda ] && step "MiniLM SST-2-1000 --device wgpu (1 epoch, throughput)" 120 "$OUT/minilm.log" \
            $(minilm wgpu "$W/runs/w" 1)
        grep -E 'tokens/s' "$OUT/minilm.log" | tail -1 | while read -r l; do log "    $l"; done
    else
        log "SKIP MiniLM runs: no $MINILM or $SST2 (gpu_pack.sh packs them)"
    fi
fi

P=$W/results
M=${GPU_RUN_MODELS:-$W/models}
mkdir -p "$P" "$M"
if [ "$PHASE" = local ]; then
    shapes=opt-tiny,bert-tiny
    cfgs="bert-tiny:2:32 opt-tiny:2:64"
    modes=eager
    big=opt-tiny
    big_cfg="--batch 2 --seq 64"
    wg_shapes=$shapes
    wg_attn=opt-tiny
    PHASES="perf big wgmma"
else
    shapes=bert-base,opt-1.3b,opt-6.7b
    cfgs="bert-base:32:512 opt-1.3b:8:1024"
    modes=eager,compile
    big=opt-6.7b
    big_cfg="--batch 4 --seq 1024"
    wg_shapes=bert-base,opt-1.3b
    wg_attn=opt-6.7b
fi
write_model() { # SHAPE LOGFILE
    [ -f "$M/$1/model.safetensors" ] && return 0
    local d=f32
    case $1 in opt-*) d=bf16 ;; esac
    step "write a random $1 ($d)" 120 "$2" \
        "$BIN/beft" bench --write-model "$M/$1" --shape "$1" --dtype "$d" --quiet
}

if has perf; then
    step "op table against the ceilings ($shapes)" 150 "$OUT/perf.log" \
        "$BIN/beft" bench --device "$DEV" --shapes "$shapes" --quiet \
        --json "$P/bench-ops.json" --plot "$P/bench-ops.png"
    grep -E '^ceilings' "$OUT/perf.log" | while read -r l; do log "    $l"; done
    for c in $cfgs; do write_model "${c%%:*}" "$OUT/perf.log"; done
    step "beft vs PyTorch ($modes): $cfgs" 330 "$OUT/perf.log" \
        env BEFT="$BIN/beft" PYTHON="$PY" benches/compare/compare_gpu.sh --models "$M" \
        --configs "$cfgs" --modes "$modes" --device "$DEV" --out "$P/compare"
    [ -f "$P/compare/results.md" ] && cat "$P/compare/results.md" >> "$SUMMARY"
    # The same step with the GEMM variants (BEFT_CUDA_GEMM): bf16-rounded activations
    # (as autocast) and the simple kernel, against the default above.
    last=${cfgs##* }
    IFS=: read -r s b t <<< "$last"
    for g in bf16 simple; do
        step "$s $b x $t step, BEFT_CUDA_GEMM=$g" 60 "$OUT/perf.log" \
            env BEFT_CUDA_GEMM=$g "$BIN/beft" bench --step --device "$DEV" --model "$M/$s" \
            --batch "$b" --seq "$t" --reps 5 --warmup 2 --quiet --json "$P/gemm-$g.json"
    done
    grep -E '^step:' "$OUT/perf.log" | tail -2 | while read -r l; do log "    $l"; done
fi

if has big; then
    write_model "$big" "$OUT/big.log"
    for m in "--offload stream --recompute" "--offload resident --recompute" "--offload resident" "--offload stream"; do
        tag=${m//--/}
        tag=${tag// /_}
        # shellcheck disable=SC2086
        step "$big $big_cfg $m" 100 "$OUT/big.log" \
            "$BIN/beft" bench --step --device "$DEV" --model "$M/$big" $big_cfg \
            --reps 3 --warmup 1 $m --quiet --json "$P/mem$tag.json"
    done
    grep -E 'streamed .* per step' "$OUT/big.log" | while read -r l; do log "    $l"; done
    "$PY" - "$P" >> "$SUMMARY" 2>&1 <<'EOF' || true
import glob, json, os, sys
p = sys.argv[1]
print("\n| run | tokens/s | training peak MiB | forward-only peak MiB | train / fwd | upload bound / step |")
print("|---|---:|---:|---:|---:|---:|")
for f in sorted(glob.glob(os.path.join(p, "mem*.json"))):
    s = json.load(open(f))["steps"][0]
    tr, fw = s.get("train_peak_device_bytes"), s.get("infer_peak_device_bytes")
    mib = lambda x: f"{x / 2**20:,.0f}" if x else "-"
    ratio = f"{tr / fw:.2f}" if tr and fw else "-"
    up = s.get("upload_bound_fraction")
    up = f"{up * 100:.0f} %" if up else "-"
    print(f"| {os.path.basename(f)[3:-5]} | {s.get('tokens_per_s', 0):,.0f} | {mib(tr)} | {mib(fw)} | {ratio} | {up} |")
EOF
fi

if has wgmma; then
    # Two op tables: mma.sync GEMM + f32 attention (BEFT_CUDA_GEMM=bf16), and the
    # Hopper GEMM + tensor-core attention (wgmma-bf16, BEFT_CUDA_ATTN=bf16).
    for g in bf16 wgmma-bf16; do
        a=f32
        [ "$g" = wgmma-bf16 ] && a=bf16
        step "op table, BEFT_CUDA_GEMM=$g BEFT_CUDA_ATTN=$a ($wg_shapes)" 120 "$OUT/wgmma.log" \
            env BEFT_CUDA_GEMM=$g BEFT_CUDA_ATTN=$a "$BIN/beft" bench --device "$DEV" \
            --shapes "$wg_shapes" --quiet --json "$P/bench-ops-$g.json" --plot "$P/bench-ops-$g.png"
        # Head dimension 128: OPT-6.7B's attention rows alone.
        step "attention rows, BEFT_CUDA_ATTN=$a ($wg_attn)" 60 "$OUT/wgmma.log" \
            env BEFT_CUDA_GEMM=$g BEFT_CUDA_ATTN=$a "$BIN/beft" bench --device "$DEV" \
            --shapes "$wg_attn" --ops attention --quiet --json "$P/bench-attn-$g.json"
    done
    "$PY" - "$P" >> "$SUMMARY" 2>&1 <<'EOF' || true
import json, os, sys
p = sys.argv[1]
runs = {}
for g in ("bf16", "wgmma-bf16"):
    for f in (os.path.join(p, f"bench-ops-{g}.json"), os.path.join(p, f"bench-attn-{g}.json")):
        if os.path.exists(f):
            ops = json.load(open(f))["ops"]
            runs.setdefault(g, {}).update(
                {(o["model_shape"], o["op"], o["shape"]): o for o in ops if o["op"].startswith(("matmul", "linear", "attention"))})
if len(runs) == 2:
    print("\n| model | op | shape | mma.sync GEMM, f32 attention: TFLOP/s | % of cuBLAS | wgmma GEMM, tensor-core attention: TFLOP/s | % of cuBLAS |")
    print("|---|---|---|---:|---:|---:|---:|")
    for key, a in runs["bf16"].items():
        b = runs["wgmma-bf16"].get(key, {})
        t = lambda o: f"{o['tflops']:.3g}" if o.get("tflops") else "-"
        c = lambda o: f"{o['pct_of_ceiling']:.0f} %" if o.get("pct_of_ceiling") else "-"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {t(a)} | {c(a)} | {t(b)} | {c(b)} |")
EOF
    for c in $cfgs; do write_model "${c%%:*}" "$OUT/wgmma.log"; done
    step "beft (wgmma-bf16, bf16 attention) vs PyTorch ($modes): $cfgs" 330 "$OUT/wgmma.log" \
        env BEFT_CUDA_GEMM=wgmma-bf16 BEFT_CUDA_ATTN=bf16 BEFT="$BIN/beft" PYTHON="$PY" \
        benches/compare/compare_gpu.sh --models "$M" --configs "$cfgs" --modes "$modes" \
        --device "$DEV" --out "$P/compare-wgmma"
    [ -f "$P/compare-wgmma/results.md" ] && cat "$P/compare-wgmma/results.md" >> "$SUMMARY"
fi

if has perf || has big || has wgmma; then
    tar -C "$W" -czf "$OUT/results.tgz" results 2> /dev/null
fi

if has sanitize; then
    if command -v compute-sanitizer > /dev/null; then
        step "compute-sanitizer memcheck over the op tests" 300 "$OUT/sanitizer.log" \
            compute-sanitizer --tool memcheck --print-limit 20 "$BIN/cuda_ops" --test-threads 1 --skip training_step
        grep -E 'ERROR SUMMARY|test result' "$OUT/sanitizer.log" | while read -r l; do log "    $l"; done
    else
        log "SKIP sanitize: no compute-sanitizer"
    fi
fi

log "done in $(($(date +%s) - START))s"
