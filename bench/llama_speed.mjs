// llama_speed.mjs - llama.cpp's prefill and decode speed on a GGUF, for `make bench-eval`: the
// llama.cpp build of node-llama-cpp 3.21.1 (`make llama-ref` installs it into build/llama).
//   node bench/llama_speed.mjs MODEL.gguf PROMPT.txt N THREADS
// Tokenizes the prompt with the model's own tokenizer (no BOS added), evaluates it in one batch
// (prefill: until the first token is sampled), then decodes N - 1 more tokens greedily, one per
// step. Prints one JSON line: {"prompt_tokens", "prefill_tps", "decode_tokens", "decode_tps"}.
// Contexts use llama.cpp's defaults (F16 KV cache) with the given thread count.
import fs from "node:fs";

const lib = new URL("../build/llama/node_modules/node-llama-cpp/dist/index.js", import.meta.url);
const { getLlama, LlamaLogLevel } = await import(lib.href);

const [modelPath, promptPath, nArg, threadsArg] = process.argv.slice(2);
const n = Number(nArg || 64), threads = Number(threadsArg || 2);
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: threads });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const prompt = Array.from(model.tokenize(fs.readFileSync(promptPath, "utf8"), false));
const ctx = await model.createContext({ contextSize: prompt.length + n + 16, batchSize: 512, threads });
const seq = ctx.getSequence();
const greedy = { token: true, options: { temperature: 0 } };
const t0 = performance.now();
const input = prompt.map((id, i) => (i === prompt.length - 1 ? [id, { generateNext: greedy }] : id));
let res = await seq.controlledEvaluate(input);
let next = res[res.length - 1].next;
const t1 = performance.now();
for (let k = 1; k < n; k++) {
    res = await seq.controlledEvaluate([[next.token, { generateNext: greedy }]]);
    next = res[0].next;
}
const t2 = performance.now();
console.log(JSON.stringify({
    prompt_tokens: prompt.length,
    prefill_tps: prompt.length / ((t1 - t0) / 1000),
    decode_tokens: n - 1,
    decode_tps: (n - 1) / ((t2 - t1) / 1000),
}));
await ctx.dispose();
await model.dispose();
await llama.dispose();
