// The official openai Node SDK against the gateway (tests/test_openai_node_sdk.py): prints what it got as JSON.
import OpenAI from "openai";

const gateway = process.env.GATEWAY_URL;
const apiKey = process.env.GATEWAY_KEY;
const sdk = (path) => new OpenAI({ baseURL: `${gateway}${path}`, apiKey, maxRetries: 0, timeout: 10_000 });

const client = sdk("/openai/v1");
const listed = [];
for await (const model of client.models.list()) listed.push(model);
const listedOnV1 = [];
for await (const model of sdk("/v1").models.list()) listedOnV1.push(model.id);
const stream = await client.chat.completions.create({
  model: "mock/chat", messages: [{ role: "user", content: "hi" }], stream: true,
});
let text = "";
for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
let refused = null;
try {
  await client.chat.completions.create({ model: "no/such", messages: [{ role: "user", content: "hi" }] });
} catch (error) {
  refused = { status: error.status, code: error.code, type: error.type, name: error.constructor.name };
}
console.log(JSON.stringify({ listed, listedOnV1, text, refused }));
