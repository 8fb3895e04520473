"""The official `openai` Python package against a running terse server.

Usage: openai_client.py BASE_URL MODEL   (BASE_URL ends in /v1; exits non-zero on failure)
"""
import sys

import openai
from openai import OpenAI


def main(base_url: str, model: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    text = chat.choices[0].message.content
    assert isinstance(text, str) and text, chat
    assert chat.object == "chat.completion"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    streamed, usage = [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                streamed.append(choice.delta.content)
    assert "".join(streamed) == text, ("".join(streamed), text)
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

    completion = client.completions.create(model=model, prompt="The sun is", max_tokens=8, temperature=0)
    assert completion.object == "text_completion"
    assert isinstance(completion.choices[0].text, str) and completion.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=model, prompt="The sun is", max_tokens=8, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == completion.choices[0].text, (streamed, completion.choices[0].text)

    models = client.models.list()
    assert [m.id for m in models.data] == [model]

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert e.code == "model_not_found", e.body
    else:
        raise AssertionError("an unknown model must raise NotFoundError")

    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=4)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.param == "messages", e.body
    else:
        raise AssertionError("empty messages must raise BadRequestError")

    print("ok: chat, chat stream, completions, completions stream, models, errors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
