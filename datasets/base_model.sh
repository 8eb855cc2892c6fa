#!/bin/sh
# Rebuilds lorakit's own base model (datasets/base-model/README.md) with lorakit's commands:
# tokenizer train, init, train --full; then scores it with rc_eval. Run by `make base-model`,
# which first runs `make datasets`.
#
#   sh datasets/base_model.sh LORAKIT MEDWORLD RC_EVAL DATASETS_OUT DEST WORK
#
# Everything is written to WORK (a scratch folder under build/) and DEST.tmp.<pid>; DEST is
# replaced only when every step succeeded, keeping DEST/README.md (the model card).
set -eu
[ $# -eq 6 ] || { echo "usage: $0 LORAKIT MEDWORLD RC_EVAL DATASETS_OUT DEST WORK" >&2; exit 2; }
LORAKIT=$1 MEDWORLD=$2 RC_EVAL=$3 DS=$4 DEST=$5 WORK=$6
BG=$DS/background NEW=$DS/new
THREADS=${THREADS:-2}
[ -f "$BG/rc_train.jsonl" ] && [ -f "$NEW/qa_test.jsonl" ] || { echo "base-model: run make datasets first" >&2; exit 1; }

TMP=$DEST.tmp.$$
trap 'rm -rf "$TMP"' EXIT INT TERM
rm -rf "$WORK" "$TMP"
mkdir -p "$WORK"
t0=$(date +%s)

# 1. Reading-comprehension examples from auxiliary worlds (background names, seeds 3-8, 20
#    entities each): facts the model meets only in a passage, so the answer must be read, not
#    recalled. Seed 3 is mixed into stage 1; seeds 3-8 make stage 2.
for s in 3 4 5 6 7 8; do
    "$MEDWORLD" --world background --seed $s --entities 20 --out "$WORK/aux$s"
done
awk 'NR % 2 == 1' "$BG/train_chat.jsonl" > "$WORK/chat_half.jsonl"

# 2. Tokenizer: byte-level BPE on the background world's documents, questions and answers.
{ sed -e 's/^{"text":"//; s/"}$//' "$BG/text.jsonl"
  sed -e 's/^{"messages":\[{"role":"user","content":"//; s/"},{"role":"assistant","content":"/\\n/; s/"}\]}$//' \
      "$BG/train_chat.jsonl"; } | sed -e 's/\\n/\n/g; s/\\"/"/g' > "$WORK/corpus.txt"
"$LORAKIT" tokenizer train --text "$WORK/corpus.txt" --vocab 2048 --out "$WORK/tok"

# 3. A random Qwen2 model of 3.4 M parameters.
cat > "$WORK/config.json" <<'EOF'
{
  "architectures": ["Qwen2ForCausalLM"],
  "model_type": "qwen2",
  "hidden_act": "silu",
  "hidden_size": 256,
  "intermediate_size": 688,
  "num_hidden_layers": 4,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "vocab_size": 2048,
  "max_position_embeddings": 1024,
  "initializer_range": 0.02,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000,
  "tie_word_embeddings": true,
  "use_sliding_window": false,
  "bos_token_id": 2045,
  "eos_token_id": 2047,
  "torch_dtype": "float32"
}
EOF
"$LORAKIT" init --config "$WORK/config.json" --out "$WORK/init" --seed 1
cp "$WORK/tok/tokenizer.json" "$WORK/tok/tokenizer_config.json" "$WORK/init/"

# 4. Stage 1, full training from scratch, one pass over: documents x2, chat QA x2, background
#    RC, auxiliary RC (seed 3), every token trained on (language, facts, formats).
DATA1=$BG/text.jsonl,$BG/train_chat.jsonl,$BG/text.jsonl,$BG/train_chat.jsonl,$BG/rc_train.jsonl,$WORK/aux3/rc_train.jsonl
t1=$(date +%s)
"$LORAKIT" train --model "$WORK/init" --full --data "$DATA1" --out "$WORK/stage1" \
    --lr 2e-3 --warmup 20 --epochs 1 --batch 4 --seq 512 --pack --train-on-prompt \
    --threads "$THREADS" --seed 1 --dtype bf16 --runs "$WORK/runs.db" --name base-model \
    --log-every 10 2>&1 | tee "$WORK/train1.log"
grep -q '^done:' "$WORK/train1.log" || { echo "base-model: stage 1 failed" >&2; exit 1; }
#    Stage 2, one pass over the RC of the auxiliary worlds and half the background chat QA,
#    trained on the answers only: reading the passage is the only way to lower this loss.
DATA2=$WORK/aux3/rc_train.jsonl,$WORK/aux4/rc_train.jsonl,$WORK/aux5/rc_train.jsonl,$WORK/aux6/rc_train.jsonl,$WORK/aux7/rc_train.jsonl,$WORK/aux8/rc_train.jsonl,$WORK/chat_half.jsonl
"$LORAKIT" train --model "$WORK/stage1" --full --data "$DATA2" --out "$TMP" \
    --lr 1e-3 --warmup 10 --epochs 1 --batch 4 --seq 512 --pack \
    --threads "$THREADS" --seed 2 --dtype bf16 --runs "$WORK/runs.db" --name base-model-rc \
    --log-every 10 2>&1 | tee "$WORK/train2.log"
grep -q '^done:' "$WORK/train2.log" || { echo "base-model: stage 2 failed" >&2; exit 1; }
t2=$(date +%s)

# 5. Scores: the new world (never trained on) and the background world's held-out phrasings.
OMP_NUM_THREADS=$THREADS "$RC_EVAL" "$TMP" "$NEW" > "$WORK/eval_new.md"
OMP_NUM_THREADS=$THREADS "$RC_EVAL" "$TMP" "$BG" --limit 260 > "$WORK/eval_background.md"
t3=$(date +%s)
{ echo "# make base-model, $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -m), $(nproc) cores, $THREADS threads"
  echo "# seconds: setup $((t1 - t0)), train $((t2 - t1)), eval $((t3 - t2)), total $((t3 - t0))"
  cat "$WORK/train1.log" "$WORK/train2.log" "$WORK/eval_new.md" "$WORK/eval_background.md"; } > "$TMP/train.log"
cat "$WORK/eval_new.md" "$WORK/eval_background.md"

# 6. Swap in, keeping the model card.
[ -f "$DEST/README.md" ] && cp "$DEST/README.md" "$TMP/"
rm -rf "$DEST.old"
[ -d "$DEST" ] && mv "$DEST" "$DEST.old"
mv "$TMP" "$DEST"
rm -rf "$DEST.old"
echo "base-model: wrote $DEST in $((t3 - t0)) s (train $((t2 - t1)) s)"
