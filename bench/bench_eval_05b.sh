#!/usr/bin/env bash
# bench-eval, the Qwen2.5-0.5B shape (`lorakit init --preset qwen2.5-0.5b --dtype bf16`, random
# weights, the Qwen tokenizer from ../shared/data/tokenizers/qwen3), measured in one run:
# 1. generation of 64 tokens after a prompt of about 470 tokens: prefill and decode tokens/s and
#    peak RSS of lorakit (bf16 weights kept bf16) and of llama.cpp (node-llama-cpp 3.21.1,
#    bench/llama_speed.mjs) on an F16 GGUF of the same weights written by `lorakit convert`;
#    lorakit on 2 threads, llama.cpp on 1 and on 2. The ratios are lorakit / llama.cpp's better.
#    Prefill also with LORAKIT_AMX=0 (bf16 weights widened for sgemm instead of the AMX tile unit).
# 2. `lorakit eval` of BENCH_EVAL_QUESTIONS (default 20) of the first 200 MedQuAD dev questions,
#    spread evenly over them (every 10th by default; 200: all of them), in 4 modes (base, rag k=3
#    over the MedQuAD documents, ft = a one-step LoRA adapter, ft+rag), --max-new 32, at --batch 1
#    and at each of BENCH_EVAL_BATCHES (default none) and the default batch: seconds per question,
#    peak RSS, the 200-question time extrapolated from the per-question time (the sample's mean
#    reference length against the 200's is printed: the time grows with it), and a check that
#    every batch gave the answers and scores of --batch 1 (NLL within float32 rounding).
# Skipped with a message without the tokenizer (all), llama.cpp (its rows) or MedQuAD (part 2).
# Usage: bench/bench_eval_05b.sh LORAKIT
set -euo pipefail
L=$1; SH=${LK_SHARED:-../shared}; N=${BENCH_EVAL_QUESTIONS:-20}; PY=/usr/bin/python3
TOK=$SH/data/tokenizers/qwen3; DEV=$SH/data/medquad/dev.jsonl; DOCS=$SH/data/medquad/docs.jsonl
NODE_LLAMA=build/llama/node_modules/node-llama-cpp/package.json
echo "== bench-eval, Qwen2.5-0.5B shape: $(date -u +%F), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ ! -f $TOK/tokenizer.json ]; then
  echo "$TOK/tokenizer.json is absent: the 0.5B-shape rows are skipped"; exit 0
fi
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
$L init --preset qwen2.5-0.5b --dtype bf16 --seed 1 --out $W/m >/dev/null
cp $TOK/tokenizer.json $TOK/tokenizer_config.json $W/m/

# peak RSS in MB of a command's /usr/bin/time line in a file
rss() { echo $(( $(sed -n 's/^RSS //p' $1 | tail -1) / 1024 )); }
ratio() { $PY -c "print('%.2fx' % ($1 / $2))"; }

# 1. generation: the same text for both (each tokenizes it with the same tokenizer)
$PY -c "
import random
random.seed(3)
w = 'patients dose weekly liver treatment rare chronic tablet infusion adults children kidney symptom fever approved trial the of and is with'.split()
print(' '.join(random.choice(w) for _ in range(440)), end='')" > $W/prompt.txt
/usr/bin/time -f 'RSS %M' $L generate --model $W/m --prompt "$(cat $W/prompt.txt)" --max-new 64 --stats --threads 2 \
  > /dev/null 2> $W/gen.err || { cat $W/gen.err; exit 1; }
np=$(sed -n 's/^prompt \([0-9]*\) tokens.*/\1/p' $W/gen.err)
lp=$(sed -n 's/^prefill \([0-9.]*\) tokens\/s.*/\1/p' $W/gen.err)
ld=$(sed -n 's/.*decode \([0-9.]*\) tokens\/s.*/\1/p' $W/gen.err)
lr=$(rss $W/gen.err)
LORAKIT_AMX=0 $L generate --model $W/m --prompt "$(cat $W/prompt.txt)" --max-new 4 --stats --threads 2 \
  > /dev/null 2> $W/gen0.err || { cat $W/gen0.err; exit 1; }
