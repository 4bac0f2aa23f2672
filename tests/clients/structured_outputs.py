"""Structured outputs against `wick serve` on a random-weight model (which never writes valid
JSON by itself), checked the way applications use them (run by tests/server_clients.rs):

- 24 JSON schemas through `response_format: json_schema`, each streamed and not, with thinking
  on and off: every reply parses and validates with the `jsonschema` package;
- forced tool calls (`tool_choice: required` and a named function): the arguments validate
  against the function's parameters;
- vLLM's `guided_choice`, `guided_regex`, `guided_json` (in `extra_body`), `json_object`;
- the OpenAI SDK's `client.beta.chat.completions.parse(response_format=PydanticModel)` and
  LangChain's `ChatOpenAI.with_structured_output(Schema, method="json_schema")`.

Usage: python3 structured_outputs.py BASE_URL MODEL. Exits non-zero on any failed check.
"""

import json
import re
import sys
from typing import List, Literal, Optional

import jsonschema
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key="none")
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]
MAX_TOKENS = 96

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5}}, "required": ["x"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}}, "required": ["ok", "none"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"k": {"const": "fixed"}}, "required": ["k"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4}}, "required": ["tags"]},
    {"type": "object", "properties": {"m": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "maxItems": 2}}, "required": ["m"]},
    {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]}}, "required": ["v"]},
    {"type": "object", "properties": {"opt": {"type": "string"}, "req": {"type": "integer"}}, "required": ["req"]},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 8}}, "required": ["s"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    {"type": "object", "properties": {"email": {"type": "string", "format": "email"}}, "required": ["email"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 5},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}}, "required": ["when"]},
    {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2}},
        "required": ["items"],
        "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"], "additionalProperties": False}},
    },
    {"type": "object", "properties": {"n": {"type": ["integer", "null"]}}, "required": ["n"]},
    {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number"}}, "required": ["kind", "side"], "additionalProperties": False},
    ]}}, "required": ["shape"]},
    {"type": "object", "properties": {"grade": {"type": "integer", "enum": [1, 2, 3]}, "note": {"type": "string", "enum": ["a", "b"]}}, "required": ["grade", "note"]},
    {"type": "object", "properties": {"deep": {"type": "object", "properties": {"deeper": {"type": "object", "properties": {"deepest": {"type": "boolean"}}, "required": ["deepest"]}}, "required": ["deeper"]}}, "required": ["deep"]},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
]
assert len(SCHEMAS) >= 20


def chat(stream, thinking, extra_body=None, **extra):
    """The reply's content (and the finish reason), streamed or not."""
    body = dict(
        model=model,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}, **(extra_body or {})},
        **extra,
    )
    if not stream:
        r = client.chat.completions.create(**body)
        return r.choices[0].message.content, r.choices[0].finish_reason
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **body):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return content, finish


checked = 0
for i, schema in enumerate(SCHEMAS):
    for stream in (False, True):
        for thinking in (False, True):
            rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": i % 2 == 0}}
            content, finish = chat(stream, thinking, response_format=rf, seed=i)
            try:
                value = json.loads(content)
                jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
            except Exception as e:  # noqa: BLE001 - report every kind of failure the same way
                sys.exit(f"schema {i} (stream={stream}, thinking={thinking}): {e}\n{content!r}")
            assert finish == "stop", (i, finish)
            checked += 1
print(f"{checked} json_schema replies validate")

# vLLM's guided decoding fields, and json_object.
content, _ = chat(False, False, extra_body={"guided_choice": ["alpha", "beta"]})
assert content in ("alpha", "beta"), content
content, _ = chat(False, False, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})
assert re.fullmatch("[0-9]{3}-[a-z]{2}", content), content
content, _ = chat(True, True, extra_body={"guided_json": SCHEMAS[8]})
jsonschema.validate(json.loads(content), SCHEMAS[8])
content, _ = chat(False, False, response_format={"type": "json_object"})
assert isinstance(json.loads(content), dict), content
print("guided_choice, guided_regex, guided_json and json_object hold")

# Forced tool calls: the arguments validate against the function's parameters.
weather = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
search = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"], "additionalProperties": False}
tools = [
    {"type": "function", "function": {"name": "get_weather", "parameters": weather}},
    {"type": "function", "function": {"name": "search", "parameters": search}},
]
by_name = {"get_weather": weather, "search": search}
for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "search"}}):
    for stream in (False, True):
        for seed in range(3):
            body = dict(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, tools=tools, tool_choice=choice, seed=seed)
            if stream:
                calls = {}
                for chunk in client.chat.completions.create(stream=True, **body):
                    for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                        c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                        c["name"] += tc.function.name or ""
                        c["arguments"] += tc.function.arguments or ""
                calls = list(calls.values())
            else:
                r = client.chat.completions.create(**body)
                assert r.choices[0].finish_reason == "tool_calls", r
                calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in r.choices[0].message.tool_calls]
            assert len(calls) == 1, calls
            name = calls[0]["name"]
            if isinstance(choice, dict):
                assert name == choice["function"]["name"], (name, choice)
            jsonschema.validate(json.loads(calls[0]["arguments"]), by_name[name])
print("forced tool calls validate")


# The OpenAI SDK's parse() with a Pydantic model.
class Step(BaseModel):
    explanation: str = Field(max_length=40)
    output: int


class Solution(BaseModel):
    steps: List[Step] = Field(max_length=3)
    final_answer: Literal["even", "odd"]
    confidence: Optional[float] = None


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
# With thinking on, the random model reasons until the budget left is what the answer needs:
# the answer must still be complete (parse() raises on `finish_reason: length`).
for thinking in (False, True):
    r = parse(
        model=model,
        messages=[{"role": "user", "content": "Is 7 odd? Show your steps."}],
        response_format=Solution,
        max_tokens=160,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
    )
    sol = r.choices[0].message.parsed
    assert isinstance(sol, Solution), r
print("OpenAI SDK parse() returns the Pydantic model")


# LangChain's with_structured_output.
class Movie(BaseModel):
    """A movie."""

    title: str = Field(max_length=30)
    year: int = Field(ge=1900, le=2030)
    genres: List[Literal["drama", "comedy", "action"]] = Field(max_length=3)


llm = ChatOpenAI(base_url=base + "/v1", api_key="none", model=model, max_tokens=120, temperature=0.7)
structured = llm.with_structured_output(Movie, method="json_schema")
movie = structured.invoke("Name a movie.")
assert isinstance(movie, Movie), movie
as_dict = llm.with_structured_output(Movie.model_json_schema(), method="json_schema").invoke("Name a movie.")
jsonschema.validate(as_dict, Movie.model_json_schema())
print("LangChain with_structured_output returns the schema's type")
