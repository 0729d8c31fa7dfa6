#!/usr/bin/env bash
# Long coverage-guided fuzzing with cargo-fuzz (libFuzzer; needs a nightly
# toolchain and `cargo install cargo-fuzz`).
#
#   scripts/fuzz.sh [SECONDS] [TARGET ...]      (default: 600 s, every target)
#
# Each target runs for SECONDS with a 64 MiB single-allocation limit (a
# header that lies about a size must be refused, not allocated) and a
# 2 GiB RSS limit, grows fuzz/corpus/TARGET, and writes its log to
# fuzz/logs/TARGET.log. Findings land in fuzz/artifacts/TARGET/; replay one
# with `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`.
# Afterwards `scripts/fuzz.sh --cmin` minimises every corpus (the committed
# corpus is replayed by the stable tests/fuzz.rs in CI).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

ALL="safetensors sharded config gguf tsv jsonl bigbench templates tokenizer"
if [[ "${1:-}" == "--cmin" ]]; then
    shift
    for t in ${*:-$ALL}; do
        cargo +nightly fuzz cmin -O "$t" -- -malloc_limit_mb=64 -rss_limit_mb=2048 >"logs/$t.cmin.log" 2>&1
        echo "$t: $(ls "corpus/$t" | wc -l) corpus entries, $(du -sh "corpus/$t" | cut -f1)"
    done
    exit 0
fi
SECS="${1:-600}"
shift || true
mkdir -p logs
cargo +nightly fuzz build -O
for t in ${*:-$ALL}; do
    set +e
    cargo +nightly fuzz run -O "$t" -- -max_total_time="$SECS" -malloc_limit_mb=64 \
        -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 >"logs/$t.log" 2>&1
    rc=$?
    set -e
    runs=$(grep -o 'Done [0-9]* runs' "logs/$t.log" | grep -o '[0-9]*' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*' || echo "?")
    echo "$t: exit $rc, $runs executions in ${SECS}s, coverage $cov edges, $(ls "corpus/$t" | wc -l) corpus entries, findings: $(ls "artifacts/$t" 2>/dev/null | wc -l)"
done
