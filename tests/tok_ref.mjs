// tok_ref.mjs - the reference tokenizer for tests and benchmarks: @huggingface/tokenizers
// (a JavaScript implementation of tokenizer.json), installed by `make node-ref` into build/node.
//   node tests/tok_ref.mjs DIR IN.jsonl OUT.jsonl   each input line a JSON string; each output
//                                                   line the ids of that text as a JSON list
//   node tests/tok_ref.mjs DIR --bench FILE         encodes FILE (in 64 KB pieces cut at
//                                                   newlines) and prints "MB/s <x>"
// Encoding is without special tokens added (add_special_tokens: false), as lorakit's tok_encode.
import fs from "node:fs";
import path from "node:path";

const lib = new URL("../build/node/node_modules/@huggingface/tokenizers/dist/tokenizers.mjs", import.meta.url);
const { Tokenizer } = await import(lib.href);

const [dir, a, b] = process.argv.slice(2);
const read = (f) => JSON.parse(fs.readFileSync(path.join(dir, f), "utf8"));
const cfgPath = path.join(dir, "tokenizer_config.json");
const tok = new Tokenizer(read("tokenizer.json"), fs.existsSync(cfgPath) ? read("tokenizer_config.json") : {});
const enc = (s) => tok.encode(s, { add_special_tokens: false }).ids;

if (a === "--bench") {
    // the same pieces as bench/bench_tok.c: 64 KB of bytes, extended to the next newline
    const buf = fs.readFileSync(b);
    const pieces = [];
    for (let i = 0; i < buf.length; ) {
        let j = Math.min(buf.length, i + 65536);
        while (j < buf.length && buf[j - 1] !== 10) j++;
        pieces.push(buf.subarray(i, j).toString("utf8"));
        i = j;
    }
    const t0 = process.hrtime.bigint();
    let n = 0;
    for (const p of pieces) n += enc(p).length;
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    console.log(`MB/s ${(buf.length / s / 1e6).toFixed(3)} tokens ${n} seconds ${s.toFixed(3)}`);
} else {
    const lines = fs.readFileSync(a, "utf8").split("\n").filter((l) => l.length);
    const out = lines.map((l) => JSON.stringify(enc(JSON.parse(l))));
    fs.writeFileSync(b, out.join("\n") + "\n");
}
