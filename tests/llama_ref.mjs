// llama_ref.mjs - llama.cpp as a test peer: node-llama-cpp 3.21.1 (a prebuilt CPU build of
// llama.cpp, installed by `make llama-ref` into build/llama) runs a GGUF file.
//   node tests/llama_ref.mjs JOB.json OUT.json
// JOB: {"model": "m.gguf", "lora": "a.gguf" (optional, scale 1),
//       "tokenize": ["text", ...]           ids of each text, special tokens parsed, no BOS added
//       "generate": [[ids...], ...], "n": 16  greedy (temperature 0) continuation of each prompt,
//                                             n tokens, end-of-generation tokens included
//       "logprobs": [[ids...], ...]          next-token log-probabilities over the whole
//                                             vocabulary after each prompt (null where the peer's
//                                             float32 softmax underflows to 0)
//       "info": true}                        readGgufFileInfo's view of the file (metadata
//                                             without the token and merge arrays, tensor table)
// OUT: the same keys with the results. The context has an F32 KV cache and no flash attention,
// so that only the model differs from lorakit's float32 forward; one sequence, one thread pool,
// history cleared before each prompt.
import fs from "node:fs";

const lib = new URL("../build/llama/node_modules/node-llama-cpp/dist/index.js", import.meta.url);
const { getLlama, readGgufFileInfo, LlamaLogLevel } = await import(lib.href);

const [jobPath, outPath] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const out = {};

if (job.info) {
    const info = await readGgufFileInfo(job.model, { logWarnings: false });
    const meta = {};
    const walk = (o, prefix) => {
        for (const [k, v] of Object.entries(o)) {
            const key = prefix ? `${prefix}.${k}` : k;
            if (v !== null && typeof v === "object" && !Array.isArray(v)) walk(v, key);
            else if (Array.isArray(v)) meta[key] = { length: v.length, head: v.slice(0, 8).map(String) };
            else meta[key] = typeof v === "bigint" ? Number(v) : v;
        }
    };
    walk(info.metadata, "");
    out.info = {
        version: info.version,
        tensors: (info.tensorInfo || []).map((t) => ({
            name: t.name, dims: t.dimensions.map(Number), type: t.ggmlType, offset: Number(t.offset),
        })),
        metadata: meta,
    };
}

const needModel = job.tokenize || job.generate || job.logprobs;
if (needModel) {
    const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: 2 });
    const model = await llama.loadModel({ modelPath: job.model, gpuLayers: 0 });
    if (job.tokenize) out.tokenize = job.tokenize.map((t) => Array.from(model.tokenize(t, true)));
    if (job.generate || job.logprobs) {
        const ctxOpts = {
            contextSize: job.context || 512,
            batchSize: job.context || 512,
            flashAttention: false,
            experimentalKvCacheKeyType: "F32",
            experimentalKvCacheValueType: "F32",
            threads: 2,
        };
        if (job.lora) ctxOpts.lora = { adapters: [{ filePath: job.lora, scale: 1 }] };
        const ctx = await model.createContext(ctxOpts);
        const seq = ctx.getSequence();
        const next = { generateNext: { token: true, probabilities: true, options: { temperature: 0 } } };
        if (job.generate) {
            out.generate = [];
            for (const prompt of job.generate) {
                await seq.clearHistory();
                const ids = [];
                let input = prompt.map((id, i) => (i === prompt.length - 1 ? [id, { generateNext: { token: true, options: { temperature: 0 } } }] : id));
                for (let k = 0; k < (job.n || 16); k++) {
                    const res = await seq.controlledEvaluate(input);
                    const tok = res[res.length - 1].next.token;
                    ids.push(tok);
                    input = [[tok, { generateNext: { token: true, options: { temperature: 0 } } }]];
                }
                out.generate.push(ids);
            }
        }
        if (job.logprobs) {
            out.logprobs = [];
            for (const prompt of job.logprobs) {
                await seq.clearHistory();
                const input = prompt.map((id, i) => (i === prompt.length - 1 ? [id, next] : id));
                const res = await seq.controlledEvaluate(input);
                const probs = res[res.length - 1].next.probabilities;
                const lp = new Array(probs.size).fill(null); // every token of the vocabulary is there
                for (const [tok, p] of probs) lp[tok] = p > 0 ? Math.log(p) : null;
                out.logprobs.push(lp);
            }
        }
        await ctx.dispose();
    }
    await model.dispose();
    await llama.dispose();
}
fs.writeFileSync(outPath, JSON.stringify(out));
