"""langchain-openai's ChatOpenAI against `wick serve`, configured the way users copy it
(run by tests/server_clients.rs).

Usage: python3 langchain_client.py BASE_URL MODEL. Exits non-zero on any failed check.
"""

import json
import sys
import urllib.request

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

base, model = sys.argv[1], sys.argv[2]
messages = [SystemMessage("You are terse."), HumanMessage("What is 2 + 2?")]


def prompt_tokens(enable_thinking):
    """The prompt's length as the server tokenizes it, with thinking on or off."""
    body = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        "chat_template_kwargs": {"enable_thinking": enable_thinking},
    }
    req = urllib.request.Request(
        base + "/tokenize",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    return json.load(urllib.request.urlopen(req))["count"]


thinking_off = prompt_tokens(False)
assert thinking_off != prompt_tokens(True)

for streaming in (False, True):
    llm = ChatOpenAI(
        model=model,
        base_url=base + "/v1",
        api_key="EMPTY",
        max_tokens=8,
        streaming=streaming,
        extra_body={"enable_thinking": False},
        stream_usage=True,
    )
    reply = llm.invoke(messages)
    assert isinstance(reply.content, str), reply
    # The thinking switch in extra_body reached the chat template.
    assert reply.usage_metadata["input_tokens"] == thinking_off, (reply.usage_metadata, thinking_off)
    assert 1 <= reply.usage_metadata["output_tokens"] <= 8, reply.usage_metadata

    pieces = list(llm.stream(messages))
    assert pieces, "no chunks"
    total = pieces[0]
    for p in pieces[1:]:
        total = total + p
    assert isinstance(total.content, str)
    print(f"langchain streaming={streaming} ok: {reply.content!r}")
