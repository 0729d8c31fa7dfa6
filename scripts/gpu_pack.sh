#!/usr/bin/env bash
# Packs what a lent GPU machine needs for scripts/gpu_run.sh into .gpu/ (git-ignored).
#
#   scripts/gpu_pack.sh            # here: build, strip, pack; prints the carry list
#
# The GPU machine has CUDA, PyTorch and transformers but no Rust toolchain, no network and
# no ../shared, and a device-tool call carries at most 64 MiB. So everything is built here
# (x86-64, like the device) and packed, xz-compressed, into two files:
#
#   .gpu/bin.txz     beft (cuda + wgpu) and the test executables that touch a GPU
#                    (cuda_ops, wgpu_ops, bench, cli, streaming), stripped; ~7 MB
#   .gpu/minilm.txz  all-MiniLM-L6-v2 with its matrices in bf16 (the CUDA backend holds
#                    matrices in bf16, so the GPU sees the same weights as from the f32
#                    file: 45 MB instead of 91) and GLUE SST-2 train/dev; ~40 MB
#
# plus .gpu/gl/*.deb, the Vulkan/EGL loaders for wgpu (the device README's recipe), when
# apt-get can download them. The test executables find their fixtures under the
# directory they were built in (CARGO_MANIFEST_DIR) and the CLI tests the beft binary at
# its build path; .gpu/paths records both so that gpu_run.sh can recreate them there.
#
# Environment: BEFT_CACHE (models; default ~/.cache/beft), BEFT_SHARED (default ../shared),
# PYTHON (with torch + safetensors; default: scripts/python_env.sh), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${BEFT_CACHE:-$HOME/.cache/beft}
SHARED=${BEFT_SHARED:-$ROOT/../shared}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
export CARGO_TARGET_DIR=$TARGET
TESTS="cuda_ops wgpu_ops bench cli streaming"

die() { echo "gpu_pack: $*" >&2; exit 1; }
MINILM=$CACHE/models/all-MiniLM-L6-v2
[ -f "$MINILM/model.safetensors" ] || die "no $MINILM/model.safetensors (run scripts/fetch_default.sh)"
SST2=$SHARED/data/glue/SST-2
[ -f "$SST2/train.tsv" ] && [ -f "$SST2/dev.tsv" ] || die "no $SST2/{train,dev}.tsv"
PY=${PYTHON:-$(scripts/python_env.sh)}

EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.gpu/' "$EXCLUDE" 2>/dev/null || echo /.gpu/ >> "$EXCLUDE"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/cache/models/all-MiniLM-L6-v2" "$STAGE/data/SST-2" .gpu

echo "gpu_pack: building (release, --features cuda,wgpu) in $TARGET" >&2
cargo build --release --quiet --features cuda,wgpu --bin beft
cargo test --release --quiet --features cuda,wgpu --no-run --message-format=json > "$STAGE/build.json"
"$PY" - "$STAGE/build.json" "$STAGE/bin" $TESTS <<'EOF'
import json, shutil, sys
build, dest, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3:])
found = {}
for line in open(build):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["kind"] == ["test"] and m["target"]["name"] in wanted:
        found[m["target"]["name"]] = m["executable"]
missing = wanted - set(found)
if missing:
    sys.exit(f"gpu_pack: test executables not built: {sorted(missing)}")
for name, exe in found.items():
    shutil.copy(exe, f"{dest}/{name}")
EOF
cp "$TARGET/release/beft" "$STAGE/bin/beft"
strip "$STAGE"/bin/*
{
    echo "MANIFEST_DIR='$ROOT'"
    echo "BEFT_EXE='$TARGET/release/beft'"
    echo "BUILT='$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +dirty) $(date -u +%FT%TZ)'"
} > "$STAGE/bin/paths"
tar -C "$STAGE" -cJf .gpu/bin.txz bin

echo "gpu_pack: all-MiniLM-L6-v2 with bf16 matrices" >&2
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
    [ -f "$MINILM/$f" ] && cp "$MINILM/$f" "$STAGE/cache/models/all-MiniLM-L6-v2/"
done
if [ -d "$MINILM/1_Pooling" ]; then cp -r "$MINILM/1_Pooling" "$STAGE/cache/models/all-MiniLM-L6-v2/"; fi
"$PY" - "$MINILM/model.safetensors" "$STAGE/cache/models/all-MiniLM-L6-v2/model.safetensors" <<'EOF'
import sys
import torch
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
t = load_file(src)
# Matrices (and embedding tables) in bf16, round to nearest even as the CUDA upload does;
# vectors (biases, norm scales) stay f32 like the CUDA backend keeps them.
out = {k: (v.to(torch.bfloat16) if v.dim() >= 2 and v.dtype == torch.float32 else v).contiguous()
       for k, v in t.items()}
save_file(out, dst, metadata={"format": "pt"})
EOF
cp "$SST2/train.tsv" "$SST2/dev.tsv" "$STAGE/data/SST-2/"
tar -C "$STAGE" -cJf .gpu/minilm.txz cache data

if [ ! -d .gpu/gl ] || ! ls .gpu/gl/*.deb >/dev/null 2>&1; then
    echo "gpu_pack: Vulkan/EGL loaders for wgpu (apt-get download)" >&2
    mkdir -p .gpu/gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    if ! { apt-get $o update -qq && (cd .gpu/gl && apt-get $o download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2); } >&2; then
        echo "gpu_pack: could not download the loaders; the wgpu checks need the device's own" >&2
    fi
fi

size=$(du -cb .gpu/bin.txz .gpu/minilm.txz .gpu/gl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "gpu_pack: .gpu is $((size / 1048576)) MiB, the tracked tree $((tree / 1048576)) MiB (a call carries 64 MiB in all)" >&2
[ $((size + tree)) -lt $((63 * 1048576)) ] || die "over the 64 MiB a call can carry"
cat "$STAGE/bin/paths"
echo 'carry: [".gpu"]   then: scripts/gpu_run.sh check   (and: scripts/gpu_run.sh perf)'
