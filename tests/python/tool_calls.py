"""Tool calling through the official `openai` client.

Usage: tool_calls.py BASE_URL MODEL [--auto-calls]   (exits non-zero on failure)

Forced (`required`, a named function) calls must name a tool and carry
arguments that validate against its schema (`jsonschema`); streamed
fragments must reassemble to the same calls; a conversation holding a call
and its result must be answered. With --auto-calls, `auto` must find the
call the model writes for a question only a tool can answer.
"""
import json
import sys

import jsonschema
from openai import OpenAI

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                           "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def calls_of(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def check_calls(calls, allowed):
    assert calls, "no call"
    for name, arguments in calls:
        assert name in allowed, (name, allowed)
        jsonschema.validate(arguments, SCHEMAS[name])


def streamed_calls(client, **request):
    parts, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                part = parts.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                part["id"] = tc.id or part["id"]
                if tc.function and tc.function.name:
                    part["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    part["arguments"] += tc.function.arguments
    assert all(p["id"] for p in parts.values()), parts
    return [(p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())], finish


def main(base_url, model, auto_calls):
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    base = dict(model=model, messages=QUESTION, tools=TOOLS, max_tokens=120, temperature=0)

    required = client.chat.completions.create(tool_choice="required", **base)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not (choice.message.content or "").strip(), choice.message
    check_calls(calls_of(choice.message), {"get_weather", "add"})
    assert all(c.id and c.type == "function" for c in choice.message.tool_calls), choice.message

    named = client.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False, **base)
    calls = calls_of(named.choices[0].message)
    assert len(calls) == 1 and calls[0][0] == "add", calls
    check_calls(calls, {"add"})

    for tool_choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
        whole = client.chat.completions.create(tool_choice=tool_choice, **base)
        streamed, finish = streamed_calls(client, tool_choice=tool_choice, **base)
        assert streamed == calls_of(whole.choices[0].message), (streamed, whole.choices[0].message)
        assert finish == "tool_calls", finish

    # The call and its result in the history: the model answers.
    call = required.choices[0].message.tool_calls[0]
    history = QUESTION + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
    ]
    answer = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=40, temperature=0)
    assert answer.choices[0].message.content, answer
    assert not answer.choices[0].message.tool_calls, answer

    if auto_calls:
        auto = client.chat.completions.create(tool_choice="auto", **base)
        check_calls(calls_of(auto.choices[0].message), {"get_weather"})
        assert auto.choices[0].finish_reason == "tool_calls", auto.choices[0]
        streamed, finish = streamed_calls(client, tool_choice="auto", **base)
        assert streamed == calls_of(auto.choices[0].message) and finish == "tool_calls", (streamed, finish)

    print(f"ok: required, named, streamed, tool results, auto={auto_calls}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--auto-calls" in sys.argv[3:])
