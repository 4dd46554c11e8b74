// The openai Node SDK, with its defaults, against a base URL; prints the outcome as JSON.
//   node client.mjs BASE_URL embed MODEL         embeddings.create (SDK default: base64)
//   node client.mjs BASE_URL embed-float MODEL   the same with encoding_format: "float"
//   node client.mjs BASE_URL retrieve MODEL      models.retrieve; {"not_found": ...} on 404
import OpenAI from "openai";

const [baseURL, command, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const INPUT = ["a", "b c"];

const commands = {
  async embed() {
    const r = await client.embeddings.create({ model, input: INPUT });
    return { vectors: r.data.map((d) => d.embedding), usage: r.usage };
  },
  async "embed-float"() {
    const r = await client.embeddings.create({ model, input: INPUT, encoding_format: "float" });
    return { vectors: r.data.map((d) => d.embedding), usage: r.usage };
  },
  async retrieve() {
    try {
      return { model: await client.models.retrieve(model) };
    } catch (err) {
      if (!(err instanceof OpenAI.NotFoundError)) throw err;
      return { not_found: { status: err.status, code: err.code, message: err.message } };
    }
  },
};

process.stdout.write(JSON.stringify(await commands[command]()));
