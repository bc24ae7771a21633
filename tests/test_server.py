"""The OpenAI-compatible server: responses equal the engine's own output (greedy, batched, streamed), and bad requests
get a 4xx with OpenAI's error shape naming the field, never a traceback."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from specmtp import Engine, SamplingParams, load_model
from specmtp.drafters import DraftModelDrafter
from specmtp.engine import held_back
from specmtp.server import make_server, parse_request

PROMPT = "hello world, hello world, hello"
CHAT = [{"role": "user", "content": "abcabc abcabc"}]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    target = load_model(str(tiny_dir("llama", num_hidden_layers=2)))
    other = load_model(str(tiny_dir("llama", seed=7, num_hidden_layers=1)))
    return Engine(target, DraftModelDrafter(other.model, other.tokenizer.vocab, "other"), num_draft_tokens=3)


@pytest.fixture(scope="module")
def url(engine):
    server = make_server(engine, "tiny", port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(url: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict | str]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    return status, json.loads(text) if not text.startswith("data:") else text


def events(text: str) -> list:
    lines = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_models(url):
    status, body = call(url, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]


def test_completion_is_the_engines_greedy_output(url, engine):
    status, body = call(url, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 20,
                                                 "temperature": 0})
    ref = engine.generate([PROMPT], max_new_tokens=20)[0]
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == ref.text
    assert body["choices"][0]["finish_reason"] == {"eos": "stop", "length": "length"}[ref.finish_reason]
    assert body["usage"]["completion_tokens"] == len(ref.tokens)
    assert body["usage"]["prompt_tokens"] == ref.prompt_tokens
    assert body["usage"]["specmtp"]["drafted"] > 0


def test_a_list_of_prompts_and_n_decode_as_one_batch(url, engine):
    prompts = [PROMPT, "the cat sat on the mat"]
    status, body = call(url, "/v1/completions", {"prompt": prompts, "max_tokens": 12, "temperature": 0, "n": 2})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    singles = [engine.generate([p], max_new_tokens=12)[0].text for p in prompts]
    assert texts == [singles[0], singles[0], singles[1], singles[1]]


def test_sampled_completion_is_seeded(url, engine):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    a, b = call(url, "/v1/completions", body)[1], call(url, "/v1/completions", body)[1]
    ref = engine.generate([PROMPT], 12, SamplingParams(temperature=0.8, top_p=0.9, seed=3))[0]
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == ref.text


def test_chat_completion_and_its_stream_agree(url, engine):
    status, body = call(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 16, "temperature": 0})
    ref = engine.generate([CHAT], max_new_tokens=16, chat=True)[0]
    assert status == 200 and body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    status, text = call(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 16, "temperature": 0,
                                                      "stream": True, "stream_options": {"include_usage": True}})
    chunks = events(text)
    assert status == 200 and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == ref.text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == body["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(ref.tokens)


def test_streamed_completion_stops_where_the_whole_one_does(url, engine):
    full = engine.generate([PROMPT], max_new_tokens=24)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a stop string inside the greedy continuation
    assert stop
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": stop}
    whole = call(url, "/v1/completions", body)[1]["choices"][0]
    text = "".join(c["choices"][0]["text"] for c in events(call(url, "/v1/completions", {**body, "stream": True})[1]))
    assert whole["finish_reason"] == "stop" and stop not in whole["text"]
    assert text == whole["text"] == full[: full.index(stop)]


def test_concurrent_requests_queue_and_each_gets_its_own_answer(url, engine):
    prompts = [PROMPT, "the cat sat on the mat", "abcabcabc"]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": 10, "temperature": 0, "stream": i == 1}
        status, reply = call(url, "/v1/completions", body)
        got[i] = "".join(c["choices"][0]["text"] for c in events(reply)) if i == 1 else reply["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == [engine.generate([p], max_new_tokens=10)[0].text for p in prompts]


def test_held_back_is_the_longest_stop_prefix_at_the_end():
    assert held_back("abc hel", ("hello",)) == 3
    assert held_back("abc h", ("hello", "xy")) == 1
    assert held_back("abc", ("hello",)) == 0
    assert held_back("ab", ("bcd", "abx")) == 2
    assert held_back("anything", ()) == 0


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "n": 2, "stream": True}, 400, "stream"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", ["not", "an", "object"], 400, None),
])
def test_bad_requests_get_a_clear_error(url, path, body, status, param):
    got, reply = call(url, path, body)
    assert got == status and reply["error"]["param"] == param and reply["error"]["message"]


def test_bad_bodies_paths_and_prompts(url, engine):
    status, reply = call(url, "/v1/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = call(url, "/v1/embeddings", {"input": "x"})
    assert status == 404 and "no such endpoint" in reply["error"]["message"]
    context = engine.target.config.max_position_embeddings
    for stream in (False, True):  # a prompt past the context: the engine's error, before any stream starts
        status, reply = call(url, "/v1/completions", {"prompt": "ab" * context, "stream": stream})
        assert status == 400 and "longer than the model's context" in reply["error"]["message"]
    # the server still answers after all that
    assert call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200


def test_parse_request_defaults():
    req = parse_request(True, {"messages": CHAT}, "tiny", 512)
    assert req.chat and req.max_tokens == 512 and req.sampling.temperature == 1.0 and req.n == 1 and not req.stream
    req = parse_request(False, {"prompt": "x", "max_completion_tokens": 5}, "tiny", 512)
    assert req.max_tokens == 16  # completions read max_tokens only


def test_serve_on_a_taken_port_is_a_clean_error(tiny_dir, url):
    import subprocess
    import sys

    port = url.rsplit(":", 1)[1]  # the fixture's server holds it
    proc = subprocess.run([sys.executable, "-m", "specmtp", "serve", "--model", str(tiny_dir("llama")), "--drafter",
                           "none", "--port", port], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_chat_without_a_chat_template_is_a_400(url, engine, monkeypatch):
    monkeypatch.setattr(engine.target.tokenizer.hf, "chat_template", None)
    for stream in (False, True):
        status, reply = call(url, "/v1/chat/completions", {"messages": CHAT, "stream": stream})
        assert status == 400 and "no chat template" in reply["error"]["message"]
