"""LangChain's ChatOpenAI, without extra_body, against a server started with
`--default-chat-template-kwargs '{"enable_thinking": false}'` (run by tests/server_clients.rs).

Usage: python3 langchain_thinking_default.py BASE_URL MODEL. Checks that the server's default
switches thinking off (the prompt ends with the empty think block, the reply carries no
reasoning) and that a request can still switch it back on.
"""

import json
import sys
import urllib.request

from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

base, model = sys.argv[1], sys.argv[2]
question = "What is 2 + 2?"


def post(path, body):
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    return json.load(urllib.request.urlopen(req))


def prompt(kwargs):
    """The prompt as the server renders it, with these template variables (or none)."""
    body = {"messages": [{"role": "user", "content": question}]}
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    ids = post("/tokenize", body)["tokens"]
    return ids, post("/detokenize", {"tokens": ids})["prompt"]


default_ids, default_text = prompt(None)
off_ids, _ = prompt({"enable_thinking": False})
on_ids, on_text = prompt({"enable_thinking": True})
assert default_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), default_text
assert default_ids == off_ids, "the server default is not thinking off"
assert on_ids != off_ids and not on_text.endswith("</think>\n\n"), on_text

# The client as users copy it: no extra_body.
llm = ChatOpenAI(model=model, base_url=base + "/v1", api_key="EMPTY", max_tokens=8)
reply = llm.invoke([HumanMessage(question)])
assert reply.usage_metadata["input_tokens"] == len(off_ids), reply.usage_metadata
for streaming in (False, True):
    pieces = list(
        ChatOpenAI(
            model=model, base_url=base + "/v1", api_key="EMPTY", max_tokens=8, streaming=streaming
        ).stream([HumanMessage(question)])
    )
    assert pieces, "no chunks"

# The raw reply has no reasoning at all.
raw = post(
    "/v1/chat/completions",
    {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 8},
)
msg = raw["choices"][0]["message"]
assert "reasoning" not in msg and "reasoning_content" not in msg, msg
assert raw["usage"]["prompt_tokens"] == len(off_ids), raw["usage"]

# A request can switch thinking back on.
thinking = ChatOpenAI(
    model=model,
    base_url=base + "/v1",
    api_key="EMPTY",
    max_tokens=8,
    extra_body={"chat_template_kwargs": {"enable_thinking": True}},
)
reply = thinking.invoke([HumanMessage(question)])
assert reply.usage_metadata["input_tokens"] == len(on_ids), reply.usage_metadata
print("langchain with thinking off by default: ok")
