// The official @lmstudio/sdk through the proxy: one session of LM Studio's own protocol.
// Usage: node native.mjs <ws://host:port> <llm key> <embedding key> <a key that cannot fit>;
// prints one JSON object.
import { LMStudioClient } from "@lmstudio/sdk";

const [baseUrl, llmKey, embedKey, tooLargeKey] = process.argv.slice(2);
const client = new LMStudioClient({ baseUrl, logger: { info() {}, debug() {},
  warn: (...a) => console.error(...a), error: (...a) => console.error(...a) } });
const out = {};
out.downloaded = (await client.system.listDownloadedModels()).map(m => m.modelKey);
const progress = [];
const model = await client.llm.load(llmKey, { onProgress: p => progress.push(p) });
out.progress = progress;
out.identifier = model.identifier;
out.loaded = (await client.llm.listLoaded()).map(m => m.identifier);
const prediction = model.respond([{ role: "user", content: "how much memory is free" }]);
const fragments = [];
for await (const fragment of prediction) fragments.push(fragment.content);
const result = await prediction;
out.fragments = fragments.length;
out.content = result.content;
out.joined = fragments.join("");
out.stopReason = result.stats.stopReason;
const embedder = await client.embedding.model(embedKey);
out.embedding = (await embedder.embed("hello")).embedding;
await model.unload();
out.loadedAfterUnload = (await client.llm.listLoaded()).map(m => m.identifier);
try {
  await client.llm.model("nobody/nothing");
  out.notFound = null;
} catch (error) {
  out.notFound = error.message;
}
try {
  await client.llm.load(tooLargeKey);
  out.refused = null;
} catch (error) {
  out.refused = error.message;
}
console.log(JSON.stringify(out));
await client[Symbol.asyncDispose]?.();
process.exit(0);
