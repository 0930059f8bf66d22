// The official openai Node SDK as a call server for Python tests (tests/openai_node.py): each stdin line is
// {"baseURL", "params"} for client.chat.completions.create; each stdout line is what the SDK gave back, in order:
// {"completion"} or {"chunks"} (a stream), plus {"error"} when the SDK raised (chunks got before it are kept).
import { createInterface } from "node:readline";
import OpenAI from "openai";

const apiKey = process.env.GATEWAY_KEY;

function raised(error) {
  return {
    name: error.constructor.name, status: error.status ?? null, code: error.code ?? null, type: error.type ?? null,
    param: error.param ?? null, message: error.message, retryAfter: error.headers?.get?.("retry-after") ?? null,
  };
}

async function call({ baseURL, params }) {
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 10_000 });
  const chunks = [];
  try {
    const answer = await client.chat.completions.create(params);
    if (!params.stream) return { completion: answer };
    for await (const chunk of answer) chunks.push(chunk);
    return { chunks };
  } catch (error) {
    if (!(error instanceof OpenAI.APIError)) throw error;  // a bug in this script, not an answer: exit non-zero
    return { ...(params.stream ? { chunks } : {}), error: raised(error) };
  }
}

for await (const line of createInterface({ input: process.stdin })) {
  console.log(JSON.stringify(await call(JSON.parse(line))));
}
