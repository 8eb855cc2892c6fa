#!/usr/bin/env bash
# bench-mpi: data-parallel training throughput of lorakit-mpi with 1 and 2 ranks, one rank per
# core (mpirun --bind-to core, 1 BLAS thread per rank), on the small config of bench-train
# (hidden 512, intermediate 1376, 8 layers, 8 heads, 2 kv heads, vocab 8192), seq 256, global
# batch 4, LoRA rank 8. Tokens/s are lorakit's own steady-state figure (steps 2..N); the
# scaling efficiency is tok/s(2 ranks) / (2 x tok/s(1 rank)). For comparison: one process with
# --threads 2 (its threads split each micro-batch's rows, as the ranks split the global batch).
# Usage: bench/bench_mpi.sh LORAKIT LORAKIT_MPI [STEPS]
set -euo pipefail
L=$1; LM=$2; N=${3:-8}; PY=/usr/bin/python3
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm=isolated OMPI_MCA_btl=self,vader
export OPENBLAS_NUM_THREADS=1
C=512 F=1376 NL=8 NH=8 NKV=2 V=8192 S=256 B=4
cores=$(nproc)
echo "== bench-mpi: small config, seq $S, global batch $B, $N steps, LoRA rank 8; $cores cores, load average $(cut -d" " -f1-3 /proc/loadavg)"
[ "$cores" -ge 2 ] || echo "fewer than 2 cores: 2 ranks share one (the figure says nothing about scaling)"
printf '{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":%d,"intermediate_size":%d,"num_hidden_layers":%d,"num_attention_heads":%d,"num_key_value_heads":%d,"vocab_size":%d,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":true,"max_position_embeddings":32768,"torch_dtype":"float32"}\n' $C $F $NL $NH $NKV $V > $W/cfg.json
$L init --config $W/cfg.json --out $W/m --dtype f32 --seed 1 >/dev/null
$PY - "$W/data.jsonl" $V $S $((B * N)) <<'PYEOF'
import json, random, sys
random.seed(1); path, V, S, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open(path, "w") as f:
    for _ in range(n):
        f.write(json.dumps({"input_ids": [random.randrange(V) for _ in range(S)]}) + "\n")
PYEOF
args="--model $W/m --data $W/data.jsonl --overwrite --steps $N --batch $B --seq $S --rank 8 --log-every 1000 --runs $W/runs.db"
toks() { sed -n 's/^done: .* \([0-9.]*\) tok\/s.*/\1/p'; }
out1=$(mpirun --bind-to core -np 1 $LM train $args --out $W/o1 --threads 1 2>&1) || { echo "$out1"; exit 1; }
t1=$(echo "$out1" | toks)
out2=$(mpirun --bind-to core -np 2 $LM train $args --out $W/o2 --threads 1 2>&1) || { echo "$out2"; exit 1; }
t2=$(echo "$out2" | toks)
outt=$(OPENBLAS_NUM_THREADS=2 $L train $args --out $W/ot --threads 2 2>&1) || { echo "$outt"; exit 1; }
tt=$(echo "$outt" | toks)
l1=$(echo "$out1" | sed -n 's/^done: .*loss [0-9.]* -> \([0-9.]*\),.*/\1/p')
l2=$(echo "$out2" | sed -n 's/^done: .*loss [0-9.]* -> \([0-9.]*\),.*/\1/p')
printf "%-34s %10s %12s\n" run tok/s tok/s/rank
printf "%-34s %10s %12s\n" "1 rank  (mpirun -np 1, 1 thread)" "$t1" "$t1"
printf "%-34s %10s %12s\n" "2 ranks (mpirun -np 2, 1 thread)" "$t2" "$($PY -c "print('%.0f' % ($t2 / 2))")"
printf "%-34s %10s %12s\n" "1 process, --threads 2" "$tt" "-"
echo "scaling efficiency (2 ranks vs 2 x 1 rank): $($PY -c "print('%.0f%%' % (100 * $t2 / (2 * $t1)))")"
echo "speed-up of 2 ranks over 1: $($PY -c "print('%.2fx' % ($t2 / $t1))");" \
     "over 1 process with 2 threads: $($PY -c "print('%.2fx' % ($t2 / $tt))")"
echo "final loss: 1 rank $l1, 2 ranks $l2 (same global batch: equal up to float summation order)"