lp0=$(sed -n 's/^prefill \([0-9.]*\) tokens\/s.*/\1/p' $W/gen0.err)
echo "generate: prompt $np tokens, 64 new tokens, 2 threads (lorakit: bf16 weights kept bf16)"
if [ -f $NODE_LLAMA ] && command -v node >/dev/null; then
  $L convert --model $W/m --out $W/m.f16.gguf --dtype f16 >/dev/null
  # llama.cpp at 1 and 2 threads: on a loaded 2-core machine its spinning thread pool can make two
  # threads far slower than one; the ratios are against its better figure
  for t in 1 2; do
    /usr/bin/time -f 'RSS %M' node bench/llama_speed.mjs $W/m.f16.gguf $W/prompt.txt 64 $t > $W/llama$t.json \
      2> $W/llama$t.err || { cat $W/llama$t.err; exit 1; }
  done
  read c_n p1 d1 p2 d2 < <($PY -c "
import json
a, b = (json.load(open('$W/llama%d.json' % t)) for t in (1, 2))
print(a['prompt_tokens'], '%.1f %.1f %.1f %.1f' % (a['prefill_tps'], a['decode_tps'], b['prefill_tps'], b['decode_tps']))")
  [ "$c_n" = "$np" ] || echo "note: llama.cpp's prompt is $c_n tokens, lorakit's $np"
  c_p=$($PY -c "print(max($p1, $p2))"); c_d=$($PY -c "print(max($d1, $d2))"); c_r=$(rss $W/llama2.err)
  echo "llama.cpp F16: 1 thread prefill $p1, decode $d1 tokens/s; 2 threads prefill $p2, decode $d2 tokens/s"
  printf "%-22s %10s %14s %8s\n" what lorakit "llama.cpp F16" ratio
  printf "%-22s %10s %14s %8s\n" "prefill tokens/s" $lp $c_p $(ratio $lp $c_p)
  printf "%-22s %10s %14s %8s\n" "decode tokens/s" $ld $c_d $(ratio $ld $c_d)
  printf "%-22s %10s %14s %8s\n" "peak RSS MB" $lr $c_r $(ratio $lr $c_r)
  echo "lorakit prefill without AMX (LORAKIT_AMX=0: widened tiles and sgemm): $lp0 tokens/s; with: $(ratio $lp $lp0)"
  echo "(llama.cpp's RSS includes node's, about 50 MB; lorakit's includes loading the safetensors)"
  rm -f $W/m.f16.gguf
else
  printf "%-22s %10s %14s\n" "prefill tokens/s" $lp "-" "decode tokens/s" $ld "-" "peak RSS MB" $lr "-"
  echo "lorakit prefill without AMX (LORAKIT_AMX=0): $lp0 tokens/s"
  echo "llama.cpp is not installed (make llama-ref): no comparison"
fi

# 2. eval on MedQuAD dev
if [ ! -f $DEV ] || [ ! -f $DOCS ]; then
  echo "$DEV or $DOCS is absent: the eval rows are skipped"; exit 0
fi
# the sample: N questions spread over the first 200, and their mean reference length in characters
read stride mean_s mean_all < <($PY - $DEV $W/qa.jsonl $N <<'PYEOF'
import json, sys
rows = [l for l in open(sys.argv[1]) if l.strip()][:200]
n = max(1, min(int(sys.argv[3]), len(rows)))
stride = len(rows) // n
pick = rows[::stride][:n]
open(sys.argv[2], "w").writelines(pick)
mean = lambda rs: sum(len(json.loads(r)["answer"]) for r in rs) / len(rs)
print(stride, "%.0f" % mean(pick), "%.0f" % mean(rows))
PYEOF
)
$PY - "$SH/data/medquad/train.jsonl" $W/train.jsonl <<'PYEOF'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as o:
    for i, l in enumerate(f):
        if i == 8:
            break
        r = json.loads(l)
        o.write(json.dumps({"instruction": r["question"], "input": "", "output": r["answer"]}) + "\n")
PYEOF
$L index --docs $DOCS --db $W/docs.db --fts-tokenizer unicode61 >/dev/null
$L train --model $W/m --data $W/train.jsonl --out $W/ad --steps 1 --seq 64 --batch 1 --rank 8 --threads 2 \
  --runs $W/train.db --quiet >/dev/null
BD=$($L eval --help | sed -n 's/.*(default \([0-9]*\); 1: one at a time).*/\1/p')
BS=" ${BENCH_EVAL_BATCHES:-} "; [[ "$BS" == *" $BD "* ]] || BS="$BS$BD "
echo "eval: $N of the first 200 MedQuAD dev questions (every ${stride}th; mean reference $mean_s characters," \
  "the 200's $mean_all) x 4 modes (base, rag k=3, ft, ft+rag), --max-new 32, 2 threads; batches 1$BS(default $BD)"
printf "%-14s %10s %14s %10s %24s\n" run "wall s" "s/question" "RSS MB" "200 questions (extrap.)"
declare -A per
for B in 1 $BS; do
  t0=$(date +%s.%N)
  /usr/bin/time -f 'RSS %M' $L eval --model $W/m --adapter $W/ad --qa $W/qa.jsonl --index $W/docs.db --k 3 \
    --max-new 32 --batch $B --threads 2 --runs $W/runs.db --name b$B --quiet > $W/ev$B.txt 2> $W/ev$B.err \
    || { cat $W/ev$B.err; exit 1; }
  t1=$(date +%s.%N)
  per[$B]=$($PY -c "print('%.2f' % (($t1 - $t0) / $N))")
  printf "%-14s %10s %14s %10s %24s\n" "--batch $B" $($PY -c "print('%.1f' % ($t1 - $t0))") ${per[$B]} $(rss $W/ev$B.err) \
    "$($PY -c "print('%.1f min' % (${per[$B]} * 200 / 60))")"
done
for B in $BS; do
  echo "   --batch $B: $(ratio ${per[1]} ${per[$B]}) the speed of --batch 1 (load average now $(cut -d' ' -f1 /proc/loadavg))"
done
echo "   goal, 200 questions x 4 modes under 30 min at the default batch: $($PY -c "print('met' if ${per[$BD]} * 200 < 1800 else 'NOT met')")" \
  "(extrapolated from $N questions whose references average $mean_s characters against $mean_all)"
# the runs alike: every answer equal, every score within float32 rounding (NLL) or equal
for B in $BS; do
$PY - $W/runs.db b1 b$B <<'PYEOF' || exit 1
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.text_factory = bytes  # a random model's answers may hold bytes that are not UTF-8: compare them as bytes
def cells(name):
    rid = db.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()[0]
    return {(i, m): (a, json.loads(s)) for i, m, a, s in
            db.execute("SELECT item_id, mode, answer, scores_json FROM eval_items WHERE run_id = ?", (rid,))}
a, b = cells(sys.argv[2]), cells(sys.argv[3])
bad = [k for k in a if k not in b or a[k][0] != b[k][0] or any(
    not (x == b[k][1].get(key) or (key == "nll" and abs(x - b[k][1][key]) <= 1e-5 * (1 + abs(x))))
    for key, x in a[k][1].items() if key != "seconds")]
print("   %s, %d cells: %s" % (sys.argv[3], len(a), "the answers and scores of --batch 1" if a and not bad and len(a) == len(b)
                              else "DIFFERENT at %d cells, e.g. %s" % (len(bad), bad[:3])))
sys.exit(1 if bad or not a else 0)
PYEOF
done
