"""langchain-openai's OpenAIEmbeddings (and the openai package under it) against
`wick serve --task embed` (run by tests/server_clients.rs).

Usage: python3 langchain_embeddings.py BASE_URL MODEL API_KEY ORACLE_JSON. Exits non-zero on
any failed check.

`check_embedding_ctx_length=False` as vLLM's documentation says: by default OpenAIEmbeddings
tokenizes with tiktoken (OpenAI's vocabulary, not Qwen's) and sends those token ids.
The openai package asks for base64 unless told otherwise, so both encodings are exercised.
"""

import base64
import json
import math
import struct
import sys

import openai
from langchain_openai import OpenAIEmbeddings

base, model, key, oracle_path = sys.argv[1:5]
with open(oracle_path, encoding="utf-8") as f:
    oracle = json.load(f)
texts = [case["input"] for case in oracle["single"]]
want = [case["embedding"] for case in oracle["single"]]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def check(what, got, want, min_cos):
    assert len(got) == len(want), (what, len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w), (what, i, len(g), len(w))
        c = cosine(g, w)
        assert c >= min_cos, f"{what}[{i}]: cosine {c}"
    print(f"{what}: {len(got)} vectors of {len(got[0])}, lowest cosine {min(cosine(g, w) for g, w in zip(got, want)):.6f}")


def truncated(v, d):
    n = math.sqrt(sum(x * x for x in v[:d]))
    return [x / n for x in v[:d]]


emb = OpenAIEmbeddings(
    model=model,
    base_url=base + "/v1",
    api_key=key,
    check_embedding_ctx_length=False,
)
# The server's KV cache is f16 (its default): a little looser than the float32 oracle test.
check("embed_documents", emb.embed_documents(texts), want, 0.999)
check("embed_query", [emb.embed_query(texts[1])], [want[1]], 0.999)

small = OpenAIEmbeddings(
    model=model,
    base_url=base + "/v1",
    api_key=key,
    check_embedding_ctx_length=False,
    dimensions=16,
)
check("dimensions=16", small.embed_documents(texts[:3]), [truncated(w, 16) for w in want[:3]], 0.999)

client = openai.OpenAI(base_url=base + "/v1", api_key=key)
for fmt in ("float", "base64"):
    r = client.embeddings.create(model=model, input=texts, encoding_format=fmt)
    assert r.object == "list" and r.model == model, r
    assert [d.index for d in r.data] == list(range(len(texts)))
    assert r.usage.prompt_tokens == sum(len(c["input_ids"]) for c in oracle["single"]), r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens
    # Asked for explicitly, base64 comes back as the string: little-endian f32 bytes.
    got = [
        list(struct.unpack(f"<{len(base64.b64decode(d.embedding)) // 4}f", base64.b64decode(d.embedding)))
        if fmt == "base64"
        else d.embedding
        for d in r.data
    ]
    check(f"openai {fmt}", got, want, 0.999)

# Token ids are valid input; ids outside the vocabulary (tiktoken's would be, for the
# largest of them) are a 400 naming the field.
r = client.embeddings.create(model=model, input=[case["input_ids"] for case in oracle["token_ids"]])
check("token ids", [d.embedding for d in r.data], [c["embedding"] for c in oracle["token_ids"]], 0.999)
try:
    client.embeddings.create(model=model, input=[[100, 200_000]])
    raise AssertionError("an id outside the vocabulary was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "input", e.body
    print("out-of-vocabulary id:", e.body["message"])

# A wrong key is refused.
try:
    OpenAIEmbeddings(model=model, base_url=base + "/v1", api_key="wrong",
                     check_embedding_ctx_length=False, max_retries=0).embed_query("x")
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print("ok")
