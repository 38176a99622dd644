// Greedy generation with transformers.js (Node) on moeport model folders; prints nothing, writes CASES.json.result.
// Usage: node transformersjs_runner.mjs ENTRY CASES.json, where ENTRY is the path of transformers.js'
// dist/transformers.node.mjs (installed into an ignored folder by tests/test_layouts.py) and CASES.json lists
// {"folder", "prompts": [text, ...], "max_new_tokens", "dtype"}. Loads only local files.
import { readFileSync, writeFileSync } from 'node:fs';
import { basename, dirname } from 'node:path';
import { pathToFileURL } from 'node:url';

const [entry, casesPath] = process.argv.slice(2);
const { env, AutoTokenizer, AutoModelForCausalLM } = await import(pathToFileURL(entry).href);
env.allowRemoteModels = false;
env.allowLocalModels = true;

const results = [];
for (const c of JSON.parse(readFileSync(casesPath, 'utf8'))) {
    env.localModelPath = dirname(c.folder) + '/';
    const id = basename(c.folder);
    const tokenizer = await AutoTokenizer.from_pretrained(id);
    tokenizer.padding_side = 'left';
    const model = await AutoModelForCausalLM.from_pretrained(id, { dtype: c.dtype, device: 'cpu' });
    const inputs = tokenizer(c.prompts, { padding: true });
    const output = await model.generate({ ...inputs, max_new_tokens: c.max_new_tokens, do_sample: false });
    const width = inputs.input_ids.dims[1];
    results.push({
        folder: c.folder,
        dtype: c.dtype,
        model_class: model.constructor.name,
        prompt_ids: inputs.input_ids.tolist().map((row) => row.map(Number)),
        tokens: output.tolist().map((row) => row.slice(width).map(Number)),
    });
    await model.dispose();
}
writeFileSync(casesPath + '.result', JSON.stringify(results, null, 1));
