// llama_ref.mjs - llama.cpp as a test peer: node-llama-cpp 3.21.1 (a prebuilt CPU build of
// llama.cpp, installed by `make llama-ref` into build/llama) runs GGUF files.
//   node tests/llama_ref.mjs JOB.json OUT.json
// JOB is one run, or {"runs": [run, ...]} (one process, one llama.cpp instance, several models).
// A run: {"model": "m.gguf", "lora": "a.gguf" (optional, applied with scale 1),
//   "tokenize": ["text", ...]        ids of each text, special tokens parsed, no BOS added
//   "generate": [[ids...], ...], "n": 16
//                                    greedy (temperature 0) continuation of each prompt, n tokens,
//                                    end-of-generation tokens included (generation goes on)
//   "logprobs": [[ids...], ...]      next-token log-probabilities over the whole vocabulary after
//                                    each prompt (null where the float32 softmax underflows)
//   "info": true}                    readGgufFileInfo's view of the file: the metadata (arrays as
//                                    their length and first 8 values) and the tensor table
// OUT has the same keys with the results ({"runs": [...]} for several). Contexts use an F32 KV
// cache and no flash attention, so that only the model differs from lorakit's float32 forward;
// one sequence, its history cleared before each prompt. One thread: on a loaded 2-core machine
// llama.cpp's spinning thread pool made two threads 10x slower than one.
import fs from "node:fs";

const lib = new URL("../build/llama/node_modules/node-llama-cpp/dist/index.js", import.meta.url);
const { getLlama, readGgufFileInfo, LlamaLogLevel } = await import(lib.href);

let llama = null;

async function info(path) {
    const gi = await readGgufFileInfo(path, { logWarnings: false });
    const meta = {};
    const walk = (o, prefix) => {
        for (const [k, v] of Object.entries(o)) {
            const key = prefix ? `${prefix}.${k}` : k;
            if (v !== null && typeof v === "object" && !Array.isArray(v)) walk(v, key);
            else if (Array.isArray(v)) meta[key] = { length: v.length, head: v.slice(0, 8).map(String) };
            else meta[key] = typeof v === "bigint" ? Number(v) : v;
        }
    };
    walk(gi.metadata, "");
    return {
        version: gi.version,
        tensors: (gi.tensorInfo || []).map((t) => ({
            name: t.name, dims: t.dimensions.map(Number), type: t.ggmlType, offset: Number(t.offset),
        })),
        metadata: meta,
    };
}

// Evaluates prompt (a list of ids) from an empty history; the last token asks for `next`.
async function evalPrompt(seq, prompt, next) {
    await seq.clearHistory();
    const input = prompt.map((id, i) => (i === prompt.length - 1 ? [id, { generateNext: next }] : id));
    const res = await seq.controlledEvaluate(input);
    return res[res.length - 1].next;
}

async function run(job) {
    const out = {};
    if (job.info) out.info = await info(job.model);
    if (!job.tokenize && !job.generate && !job.logprobs) return out;
    llama ??= await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: 1 });
    const model = await llama.loadModel({ modelPath: job.model, gpuLayers: 0 });
    if (job.tokenize) out.tokenize = job.tokenize.map((t) => Array.from(model.tokenize(t, true)));
    if (job.generate || job.logprobs) {
        const ctxOpts = {
            contextSize: job.context || 512,
            batchSize: job.context || 512,
            flashAttention: false,
            experimentalKvCacheKeyType: "F32",
            experimentalKvCacheValueType: "F32",
            threads: 1,
        };
        if (job.lora) ctxOpts.lora = { adapters: [{ filePath: job.lora, scale: 1 }] };
        const ctx = await model.createContext(ctxOpts);
        const seq = ctx.getSequence();
        const greedy = { token: true, options: { temperature: 0 } };
        if (job.generate) {
            out.generate = [];
            for (const prompt of job.generate) {
                const ids = [];
                let next = await evalPrompt(seq, prompt, greedy);
                for (let k = 0; k < (job.n || 16); k++) {
                    ids.push(next.token);
                    if (k + 1 < (job.n || 16)) {
                        const res = await seq.controlledEvaluate([[next.token, { generateNext: greedy }]]);
                        next = res[0].next;
                    }
                }
                out.generate.push(ids);
            }
        }
        if (job.logprobs) {
            out.logprobs = [];
            for (const prompt of job.logprobs) {
                const probs = (await evalPrompt(seq, prompt, { probabilities: true, options: { temperature: 0 } }))
                    .probabilities;
                const lp = new Array(probs.size).fill(null); // every token of the vocabulary is there
                for (const [tok, p] of probs) lp[tok] = p > 0 ? Math.log(p) : null;
                out.logprobs.push(lp);
            }
        }
        await ctx.dispose();
    }
    await model.dispose();
    return out;
}

const [jobPath, outPath] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const results = [];
for (const r of job.runs || [job]) results.push(await run(r));
if (llama) await llama.dispose();
fs.writeFileSync(outPath, JSON.stringify(job.runs ? { runs: results } : results[0]));
