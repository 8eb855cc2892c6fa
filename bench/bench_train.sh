#!/usr/bin/env bash
# bench-train: training tokens/s of lorakit against plain PyTorch (Debian's python3-torch) on the
# same model, data, batch and sequence length, measured in the same run. Per config and mode:
#   lorakit with --threads 1, lorakit with --threads 2, lorakit-mpi with 2 ranks of 1 thread
#   (when bin/lorakit-mpi and mpirun exist and the batch splits), and PyTorch with 2 threads at its
#   best setting here, OMP_WAIT_POLICY=PASSIVE (libgomp's spinning workers otherwise take the
#   cores from OpenBLAS).
# Tokens/s over steps 2..N (the first is warm-up), model GFLOP/s against the sgemm peak measured
# with the same thread count, and peak RSS of every process (per rank for MPI).
# The 0.5B shape, Qwen3-0.6B (q_norm / k_norm, head_dim 128) and Llama-3.2-1B (llama3 rope
# scaling) run lorakit on bf16 weights (kept bf16 in memory: --weights file) and PyTorch on the same
# values widened to float32; the two use the same weights and the same tokens (every row of a
# config's data is the same row, so any shuffle gives both the same first step), and the loss of
# step 1 (before any update) of each is printed: equal losses say both computed the same network. BENCH_7B=1 adds two LoRA steps on the Qwen2.5-7B shape
# (bf16 random weights, about 15 GB written to a temp folder and deleted; 24 GB of RAM).
# BENCH_ONLY="qwen3-0.6b llama3.2-1b" runs only the configs named.
# Usage: bench/bench_train.sh LORAKIT SGEMM_BIN [LORAKIT_MPI]
set -euo pipefail
L=$1; SGEMM=$2; LM=${3:-}; PY=/usr/bin/python3
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm=isolated OMPI_MCA_btl=self,vader
unset OPENBLAS_NUM_THREADS OMP_NUM_THREADS OMP_WAIT_POLICY
have_torch=1; $PY -c 'import torch' 2>/dev/null || have_torch=0
have_mpi=1; { [ -n "$LM" ] && [ -x "$LM" ] && command -v mpirun >/dev/null; } || have_mpi=0
echo "== bench-train: $(date -u +%F), $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), load average $(cut -d' ' -f1-3 /proc/loadavg)"
blas=$(update-alternatives --query libblas.so.3-x86_64-linux-gnu 2>/dev/null | sed -n 's/^Value: //p')
echo "torch's BLAS (libblas.so.3 alternative): ${blas:-unknown}"
if [ $have_torch = 1 ]; then
  OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 $PY -c 'import torch; torch.set_num_threads(2); print("torch", torch.__version__, "threads", torch.get_num_threads(), "OMP_WAIT_POLICY=PASSIVE"); print([l.strip() for l in torch.__config__.show().splitlines() if "BLAS" in l or "LAPACK" in l])'
else
  echo "python3-torch is not installed: lorakit figures only (make deps-bench installs it)"
fi
[ $have_mpi = 1 ] || echo "no lorakit-mpi or mpirun: no MPI rows (make MPI=1 builds it)"
peak1=$(OPENBLAS_NUM_THREADS=1 $SGEMM); peak2=$(OPENBLAS_NUM_THREADS=2 $SGEMM)
echo "measured sgemm peak (OpenBLAS): 1 thread $peak1 GFLOP/s, 2 threads $peak2 GFLOP/s"

