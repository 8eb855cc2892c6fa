#!/usr/bin/env bash
# demo.sh - `make demo`: the whole lorakit pipeline on the project's own base model
# (datasets/base-model, trained from scratch by lorakit on the "background" world) and a
# "new knowledge" world of invented drugs and conditions that no model can know:
#   1. generate the new world (documents, training questions, held-out questions) and the
#      background world the base model was trained on (what it has to lose)
#   2. LoRA-train the new facts into the base model
#   3. merge the adapter into standalone weights and verify the logits
#   4. fully fine-tune the base on the same data, then 5. svd-compress that fine-tune into an
#      adapter at an energy threshold, embeddings and norms kept (--keep-other)
#   6. diff the LoRA against the compressed full fine-tune
#   7. eval: base, base + retrieval (FTS5) and each tuned system (LoRA, full fine-tune, the
#      compressed one) closed book and with retrieval, on the new world's held-out phrasings
#      (learned) and on the background world's held-out questions, read with retrieval, and
#      texts (forgot); the verdict, and how much of the full fine-tune's gain the compressed
#      adapter keeps at its size
#   8. point at the dashboard
# Everything lands in demo/ (runs.db holds every run). Usage: datasets/demo.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
L=bin/lorakit
MW=build/opt/medworld
BASE=datasets/base-model
OUT=${1:-demo}
THREADS=${THREADS:-2}
RUNS=$OUT/runs.db
t0=$(date +%s)
step() { printf '\n\033[1m== [%s/8] %s\033[0m  (%ds)\n' "$1" "$2" $(( $(date +%s) - t0 )); }

[ -x "$L" ] && [ -x "$MW" ] || { echo "demo: build first (make demo does)"; exit 1; }
[ -f "$BASE/model.safetensors" ] || { echo "demo: $BASE is missing (make base-model rebuilds it)"; exit 1; }
rm -rf "$OUT"
mkdir -p "$OUT"

step 1 "the new-knowledge world: invented drugs and conditions; the background world the base knows"
"$MW" --world new --seed 2 --out "$OUT/data"
"$MW" --world background --seed 1 --out "$OUT/background"
# what the base has to lose: every 10th held-out background question (all 150 entities, each
# attribute) and one document per entity, read as plain text
awk 'NR % 10 == 1' "$OUT/background/qa_test.jsonl" > "$OUT/background/retain_qa.jsonl"
awk 'NR % 3 == 1' "$OUT/background/docs.jsonl" > "$OUT/background/retain_text.jsonl"
wc -l "$OUT"/data/{docs,train_chat,qa_test}.jsonl "$OUT"/background/{docs,retain_qa,retain_text}.jsonl | sed 's/^/   /'
"$L" info "$BASE" | head -4

step 2 "LoRA: inject the new world into the base model"
"$L" train --model "$BASE" --data "$OUT/data/train_chat.jsonl,$OUT/data/text.jsonl" --out "$OUT/lora" \
    --rank 16 --alpha 32 --lr 2e-3 --epochs ${LORA_EPOCHS:-6} --batch 8 --seq 192 --pack --warmup 20 \
    --threads "$THREADS" --runs "$RUNS" --name lora --log-every 50

step 3 "merge the adapter into standalone weights, and verify"
"$L" merge --model "$BASE" --adapter "$OUT/lora" --out "$OUT/merged" --verify --runs "$RUNS"

step 4 "full fine-tune on the same data"
"$L" train --model "$BASE" --full --data "$OUT/data/train_chat.jsonl,$OUT/data/text.jsonl" --out "$OUT/full" \
    --lr 5e-4 --epochs ${FULL_EPOCHS:-4} --batch 8 --seq 192 --pack --warmup 20 --dtype f32 \
    --threads "$THREADS" --runs "$RUNS" --name full --log-every 50

step 5 "svd-compress the full fine-tune into an adapter keeping 90% of the change's energy"
# --keep-other: the embeddings and norms the full fine-tune changed go into the adapter as they
# are, so that the comparison with the full fine-tune is about the low-rank truncation only
"$L" svd-compress --base "$BASE" --tuned "$OUT/full" --out "$OUT/compressed" --energy 0.9 --max-rank 64 \
    --keep-other --runs "$RUNS" > "$OUT/compress.txt"
tail -15 "$OUT/compress.txt"

step 6 "diff: the LoRA against the compressed full fine-tune"
"$L" diff "$OUT/lora" "$OUT/compressed" --runs "$RUNS" | tail -20

step 7 "eval: what each system learned (new world, held-out phrasings) and forgot (background world)"
"$L" eval --model "$BASE" --system lora="$OUT/lora" --system full="$OUT/full" --system compressed="$OUT/compressed" \
    --qa "$OUT/data/qa_test.jsonl" --docs "$OUT/data/docs.jsonl" --k 1 --limit ${EVAL_LIMIT:-200} --max-new 16 \
    --retain "$OUT/background/retain_qa.jsonl" --retain-docs "$OUT/background/docs.jsonl" \
    --retain-text "$OUT/background/retain_text.jsonl" --show 2 --threads "$THREADS" --runs "$RUNS" | tee "$OUT/eval.txt"
# how much of the full fine-tune's gain the compressed adapter keeps, and at what size
awk -v total="$(grep '^total:' "$OUT/compress.txt")" '
    /^learned against forgot/ { on = 1; next }
    on && $1 == "full" { full = $2 }
    on && $1 == "compressed" { comp = $2 }
    on && /^$/ { on = 0 }
    END {
        if (full == "" || comp == "") exit
        printf "\ncompressed keeps %s of the full fine-tune'"'"'s F1 gain (%+.3f of %+.3f, closed book) with %s\n", \
            (full + 0 > 0 ? sprintf("%.0f%%", 100 * comp / full) : "none"), comp, full, \
            substr(total, index(total, "adapter ") + 8)
    }' "$OUT/eval.txt"

step 8 "done in $(( $(date +%s) - t0 ))s"
echo "Browse every run:  bin/lorakit dash $RUNS"
