// The `openai` npm package streaming from `wick serve` (run by tests/server_clients.rs).
// Usage: node stream.mjs BASE_URL MODEL. Exits non-zero on any failed check; a missing
// node_modules is a failure too (`.ci/run` runs `npm ci` here).
import assert from "node:assert/strict";
import OpenAI from "openai";

const [base, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "EMPTY" });

const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Count to three." }],
  max_tokens: 6,
  stream: true,
  stream_options: { include_usage: true },
  chat_template_kwargs: { enable_thinking: false },
  ignore_eos: true,
});
const chunks = [];
for await (const chunk of stream) chunks.push(chunk);
assert.equal(chunks[0].choices[0].delta.role, "assistant");
const text = chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("");
assert.ok(text.length > 0, "no content streamed");
const finish = chunks.flatMap((c) => c.choices.map((ch) => ch.finish_reason)).filter(Boolean);
assert.deepEqual(finish, ["length"]);
const usage = chunks.at(-1).usage;
assert.equal(usage.completion_tokens, 6);
assert.equal(usage.total_tokens, usage.prompt_tokens + 6);

// The helper that accumulates a stream into a final message.
const runner = client.beta.chat.completions.stream({
  model,
  messages: [{ role: "user", content: "Hi" }],
  max_tokens: 4,
});
const final = await runner.finalChatCompletion();
assert.equal(final.choices[0].message.role, "assistant");
assert.ok(["stop", "length"].includes(final.choices[0].finish_reason));

// Errors reach the caller as APIError with the status.
await assert.rejects(
  client.chat.completions.create({ model: "nope", messages: [{ role: "user", content: "x" }] }),
  (e) => e.status === 404,
);
console.log("node openai ok:", JSON.stringify(text));