# the model and data of a config: name hidden inter layers heads kv vocab seq rows dtype [tied]; with
# hidden "preset:NAME" the model is `lorakit init --preset NAME` (the vocabulary from its config)
make_cfg() {
  local d=$W/$1 V=$7; mkdir -p $d
  if [ "${2#preset:}" != "$2" ]; then
    $L init --preset ${2#preset:} --out $d/m --dtype ${10} --seed 1 >/dev/null
    V=$($PY -c "import json;print(json.load(open('$d/m/config.json'))['vocab_size'])")
  else
    printf '{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":%d,"intermediate_size":%d,"num_hidden_layers":%d,"num_attention_heads":%d,"num_key_value_heads":%d,"vocab_size":%d,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":%s,"max_position_embeddings":32768,"torch_dtype":"float32"}\n' \
      $2 $3 $4 $5 $6 $7 ${11:-true} > $d/cfg.json
    $L init --config $d/cfg.json --out $d/m --dtype ${10} --seed 1 >/dev/null
  fi
  # one random row, repeated: whatever order a trainer draws rows in, step 1 sees the same tokens
  $PY - "$d/data.jsonl" $V $8 $9 <<'PYEOF'
import json, random, sys
random.seed(1); path, V, S, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
row = json.dumps({"input_ids": [random.randrange(V) for _ in range(S)]})
with open(path, "w") as f:
    for _ in range(n):
        f.write(row + "\n")
PYEOF
}

# step 1's loss of the last run in $W/runs.db (its summary; nan when there is none)
first_loss() {
  $PY - "$W/runs.db" <<'PYEOF' 2>/dev/null || echo nan
import json, sqlite3, sys
row = sqlite3.connect(sys.argv[1]).execute("select summary_json from runs order by id desc limit 1").fetchone()
print(json.loads(row[0])["first_loss"])
PYEOF
}

# one lorakit run: prints "tok/s rss_mb first_loss"; args: prefix (may be empty) threads extra-args...
lk_run() {
  local pre=$1 t=$2; shift 2
  local out
  rm -f $W/runs.db*
  out=$( { /usr/bin/time -f 'RSS %M' $pre train --data $d/data.jsonl --out $d/o --overwrite --steps $N --batch $B \
           --seq $S --threads $t --rank 8 --log-every 1000 --runs $W/runs.db "$@" ; } 2>&1 ) || { echo "$out" >&2; return 1; }
  # "done: ... 1571 tok/s, wrote ..." (lorakit-mpi: "1571 tok/s (2 ranks, 786/rank), wrote ...");
  # the loss of step 1 from the run's summary in the runs database (6 digits)
  echo "$(echo "$out" | sed -n 's/^done: .* \([0-9.]*\) tok\/s.*/\1/p') $(( $(echo "$out" | sed -n 's/^RSS //p' | tail -1) / 1024 ))" \
       "$(first_loss)"
}

row() { # name mode run tok/s rss peak
  local gf pk
  gf=$($PY -c "print('%.1f' % ($4 * $K * $P / 1e9))"); pk=$($PY -c "print('%.0f' % (100 * $gf / $6))")
  printf "%-13s %-5s %-26s %9s %9s %6s%% %9s\n" $1 $2 "$3" $4 $gf $pk $5
}

# name hidden inter layers heads kv vocab seq batch steps modes dtype
configs=(
  "tiny 256 688 4 4 2 4096 256 4 12 lora,full f32"
  "small 512 1376 8 8 2 8192 256 4 8 lora,full f32"
  "qwen2.5-0.5b 896 4864 24 14 2 151936 256 1 4 lora bf16"
  "qwen3-0.6b preset:qwen3-0.6b - - - - - 256 1 4 lora bf16"
  "llama3.2-1b preset:llama3.2-1b - - - - - 256 1 4 lora bf16"
)
printf "%-13s %-5s %-26s %9s %9s %7s %9s\n" config mode run tok/s GFLOP/s peak% RSS_MB
for c in "${configs[@]}"; do
  set -- $c; name=$1 S=$8 B=$9 N=${10} modes=${11} dt=${12}
  # BENCH_ONLY="name ...": only these configs
  [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" $name "* ]] || continue
  make_cfg $name $2 $3 $4 $5 $6 $7 $S $((B * N)) $dt
  d=$W/$name
  P=$($PY -c "import json;c=json.load(open('$d/m/config.json'));C=c['hidden_size'];F=c['intermediate_size'];L=c['num_hidden_layers'];H=c['num_attention_heads'];K=c['num_key_value_heads'];V=c['vocab_size'];hs=c.get('head_dim') or C//H;print(L*(2*C*H*hs+2*C*K*hs+3*C*F)+V*C)")
  for mode in ${modes//,/ }; do
    extra=""; [ $mode = full ] && extra="--full --lr 1e-4"
    # model FLOPs per token: 2P forward + 2P backward to activations (+ 2P for weight gradients in full)
    K=4; [ $mode = full ] && K=6
    read t1 r1 l1 < <(lk_run "$L" 1 --model $d/m $extra)
    read t2 r2 l2 < <(lk_run "$L" 2 --model $d/m $extra)
    row $name $mode "lorakit --threads 1" $t1 $r1 $peak1
    row $name $mode "lorakit --threads 2" $t2 $r2 $peak2
    tm="-"
    if [ $have_mpi = 1 ] && [ $B -ge 2 ]; then
      read tm rm lm < <(OPENBLAS_NUM_THREADS=1 lk_run "mpirun --bind-to core -np 2 $LM" 1 --model $d/m $extra)
      row $name $mode "lorakit-mpi 2 ranks x 1" $tm "$rm/rank" $peak2
    fi
    tp="-"
    if [ $have_torch = 1 ]; then
      j=$(OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 $PY bench/train_torch.py --model $d/m --data $d/data.jsonl \
          --steps $N --batch $B --seq $S --threads 2 --mode $mode --rank 8)
      tp=$(echo "$j" | $PY -c 'import json,sys;print("%.0f"%json.load(sys.stdin)["tokens_per_s"])')
      rp=$(echo "$j" | $PY -c 'import json,sys;print("%.0f"%json.load(sys.stdin)["peak_rss_mb"])')
      lp=$(echo "$j" | $PY -c 'import json,sys;print("%.6g"%json.load(sys.stdin)["first_loss"])')
      row $name $mode "torch 2 threads (PASSIVE)" $tp $rp $peak2
      echo "   step-1 loss (same weights, same tokens): lorakit $l1, torch $lp, relative difference" \
           "$($PY -c "d=abs($l1-$lp)/abs($lp);print('%.1e' % d + ('' if d < 1e-4 else '  MISMATCH: not the same computation'))")"
    fi
    ratio() { [ "$2" = "-" ] && echo "-" || $PY -c "print('%.2fx' % ($1 / $2))"; }
    echo "   ratios: threads 2 / threads 1 $(ratio $t2 $t1); threads 2 / MPI 2 $(ratio $t2 $tm); threads 2 / torch $(ratio $t2 $tp)"
  done
  rm -rf $d
done
echo "GFLOP/s counts model FLOPs (2 per weight per token forward, 2 backward, 2 more for weight"
echo "gradients in full fine-tuning); attention's T^2 terms are left out. peak% is against the"
echo "sgemm peak of the same thread count (2 threads for MPI and torch)."

if [ "${BENCH_7B:-0}" = 1 ]; then
  need=$((16 * 1024 * 1024)) # KB
  avail=$(df -k --output=avail "$W" | tail -1)
  if [ "$avail" -lt $need ]; then
    echo "BENCH_7B: $((avail / 1024 / 1024)) GB free in $W, 16 GB needed: skipped"
  else
    echo "== Qwen2.5-7B shape (hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 kv heads, vocab 152064, untied), bf16"
    S=256 B=1 N=2; make_cfg q7b 3584 18944 28 28 4 152064 $S $((B * N)) bf16 false
    d=$W/q7b
    out=$( { /usr/bin/time -f 'RSS %M' $L train --model $d/m --data $d/data.jsonl --out $d/o --steps $N --batch $B \
             --seq $S --threads 2 --rank 8 --log-every 1 --runs $W/runs.db ; } 2>&1 ) || { echo "$out"; exit 1; }
    secs=$(echo "$out" | sed -n 's/^done: [0-9]* steps in \([0-9.]*\)s.*/\1/p'); r7=$(( $(echo "$out" | sed -n 's/^RSS //p') / 1024 ))
    echo "LoRA r8, seq $S, batch $B, $N steps, --threads 2: $secs s of training, $($PY -c "print('%.1f' % ($secs / $N))") s per step; peak RSS $r7 MB ($($PY -c "print('%.2f' % ($r7 / 1024))") GiB, loading included)"
    rm -rf $d
  fi
fi
