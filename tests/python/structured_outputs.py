"""Structured outputs and log-probabilities through the official `openai` client.

Usage: structured_outputs.py BASE_URL MODEL   (exits non-zero on failure)

Every `json_schema` reply must parse and validate against its schema
(`jsonschema`, not our code); `json_object` must give an object; the
client's own `parse` helper must fill a pydantic model; log-probabilities
must agree with the greedy choice, form a distribution, and be the same
streamed and whole.
"""
import json
import math
import sys

import jsonschema
import pydantic
from openai import OpenAI

PROMPTS = [
    "Describe a cat called Tom who is 3 years old.",
    "Tell me about Paris, the capital of France.",
    "Invent a character for a fantasy story.",
    "Summarise the water cycle.",
]

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    "choice": {
        "type": "object",
        "properties": {
            "kind": {"enum": ["animal", "place", "idea"]},
            "confidence": {"type": "number"},
            "ok": {"type": "boolean"},
        },
        "required": ["kind", "confidence", "ok"],
        "additionalProperties": False,
    },
}


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    # Bounded: a 135M model left free writes digits until max_tokens.
    population: int = pydantic.Field(ge=0, le=100_000_000)


def check_json_schema(client, model):
    for name, schema in SCHEMAS.items():
        for prompt in PROMPTS:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=200, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            )
            choice = reply.choices[0]
            assert choice.finish_reason == "stop", (name, prompt, choice)
            value = json.loads(choice.message.content)
            jsonschema.validate(value, schema)
    # Sampled, not only greedy.
    for seed in range(4):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[seed]}], max_tokens=200, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMAS["person"], "strict": True}},
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMAS["person"])


def check_json_object(client, model):
    for prompt in PROMPTS[:2]:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=120, temperature=0,
            response_format={"type": "json_object"},
        )
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(reply.choices[0].message.content), dict), reply


def check_parse_helper(client, model):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    reply = parse(
        model=model, messages=[{"role": "user", "content": "Give the largest city of Japan as JSON."}],
        response_format=City, max_tokens=120, temperature=0,
    )
    city = reply.choices[0].message.parsed
    assert isinstance(city, City), reply


def check_logprobs(client, model):
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=5,
    )
    content = whole.choices[0].logprobs.content
    assert content, whole
    assert "".join(t.token for t in content) == whole.choices[0].message.content, (content, whole.choices[0].message.content)
    for t in content:
        assert len(t.top_logprobs) == 5, t
        top = t.top_logprobs[0]
        # Greedy: the chosen token is the most likely one.
        assert top.token == t.token and math.isclose(top.logprob, t.logprob, abs_tol=1e-6), t
        assert all(a.logprob >= b.logprob for a, b in zip(t.top_logprobs, t.top_logprobs[1:])), t
        mass = sum(math.exp(a.logprob) for a in t.top_logprobs)
        assert t.logprob <= 1e-6 and mass <= 1.0 + 1e-4, (t, mass)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token, t

    streamed = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=5, stream=True,
    ):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    assert [t.token for t in streamed] == [t.token for t in content], (streamed, content)
    for s, w in zip(streamed, content):
        assert math.isclose(s.logprob, w.logprob, abs_tol=1e-5), (s, w)

    # Under a grammar that leaves one choice, that token has probability 1.
    forced = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0, logprobs=True, top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": {"const": {"sea": "blue"}}}},
    )
    assert json.loads(forced.choices[0].message.content) == {"sea": "blue"}, forced
    assert all(abs(t.logprob) < 1e-6 for t in forced.choices[0].logprobs.content), forced.choices[0].logprobs

    completion = client.completions.create(model=model, prompt="The sea is", max_tokens=8, temperature=0, logprobs=3)
    lp = completion.choices[0].logprobs
    assert "".join(lp.tokens) == completion.choices[0].text, (lp, completion.choices[0].text)
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    # Greedy: each token is its own most likely alternative, the same number.
    assert all(max(top.values()) == l for top, l in zip(lp.top_logprobs, lp.token_logprobs)), lp


def main(base_url, model):
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    check_json_schema(client, model)
    check_json_object(client, model)
    check_parse_helper(client, model)
    check_logprobs(client, model)
    print("ok: json_schema, json_object, parse helper, logprobs")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
