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

# 1. Auxiliary worlds (background names, seeds 3-113, 20 entities each): facts the model meets
#    only in a passage, so an answer about them must be read, not recalled. Their reading
#    dialogs (rc_dialog.jsonl: one context, then every attribute of its entity asked in turn)
#    are most of the training data: seeds 3-32 in stage 1, seeds 33-112 in stage 2. Their
#    copying drills (copy_drill.jsonl: "Repeat: <names>") teach the copying that reading needs:
#    seeds 3-102 in stage 1, 33-62 again in stage 2; seed 113's are the held-out drill.
for s in $(seq 3 113); do
    "$MEDWORLD" --world background --seed $s --entities 20 --out "$WORK/aux$s" > /dev/null
done
cat_aux() { for s in $(seq "$2" "$3"); do cat "$WORK/aux$s/$1"; done; }
cat_aux rc_dialog.jsonl 3 32 > "$WORK/dialog1.jsonl"
cat_aux rc_dialog.jsonl 33 112 > "$WORK/dialog2.jsonl"
cat_aux copy_drill.jsonl 3 102 > "$WORK/drill1.jsonl"
cat_aux copy_drill.jsonl 33 62 > "$WORK/drill2.jsonl"
awk 'NR % 2 == 1' "$BG/train_chat.jsonl" > "$WORK/chat_half.jsonl"

# 2. Tokenizer: byte-level BPE, 768 ids, on the background world's documents, questions and
#    answers and the documents of aux worlds 3-22. A small vocabulary is built of syllables,
#    so the new world's names (other stems, same syllables) are made of tokens the model has
#    trained on; with 2048 ids a fifth of them were never seen (model card, "History").
text_of() { sed -e 's/^{"text":"//; s/"}$//' "$@"; }
{ text_of "$BG/text.jsonl"
  for s in $(seq 3 22); do text_of "$WORK/aux$s/text.jsonl"; done
  sed -e 's/^{"messages":\[{"role":"user","content":"//; s/"},{"role":"assistant","content":"/\\n/; s/"}\]}$//' \
      "$BG/train_chat.jsonl"; } | sed -e 's/\\n/\n/g; s/\\"/"/g' > "$WORK/corpus.txt"
"$LORAKIT" tokenizer train --text "$WORK/corpus.txt" --vocab 768 --out "$WORK/tok"

# 3. A random Qwen2 model of 3.1 M parameters.
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
  "vocab_size": 768,
  "max_position_embeddings": 1024,
  "initializer_range": 0.02,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000,
  "tie_word_embeddings": true,
  "use_sliding_window": false,
  "bos_token_id": 765,
  "eos_token_id": 767,
  "torch_dtype": "float32"
}
EOF
"$LORAKIT" init --config "$WORK/config.json" --out "$WORK/init" --seed 1
cp "$WORK/tok/tokenizer.json" "$WORK/tok/tokenizer_config.json" "$WORK/init/"

# 4. Stage 1, full training from scratch, every token trained on (language, names, formats,
#    and copying: every name in a question or answer repeats one in the context), one pass
#    over: background documents, chat QA, dialogs and drills, aux dialogs 3-32 and aux drills
#    3-102, at a CONSTANT learning rate: copying appears abruptly after a plateau, and a decaying
#    rate ends the run before it does (model card, "History"). The held-out drill's loss (seed
#    113) falls well below the loss of its unrepeated names once the model copies.
DATA1=$BG/text.jsonl,$BG/train_chat.jsonl,$BG/rc_dialog.jsonl,$BG/copy_drill.jsonl,$WORK/dialog1.jsonl,$WORK/drill1.jsonl
t1=$(date +%s)
"$LORAKIT" train --model "$WORK/init" --full --data "$DATA1" --out "$WORK/stage1" \
    --lr 2e-3 --schedule constant --warmup 20 --epochs 1 --batch 4 --seq 768 --pack --train-on-prompt \
    --eval-data "$WORK/aux113/copy_drill.jsonl" --eval-every 100 \
    --threads "$THREADS" --seed 1 --dtype bf16 --runs "$WORK/runs.db" --name base-model \
    --log-every 20 2>&1 | tee "$WORK/train1.log"
grep -q '^done:' "$WORK/train1.log" || { echo "base-model: stage 1 failed" >&2; exit 1; }
#    Stage 2, one pass over aux dialogs 33-112, aux drills 33-62, half the background chat QA
#    and the background single-question RC, trained on the answers only: for the aux worlds'
#    facts, reading the context is the only way to lower this loss. The rate decays now that
#    the model copies.
DATA2=$WORK/dialog2.jsonl,$WORK/drill2.jsonl,$WORK/chat_half.jsonl,$BG/rc_train.jsonl
"$LORAKIT" train --model "$WORK/stage1" --full --data "$DATA2" --out "$TMP" \
    --lr 1e-3 --warmup 20 --epochs 1 --batch 4 --seq 768 --pack \
    --threads "$THREADS" --seed 2 --dtype bf16 --runs "$WORK/runs.db" --name base-model-rc \
    --log-every 20 2>&1 | tee "$WORK/train2.log"
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
