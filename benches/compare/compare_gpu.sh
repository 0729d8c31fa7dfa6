#!/usr/bin/env bash
# beft (CUDA backend) vs PyTorch (HF transformers, bf16 autocast, sdpa; eager
# and torch.compile), bias-only training steps side by side in one run on the
# same shapes, batch and sequence length.
#
#   benches/compare/compare_gpu.sh [--configs "bert-base:32:512 opt-1.3b:8:1024 opt-6.7b:4:1024"]
#                                  [--steps N] [--warmup N] [--bias v] [--device cuda]
#                                  [--modes eager,compile] [--out DIR] [--models DIR]
#
# A config is SHAPE:BATCH:SEQ. beft times `beft bench --step` on a random model
# of the shape, written once to MODELS/SHAPE (`beft bench --write-model`; OPT in
# bf16 — OPT-6.7B is 13.3 GB — BERT in f32); PyTorch builds a random model of the
# same shape (benches/compare/pytorch_gpu.py). Both train only the same biases
# (--bias v: every value-projection bias; encoders also the classifier head and
# the pooler bias) with dropout on for encoders (off for decoders: beft's have
# none), clipping at 1.0 and AdamW, and report the
# median step time after the warm-up and their peak device memory
# (beft: its own device-memory count; PyTorch: torch.cuda.max_memory_allocated).
#
# Writes OUT/results.md (tokens/s and ratios beft/eager, beft/compile) and
# OUT/results.json (every row of both engines), plus each engine's raw JSON.
#
# Environment: PYTHON (default python3: torch + transformers), BEFT (a built
# beft binary; default: cargo build --release --features cuda), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."

CONFIGS="bert-base:32:512 opt-1.3b:8:1024 opt-6.7b:4:1024"
STEPS=10
WARMUP=3
BIAS=v
DEVICE=cuda
MODES=eager,compile
OUT=runs/compare-gpu
MODELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --configs) CONFIGS=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --bias) BIAS=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --models) MODELS=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
MODELS=${MODELS:-$OUT/models}
mkdir -p "$OUT" "$MODELS"

BIN=${BEFT:-}
if [ -z "$BIN" ]; then
    cargo build --release --quiet --features cuda
    BIN="${CARGO_TARGET_DIR:-target}/release/beft"
fi
# beft's --device names cuda[:N] and cpu; PyTorch's the same (cpu for a smoke run).
TORCH_DEVICE=$DEVICE

"$PY" -c "import torch, transformers" || { echo "PYTHON=$PY lacks torch/transformers" >&2; exit 1; }
echo "beft: $BIN; python: $PY; device: $DEVICE; configs: $CONFIGS; $WARMUP warm-up + $STEPS timed steps" >&2

for cfg in $CONFIGS; do
    IFS=: read -r shape batch seq <<<"$cfg"
    if [ -z "$shape" ] || [ -z "$batch" ] || [ -z "$seq" ]; then
        echo "bad config '$cfg' (SHAPE:BATCH:SEQ)" >&2; exit 2
    fi
    dir="$MODELS/$shape"
    if [ ! -f "$dir/model.safetensors" ]; then
        case "$shape" in bert-*) dtype=f32 ;; *) dtype=bf16 ;; esac
        "$BIN" bench --write-model "$dir" --shape "$shape" --dtype "$dtype" --quiet
    fi
    echo "== $shape batch $batch x $seq: beft" >&2
    "$BIN" bench --device "$DEVICE" --step --model "$dir" --batch "$batch" --seq "$seq" \
        --bias "$BIAS" --reps "$STEPS" --warmup "$WARMUP" --quiet --json "$OUT/beft-$shape.json"
    echo "== $shape batch $batch x $seq: PyTorch ($MODES)" >&2
    # A failed PyTorch mode (e.g. torch.compile) is recorded in its JSON; keep going.
    "$PY" benches/compare/pytorch_gpu.py --device "$TORCH_DEVICE" --models "$shape" \
        --batch "$batch" --seq "$seq" --steps "$STEPS" --warmup "$WARMUP" --bias "$BIAS" \
        --modes "$MODES" --json "$OUT/torch-$shape.json" || true
done

"$PY" - "$OUT" $CONFIGS <<'EOF'
import json, os, sys
out, configs = sys.argv[1], sys.argv[2:]
rows, md = [], []
md.append("| model | batch x seq | beft tok/s | eager tok/s | compile tok/s | beft / eager | beft / compile "
          "| beft peak MiB | eager peak MiB | compile peak MiB | beft MFU |")
md.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
def mib(x):
    return f"{x / 2**20:,.0f}" if isinstance(x, (int, float)) else "-"
device = torch_dev = ""
for cfg in configs:
    shape = cfg.split(":")[0]
    b = json.load(open(os.path.join(out, f"beft-{shape}.json")))
    device = b["device"]
    st = b["steps"][0]
    rows.append(st)
    tp = os.path.join(out, f"torch-{shape}.json")
    t = json.load(open(tp)) if os.path.exists(tp) else {"rows": []}
    torch_dev = t.get("device", torch_dev)
    by = {}
    for r in t["rows"]:
        rows.append(r)
        by[r["mode"]] = r
    def tps(m):
        r = by.get(m)
        return r.get("tokens_per_s") if r else None
    def ratio(m):
        x = tps(m)
        return f"**{st['tokens_per_s'] / x:.2f}x**" if x else "-"
    def fmt(m):
        if m not in by:
            return "-"
        return "failed" if "error" in by[m] else f"{by[m]['tokens_per_s']:,.0f}"
    mfu = f"{st['mfu'] * 100:.1f} %" if st.get("mfu") else "-"
    md.append(f"| {shape} | {st['batch']} x {st['seq']} | {st['tokens_per_s']:,.0f} | {fmt('eager')} "
              f"| {fmt('compile')} | {ratio('eager')} | {ratio('compile')} | {mib(st.get('peak_device_bytes'))} "
              f"| {mib(by.get('eager', {}).get('peak_device_bytes'))} | {mib(by.get('compile', {}).get('peak_device_bytes'))} | {mfu} |")
head = f"beft: {device}; PyTorch: {torch_dev}; bias-only training steps (--bias v), median tokens/s\n\n"
open(os.path.join(out, "results.md"), "w").write(head + "\n".join(md) + "\n")
json.dump({"configs": configs, "rows": rows}, open(os.path.join(out, "results.json"), "w"), indent=2)
print(head + "\n".join(md))
EOF
echo "wrote $OUT/results.md and $OUT/results.json" >&2
