#!/bin/sh
# seed.sh LORAKIT OUTDIR - seed corpora for the fuzz targets from the project's own fixtures:
# small models written by `lorakit init` (single file and sharded), a tokenizer from
# `lorakit tokenizer train`, adapter configs, JSONL records of every data format, search
# queries. Generated on every run into OUTDIR/<target>/seed-*; never committed.
set -e
LK=$1
OUT=$2
W=$(mktemp -d "${TMPDIR:-/tmp}/lkseed.XXXXXX")
trap 'rm -rf "$W"' EXIT
for t in fuzz_st fuzz_st_index fuzz_cfg fuzz_lora_config fuzz_tok fuzz_data fuzz_fts fuzz_adapter; do mkdir -p "$OUT/$t"; done

# models: a 1-layer Qwen2 and Llama (f32, bf16, sharded)
cat > "$W/qwen.json" <<'J'
{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"vocab_size":16,"max_position_embeddings":64,"rms_norm_eps":1e-6,"rope_theta":10000,"tie_word_embeddings":true,"torch_dtype":"float32"}
J
cat > "$W/llama.json" <<'J'
{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":2,"vocab_size":12,"max_position_embeddings":32,"rms_norm_eps":1e-5,"rope_theta":500000,"tie_word_embeddings":false,"attention_bias":false,"torch_dtype":"bfloat16","bos_token_id":1,"eos_token_id":2}
J
"$LK" init --config "$W/qwen.json" --out "$W/q32" >/dev/null
"$LK" init --config "$W/llama.json" --out "$W/l16" --dtype bf16 >/dev/null
"$LK" init --config "$W/qwen.json" --out "$W/q16" --dtype f16 >/dev/null
"$LK" init --config "$W/qwen.json" --out "$W/qsh" --shard-size 600 >/dev/null
cp "$W/q32/model.safetensors" "$OUT/fuzz_st/seed-qwen-f32"
cp "$W/l16/model.safetensors" "$OUT/fuzz_st/seed-llama-bf16"
cp "$W/q16/model.safetensors" "$OUT/fuzz_st/seed-qwen-f16"
for f in "$W"/qsh/model-*.safetensors; do cp "$f" "$OUT/fuzz_st/seed-shard-$(basename "$f" .safetensors)"; done
cp "$W/q32/config.json" "$OUT/fuzz_cfg/seed-qwen"
cp "$W/l16/config.json" "$OUT/fuzz_cfg/seed-llama"
# Qwen3 (head_dim, q/k norm) and Llama 3.2 (llama3 rope scaling) configs
cat > "$OUT/fuzz_cfg/seed-qwen3" <<'J'
{"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3","hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":8,"vocab_size":16,"attention_bias":false,"use_sliding_window":false,"layer_types":["full_attention"],"rope_scaling":null,"tie_word_embeddings":true}
J
cat > "$OUT/fuzz_cfg/seed-llama32" <<'J'
{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":12,"rope_theta":500000.0,"rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},"rope_parameters":{"rope_type":"dynamic","factor":2.0}}
J
# an adapter for the 1-layer Qwen2 (rank 2 on q_proj, v_proj: the config fuzz_adapter.c fixes)
printf '{"input_ids":[1,2,3,4,5,6]}\n{"input_ids":[7,8,9,10]}\n' > "$W/pt.jsonl"
"$LK" train --model "$W/q32" --data "$W/pt.jsonl" --out "$W/ad" --rank 2 --alpha 4 --targets q_proj,v_proj \
  --steps 1 --batch 1 --seq 8 --threads 1 --quiet --runs "$W/runs.db" >/dev/null
cp "$W/ad/adapter_model.safetensors" "$OUT/fuzz_adapter/seed-r2"
# the index over the fuzz target's own two shards (x.weight, y.bias | z.weight), and the
# layout `lorakit init --shard-size` writes
cat > "$OUT/fuzz_st_index/seed-ok" <<'J'
{"metadata": {"total_size": 30}, "weight_map": {"x.weight": "model-00001-of-00002.safetensors", "y.bias": "model-00001-of-00002.safetensors", "z.weight": "model-00002-of-00002.safetensors"}}
J
cp "$W/qsh/model.safetensors.index.json" "$OUT/fuzz_st_index/seed-init"
printf '{"weight_map": {"x.weight": "../model-00001-of-00002.safetensors"}}' > "$OUT/fuzz_st_index/seed-dotdot"

