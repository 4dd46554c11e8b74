// The official @lmstudio/sdk against a proxy with client keys: without a key, with a wrong one,
// and with a key limited to one model.
// Usage: node native_auth.mjs <ws://host:port> <key> <its model> <another model>;
// prints one JSON object.
import { LMStudioClient } from "@lmstudio/sdk";

const [baseUrl, key, allowed, other] = process.argv.slice(2);
const quiet = { info() {}, debug() {}, warn() {}, error() {} };
const out = {};

async function attempt(fn) {
  try {
    return { ok: await fn() };
  } catch (error) {
    return { error: error.message };
  }
}

const anonymous = new LMStudioClient({ baseUrl, logger: quiet });
out.noKey = await attempt(async () => (await anonymous.system.listDownloadedModels()).length);
const wrong = new LMStudioClient({ baseUrl, logger: quiet, clientPasskey: "not a key" });
out.wrongKey = await attempt(async () => (await wrong.system.listDownloadedModels()).length);
const keyed = new LMStudioClient({ baseUrl, logger: quiet, clientPasskey: key });
out.load = await attempt(async () => (await keyed.llm.load(allowed)).identifier);
out.other = await attempt(async () => (await keyed.llm.load(other)).identifier);
console.log(JSON.stringify(out));
process.exit(0);
