#!/usr/bin/env bash
# beft (fast CPU backend) vs PyTorch CPU (HF transformers), side by side on
# the same shapes and the same number of threads.
#
#   benches/compare/compare_cpu.sh [--threads N] [--steps N] [--repeats N] [--batch N] [--seq N] [--bf16] [--quick]
#
# Cases: all-MiniLM-L6-v2 (real weights from ~/.cache/beft/models/ if
# present, else random of that shape) and a BERT-base-shaped model with
# random weights; each in `train` mode (bias-only step: --bias v + the
# classifier head, dropout on, clip 1.0, AdamW) and `eval` mode (forward
# only). Every (case, engine) runs in its own process, `--repeats` times,
# alternating engines; the table shows the median tokens/s and the largest
# peak RSS (VmHWM, read by each process itself) over the repeats.
# --bf16: beft with BEFT_CPU_GEMM=bf16 (bf16 products, f32 sums; needs
# AVX-512 BF16) against PyTorch under torch.autocast("cpu", bfloat16).
#
# Environment: PYTHON (default: the interpreter of scripts/python_env.sh,
#   ${BEFT_CACHE:-~/.cache/beft}/pyenv, else python3),
# CARGO_TARGET_DIR, BEFT_CACHE.
set -euo pipefail
cd "$(dirname "$0")/../.."

THREADS=$(nproc)
STEPS=5
REPEATS=3
BATCH=16
SEQ=128
SHAPES="minilm bert-base"
BF16=0
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) THREADS=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --batch) BATCH=$2; shift 2 ;;
        --seq) SEQ=$2; shift 2 ;;
        --shapes) SHAPES=$2; shift 2 ;;
        --bf16) BF16=1; shift ;;
        --quick) STEPS=2; REPEATS=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-}
CACHE=${BEFT_CACHE:-$HOME/.cache/beft}
if [ -z "$PY" ]; then
    if [ -x "$CACHE/pyenv/bin/python" ]; then PY="$CACHE/pyenv/bin/python"; else PY=python3; fi
fi
MINILM="$CACHE/models/all-MiniLM-L6-v2"
[ -f "$MINILM/model.safetensors" ] || MINILM=""

cargo build --release --quiet --example step_bench
BIN="${CARGO_TARGET_DIR:-target}/release/examples/step_bench"

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
RES="$OUT/results.jsonl"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
AUTOCAST=none
if [ "$BF16" = 1 ]; then export BEFT_CPU_GEMM=bf16; AUTOCAST=bf16; else export BEFT_CPU_GEMM=f32; fi

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; threads: $THREADS; batch $BATCH x $SEQ tokens" >&2
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for shape in $SHAPES; do
    model=""
    if [ "$shape" = minilm ] && [ -n "$MINILM" ]; then model="$MINILM"; fi
    for mode in train eval; do
        for r in $(seq 1 "$REPEATS"); do
            echo "  $shape $mode repeat $r/$REPEATS" >&2
            "$BIN" --shape "$shape" --model "$model" --mode "$mode" --batch "$BATCH" --seq "$SEQ" \
                --threads "$THREADS" --steps "$STEPS" --warmup 1 >>"$RES"
            "$PY" benches/compare/pytorch_cpu.py --shape "$shape" --model "$model" --mode "$mode" --batch "$BATCH" \
                --seq "$SEQ" --threads "$THREADS" --steps "$STEPS" --warmup 1 --autocast "$AUTOCAST" >>"$RES"
        done
    done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$PY" - "$RES" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def key(r): return (r["shape"], r["mode"])
cases = []
for r in rows:
    if key(r) not in cases:
        cases.append(key(r))
print("| model | weights | mode | beft tok/s | PyTorch tok/s | speed ratio | beft peak RSS | PyTorch peak RSS | RSS ratio |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for c in cases:
    b = [r for r in rows if key(r) == c and r["engine"] == "beft"]
    p = [r for r in rows if key(r) == c and r["engine"] == "pytorch"]
    bt = statistics.median(r["tokens_per_s"] for r in b)
    pt = statistics.median(r["tokens_per_s"] for r in p)
    br = max(r["peak_rss_bytes"] for r in b) / 2**20
    pr = max(r["peak_rss_bytes"] for r in p) / 2**20
    print(f"| {c[0]} | {b[0]['weights']} | {c[1]} | {bt:,.0f} | {pt:,.0f} | {bt/pt:.2f}x | {br:,.0f} MiB | {pr:,.0f} MiB | {br/pr:.2f} |")
print()
print(f"beft: {rows[0].get('device', '?')}; PyTorch {next(r for r in rows if r['engine']=='pytorch')['torch']} "
      f"(attention: {next(r for r in rows if r['engine']=='pytorch')['attn']}, "
      f"autocast: {next(r for r in rows if r['engine']=='pytorch')['autocast']})")
EOF