# adapter configs (PEFT's fields)
cat > "$OUT/fuzz_lora_config/seed-peft" <<'J'
{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_rslora": false, "use_dora": false, "fan_in_fan_out": false, "base_model_name_or_path": "tiny", "init_lora_weights": true, "task_type": "CAUSAL_LM", "rank_pattern": {"model.layers.0.self_attn.q_proj": 4}, "alpha_pattern": {"model.layers.1.mlp.down_proj": 32}, "modules_to_save": null, "layers_to_transform": null}
J
printf '{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":"all-linear"}' > "$OUT/fuzz_lora_config/seed-all"
printf '{"peft_type":"LORA","r":2,"target_modules":".*\\\\.(q|k)_proj","use_dora":true}' > "$OUT/fuzz_lora_config/seed-regex"
printf '{"peft_type":"LORA","r":2,"target_modules":["embed_tokens","model.layers.0.mlp.up_proj"],"modules_to_save":["lm_head"]}' > "$OUT/fuzz_lora_config/seed-embed"

# tokenizer
printf 'The patient has a fever and a cough.\nTake two tablets every day, with water.\nLe patient a de la fi\303\250vre. \347\227\205\344\272\272\345\217\221\347\203\255\343\200\202\n' > "$W/corpus.txt"
for i in 1 2 3 4 5 6; do cat "$W/corpus.txt"; done > "$W/corpus6.txt"
"$LK" tokenizer train --text "$W/corpus6.txt" --vocab 300 --out "$W/tok" >/dev/null 2>&1
cp "$W/tok/tokenizer.json" "$OUT/fuzz_tok/seed-bpe"
{ cat "$W/tok/tokenizer.json"; printf '\000'; cat "$W/tok/tokenizer_config.json"; } > "$OUT/fuzz_tok/seed-bpe-cfg"

# GGUF files (fuzz_gguf): a 1-layer Qwen2 and Llama with that tokenizer, f16 and q8_0 (under
# the 64 KB -max_len of `make fuzz`)
mkdir -p "$OUT/fuzz_gguf"
cat > "$W/qg.json" <<'J'
{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":32,"intermediate_size":32,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"vocab_size":320,"max_position_embeddings":64,"rms_norm_eps":1e-6,"rope_theta":10000,"tie_word_embeddings":true,"torch_dtype":"float32"}
J
sed 's/Qwen2ForCausalLM/LlamaForCausalLM/; s/"qwen2"/"llama"/; s/"tie_word_embeddings":true/"tie_word_embeddings":false/' "$W/qg.json" > "$W/lg.json"
# and a Qwen3 (head_dim 32 != 32 / 2 heads, q/k norms) and a Llama with llama3 rope scaling
# (rope_freqs, lorakit.rope_scaling.*) and one with linear scaling
cat > "$W/q3g.json" <<'J'
{"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3","hidden_size":32,"intermediate_size":32,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":32,"vocab_size":320,"max_position_embeddings":64,"rms_norm_eps":1e-6,"rope_theta":1000000,"tie_word_embeddings":true,"torch_dtype":"float32"}
J
sed 's/"tie_word_embeddings":false/"tie_word_embeddings":true,"rope_theta":500000,"rope_scaling":{"rope_type":"llama3","factor":32,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":16}/; s/"rope_theta":10000,//' "$W/lg.json" > "$W/l3g.json"
sed 's/"tie_word_embeddings":false/"rope_scaling":{"rope_type":"linear","factor":2},"tie_word_embeddings":false/' "$W/lg.json" > "$W/llg.json"
for m in qg lg q3g l3g llg; do
  "$LK" init --config "$W/$m.json" --out "$W/$m" >/dev/null && cp "$W"/tok/tokenizer*.json "$W/$m/"
  "$LK" convert --model "$W/$m" --out "$OUT/fuzz_gguf/seed-$m-f16.gguf" --dtype f16 >/dev/null
  "$LK" convert --model "$W/$m" --out "$OUT/fuzz_gguf/seed-$m-q8_0.gguf" --dtype q8_0 >/dev/null
done

# JSONL of each data format (first byte: options, see fuzz_data.c)
printf '\000{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"fever?"},{"role":"assistant","content":"Rest."}]}\n' > "$OUT/fuzz_data/seed-chat"
printf '\004{"instruction":"Name a symptom","input":"flu","output":"fever"}\n{"instruction":"Say hi","output":"hi"}\n' > "$OUT/fuzz_data/seed-alpaca"
printf '\010{"text":"The patient has a fever."}\n\n{"text":"\\u75c5\\u4eba"}\n' > "$OUT/fuzz_data/seed-text"
printf '\020{"input_ids":[1,2,3,4],"labels":[-100,2,3,4]}\n{"input_ids":[5,6]}\n' > "$OUT/fuzz_data/seed-pretok"
printf '\002{"input_ids":[1,99999]}\nnot json\n{"text":""}\n{"messages":[{"role":"user","content":"x"}]}\n' > "$OUT/fuzz_data/seed-bad"

# search queries (first byte: tokenizer)
printf '\000fever AND cough OR "NEAR"(x y) col:val ^start* -not +plus' > "$OUT/fuzz_fts/seed-ops"
printf '\001running patients\047 fevers' > "$OUT/fuzz_fts/seed-porter"
printf '\002\347\227\205\344\272\272\345\217\221\347\203\255 ab caf\303\251' > "$OUT/fuzz_fts/seed-trigram"
printf '\000\377\376 \"\"\" NEAR/3 ) ( * :' > "$OUT/fuzz_fts/seed-junk"
echo "seeded $(ls "$OUT"/*/seed-* | wc -l) files under $OUT"
