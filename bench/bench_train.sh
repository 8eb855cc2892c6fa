#!/usr/bin/env bash
# bench-train: training tokens/s of lorakit against plain PyTorch (Debian's python3-torch) on the
# same model, data, batch, sequence length and thread count, measured in the same run.
# Both sides: float32, AdamW, tokens/s over steps 2..N (the first step is warm-up), peak RSS of
# the whole process. Usage: bench/bench_train.sh LORAKIT SGEMM_BIN [THREADS]
set -euo pipefail
L=$1; SGEMM=$2; T=${3:-2}; PY=/usr/bin/python3
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
export OPENBLAS_NUM_THREADS=$T OMP_NUM_THREADS=$T
have_torch=1; $PY -c 'import torch' 2>/dev/null || have_torch=0
echo "== bench-train: $T threads; lorakit vs PyTorch on the same model, data and threads"
blas=$(update-alternatives --query libblas.so.3-x86_64-linux-gnu 2>/dev/null | sed -n 's/^Value: //p')
echo "torch's BLAS (libblas.so.3 alternative): ${blas:-unknown} (OpenBLAS makes the comparison fair;"
echo "  the reference BLAS would slow torch down)"
peak=$($SGEMM)
echo "measured sgemm peak (OpenBLAS, $T threads): $peak GFLOP/s"
[ $have_torch = 1 ] || echo "python3-torch is not installed: lorakit figures only (make deps-bench installs it)"

# name hidden inter layers heads kv vocab seq batch steps modes
configs=(
  "tiny 256 688 4 4 2 4096 256 4 12 lora,full"
  "small 512 1376 8 8 2 8192 256 4 8 lora,full"
  "qwen2.5-0.5b 896 4864 24 14 2 151936 256 1 4 lora"
)
printf "%-13s %-5s %12s %12s %7s %9s %7s %10s %10s\n" config mode lorakit_tok/s torch_tok/s ratio GFLOP/s peak% lk_RSS_MB pt_RSS_MB
for c in "${configs[@]}"; do
  set -- $c; name=$1 C=$2 F=$3 NL=$4 NH=$5 NKV=$6 V=$7 S=$8 B=$9 N=${10} modes=${11}
  d=$W/$name; mkdir -p $d
  printf '{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":%d,"intermediate_size":%d,"num_hidden_layers":%d,"num_attention_heads":%d,"num_key_value_heads":%d,"vocab_size":%d,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":true,"max_position_embeddings":32768,"torch_dtype":"float32"}\n' $C $F $NL $NH $NKV $V > $d/cfg.json
  $L init --config $d/cfg.json --out $d/m --dtype f32 --seed 1 >/dev/null
  $PY - "$d/data.jsonl" $V $S $((B * N)) <<'PYEOF'
import json, random, sys
random.seed(1); path, V, S, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open(path, "w") as f:
    for _ in range(n):
        f.write(json.dumps({"input_ids": [random.randrange(V) for _ in range(S)]}) + "\n")
PYEOF
  P=$($PY -c "import json;c=json.load(open('$d/cfg.json'));C=c['hidden_size'];F=c['intermediate_size'];L=c['num_hidden_layers'];H=c['num_attention_heads'];K=c['num_key_value_heads'];V=c['vocab_size'];hs=C//H;print(L*(2*C*H*hs+2*C*K*hs+3*C*F)+V*C)")
  for mode in ${modes//,/ }; do
    extra=""; [ $mode = full ] && extra="--full --lr 1e-4"
    out=$( { /usr/bin/time -f 'RSS %M' $L train --model $d/m --data $d/data.jsonl --out $d/o-$mode --overwrite \
             --steps $N --batch $B --seq $S --threads $T --rank 8 $extra --log-every 1000 --runs $W/runs.db ; } 2>&1 )
    lk=$(echo "$out" | sed -n 's/.* \([0-9.]*\) tok\/s, wrote.*/\1/p')
    lkrss=$(( $(echo "$out" | sed -n 's/^RSS //p') / 1024 ))
    pt="-"; ptrss="-"; ratio="-"
    if [ $have_torch = 1 ]; then
      j=$($PY bench/train_torch.py --model $d/m --data $d/data.jsonl --steps $N --batch $B --seq $S --threads $T --mode $mode --rank 8)
      pt=$(echo "$j" | $PY -c 'import json,sys;print("%.0f"%json.load(sys.stdin)["tokens_per_s"])')
      ptrss=$(echo "$j" | $PY -c 'import json,sys;print("%.0f"%json.load(sys.stdin)["peak_rss_mb"])')
      ratio=$($PY -c "print('%.2f' % ($lk / $pt))")
    fi
    # model FLOPs per token: 2P forward + 2P backward to activations (+ 2P for weight gradients in full)
    k=4; [ $mode = full ] && k=6
    gf=$($PY -c "print('%.1f' % ($lk * $k * $P / 1e9))")
    pk=$($PY -c "print('%.0f' % (100 * $gf / $peak))")
    printf "%-13s %-5s %12s %12s %7s %9s %6s%% %10s %10s\n" $name $mode $lk $pt $ratio $gf $pk $lkrss $ptrss
  done
done
echo "GFLOP/s counts model FLOPs (2 per weight per token forward, 2 backward, 2 more for weight"
echo "gradients in full fine-tuning); attention's T^2 terms are left out."
