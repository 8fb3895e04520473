"""The Responses API through the official `openai` client.

Usage: responses.py BASE_URL MODEL [--thinking]   (exits non-zero on failure)

create and stream (the streamed text is the final response's), usage equal
to chat completions' for the same request, structured output and tool calls
in the Responses shape, the stateless refusals; with --thinking (a model
with think tokens) the reasoning item, whole and streamed.
"""
import json
import sys

import jsonschema
import openai
from openai import OpenAI


def main(base_url, model, thinking):
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    ask = dict(model=model, input="What is the capital of France?", instructions="Answer in one sentence.",
               max_output_tokens=48, temperature=0)
    if thinking:
        # Random weights think until stopped (the budget closes the thought)
        # and never end their answer: a grammar does (a stream that runs out
        # of tokens ends in `response.incomplete`, as OpenAI's, which the
        # client's `get_final_response` does not take).
        small = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
                 "required": ["n"], "additionalProperties": False}
        ask = dict(ask, reasoning={"strategy": "budget", "max_thinking_tokens": 8}, temperature=1.0, max_output_tokens=64,
                   text={"format": {"type": "json_schema", "name": "n", "schema": small}})

    whole = client.responses.create(**ask)
    assert whole.object == "response" and whole.status in ("completed", "incomplete"), whole
    assert whole.output_text, whole

    with client.responses.stream(**ask) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text, (deltas, final.output_text)
    if not thinking:
        assert final.output_text == whole.output_text, (final.output_text, whole.output_text)
        assert final.usage.output_tokens == whole.usage.output_tokens

        # The same request as a chat completion counts the same tokens.
        chat = client.chat.completions.create(model=model, messages=[
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France?"}], max_completion_tokens=48, temperature=0)
        assert (whole.usage.input_tokens, whole.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens), (whole.usage, chat.usage)
        assert whole.usage.total_tokens == chat.usage.total_tokens
        assert whole.output_text == chat.choices[0].message.content

        for effort in ["none", "minimal", "low", "medium", "high"]:
            r = client.responses.create(model=model, input="Say hi.", reasoning={"effort": effort}, max_output_tokens=8)
            assert r.reasoning.effort is not None, r

        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
                  "additionalProperties": False}
        r = client.responses.create(model=model, input="Name a city as JSON.", temperature=0, max_output_tokens=40,
                                    text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(r.output_text), schema)

        tools = [{"type": "function", "name": "get_weather", "description": "The weather of a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                                 "required": ["city"], "additionalProperties": False}}]
        r = client.responses.create(model=model, input="Weather in Paris?", tools=tools, tool_choice="required",
                                    temperature=0, max_output_tokens=60)
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and calls[0].name == "get_weather" and calls[0].call_id, r.output
        jsonschema.validate(json.loads(calls[0].arguments), tools[0]["parameters"])
        with client.responses.stream(model=model, input="Weather in Paris?", tools=tools, tool_choice="required",
                                     temperature=0, max_output_tokens=60) as stream:
            for _ in stream:
                pass
            streamed = [o for o in stream.get_final_response().output if o.type == "function_call"]
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls], (streamed, calls)

        # The call's result, sent back as input items, is answered.
        follow = client.responses.create(model=model, temperature=0, max_output_tokens=40, tools=tools, tool_choice="none", input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C and sunny"}])
        assert follow.output_text, follow

    else:
        items = [o.type for o in whole.output]
        assert items[0] == "reasoning" and "message" in items, items
        thought = whole.output[0].content[0].text
        assert thought and whole.output[0].summary == [], whole.output[0]
        assert whole.usage.output_tokens_details.reasoning_tokens > 0, whole.usage
        assert whole.status == "completed" and 0 <= json.loads(whole.output_text)["n"] <= 99, whole
        with client.responses.stream(**ask) as stream:
            thoughts = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
            final = stream.get_final_response()
        assert "".join(thoughts) == final.output[0].content[0].text, (thoughts, final.output[0])

    for bad, param in [({"previous_response_id": "resp_123"}, "previous_response_id"), ({"store": True}, "store"),
                       ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
                       ({"max_output_tokens": 0}, "max_output_tokens"), ({"extra_body": {"frobnicate": 1}}, "frobnicate")]:
        request = dict(model=model, input="hi")
        extra = bad.pop("extra_body", {})
        request.update(bad)
        try:
            client.responses.create(extra_body=extra or None, **request)
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body.get("param") == param, (param, e.body)
        else:
            raise AssertionError(f"{param} must be refused")
    print(f"ok: responses create, stream, usage, formats, tools, refusals (thinking={thinking})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--thinking" in sys.argv[3:])
