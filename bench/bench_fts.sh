#!/usr/bin/env bash
# bench-fts: retrieval on MedQuAD (../shared/data/medquad, or $LK_SHARED/data/medquad): index
# all 5,483 documents, then `lorakit search --eval-recall` over the 1,782 dev questions, which
# measures lorakit's ranking and, in the same run on the same index, plain BM25 over whole
# documents and version 1's chunk ranking. Targets (issue 20): document recall@5 >= 0.98 and
# under 5 ms per query in-process; exits 1 if either is missed.
# Usage: bench/bench_fts.sh LORAKIT
set -euo pipefail
L=$1; SH=${LK_SHARED:-../shared}/data/medquad; PY=/usr/bin/python3
if [ ! -f "$SH/docs.jsonl" ]; then echo "bench-fts: $SH/docs.jsonl not found (set LK_SHARED): skipped"; exit 0; fi
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
echo "== bench-fts: MedQuAD, $(nproc) cores, load average $(cut -d" " -f1-3 /proc/loadavg)"
$L index --docs "$SH/docs.jsonl" --db "$W/mq.fts"
$L search --db "$W/mq.fts" --eval-recall "$SH/dev.jsonl"
$L search --db "$W/mq.fts" --eval-recall "$SH/dev.jsonl" --json > "$W/r.json"
$PY - "$W/r.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
r5, ms = r["recall@5"], r["ms_per_query"]
ok = r5 >= 0.98 and ms < 5
print("targets: recall@5 %.4f (>= 0.98: %s), %.2f ms/query (< 5: %s); plain BM25 %.2f ms/query (%.1fx lorakit's time)"
      % (r5, "met" if r5 >= 0.98 else "MISSED", ms, "met" if ms < 5 else "MISSED",
         r["baselines"]["plain-bm25"]["ms_per_query"], r["baselines"]["plain-bm25"]["ms_per_query"] / ms))
sys.exit(0 if ok else 1)
PYEOF
