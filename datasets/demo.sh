#!/usr/bin/env bash
# demo.sh - `make demo`: the whole lorakit pipeline on the project's own base model
# (datasets/base-model, trained from scratch by lorakit on the "background" world) and a
# "new knowledge" world of invented drugs and conditions that no model can know:
#   1. generate the new world (documents, training questions, held-out questions)
#   2. LoRA-train the new facts into the base model
#   3. merge the adapter into standalone weights and verify the logits
#   4. fully fine-tune the base on the same data, then 5. svd-compress that fine-tune into an
#      adapter at an energy threshold
#   6. diff the LoRA against the compressed full fine-tune
#   7. eval: base, base + retrieval (FTS5), tuned, tuned + retrieval on held-out phrasings
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

step 1 "the new-knowledge world: invented drugs and conditions"
"$MW" --world new --seed 2 --out "$OUT/data"
wc -l "$OUT"/data/{docs,train_chat,qa_test}.jsonl | sed 's/^/   /'
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
"$L" svd-compress --base "$BASE" --tuned "$OUT/full" --out "$OUT/compressed" --energy 0.9 --max-rank 64 \
    --runs "$RUNS" | tail -15

step 6 "diff: the LoRA against the compressed full fine-tune"
"$L" diff "$OUT/lora" "$OUT/compressed" --runs "$RUNS" | tail -20

step 7 "eval: fine-tuning or retrieval? (held-out phrasings of the new facts)"
"$L" eval --model "$BASE" --adapter "$OUT/lora" --qa "$OUT/data/qa_test.jsonl" --docs "$OUT/data/docs.jsonl" \
    --modes base,rag,ft,ft+rag --k 1 --limit ${EVAL_LIMIT:-200} --max-new 16 --show 2 \
    --threads "$THREADS" --runs "$RUNS"

step 8 "done in $(( $(date +%s) - t0 ))s"
echo "Browse every run:  bin/lorakit dash $RUNS"
