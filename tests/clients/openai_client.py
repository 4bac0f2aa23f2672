"""The `openai` Python package against `wick serve` (run by tests/server_clients.rs).

Usage: python3 openai_client.py BASE_URL MODEL. Exits non-zero on any failed check; a missing
package is a failure too (`.ci/run` installs it).
"""

import sys

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
msgs = [{"role": "user", "content": "Say hello."}]
no_think = {"chat_template_kwargs": {"enable_thinking": False}}

# Plain.
r = client.chat.completions.create(
    model=model, messages=msgs, max_tokens=8, extra_body=no_think
)
assert r.object == "chat.completion", r
assert r.model == model, r.model
c = r.choices[0]
assert c.index == 0 and c.message.role == "assistant", c
assert isinstance(c.message.content, str)
assert c.finish_reason in ("stop", "length"), c.finish_reason
assert 1 <= r.usage.completion_tokens <= 8, r.usage
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
assert r.usage.prompt_tokens_details.cached_tokens >= 0

# Streaming: a role delta first, then content, then a finish reason.
chunks = list(
    client.chat.completions.create(
        model=model, messages=msgs, max_tokens=6, stream=True, extra_body=no_think
    )
)
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
assert finish in (["stop"], ["length"]), finish
assert all(ch.usage is None for ch in chunks)

# Streaming with include_usage: the last chunk has usage and no choices.
chunks = list(
    client.chat.completions.create(
        model=model,
        messages=msgs,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, **no_think},
    )
)
last = chunks[-1]
assert last.choices == [] and last.usage.completion_tokens == 5, last
streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert streamed, chunks

# n=2: two choices, indexed.
r = client.chat.completions.create(
    model=model, messages=msgs, max_tokens=4, n=2, extra_body={"ignore_eos": True}
)
assert sorted(ch.index for ch in r.choices) == [0, 1], r.choices
assert r.usage.completion_tokens == 8, r.usage

# Seeds: the same seed at temperature > 0 repeats itself; another seed does not.
def sample(seed):
    r = client.chat.completions.create(
        model=model,
        messages=msgs,
        max_tokens=12,
        temperature=0.9,
        top_p=1.0,
        seed=seed,
        extra_body={"ignore_eos": True, "top_k": 0, **no_think},
    )
    return r.choices[0].message.content

a, b, other = sample(1234), sample(1234), sample(99)
assert a == b, (a, b)
assert a != other, (a, other)

# Logprobs.
r = client.chat.completions.create(
    model=model,
    messages=msgs,
    max_tokens=4,
    logprobs=True,
    top_logprobs=3,
    extra_body={"ignore_eos": True},
)
lp = r.choices[0].logprobs.content
assert len(lp) == 4, lp
for t in lp:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
    assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob

# Completions, plain and streaming.
r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5)
assert r.object == "text_completion" and isinstance(r.choices[0].text, str), r
text = "".join(
    ch.choices[0].text
    for ch in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=5, stream=True
    )
    if ch.choices
)
assert isinstance(text, str)

# Errors map to the client's exception classes.
try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    client.chat.completions.create(model=model, messages=msgs, temperature=9)
    raise AssertionError("temperature 9 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body

models = [m.id for m in client.models.list()]
assert models == [model], models
print("openai ok")
