"""The server on the real SmolLM2-135M-Instruct with two random LoRA adapters: four concurrent chat requests
(mixed adapters and lengths, continuous batching, the official ``openai`` client) each equal transformers'
greedy ``generate`` of that conversation alone, token for token."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import adapterkit as ak  # noqa: E402
from tests.conftest import make_smollm2, randomize  # noqa: E402
from tests.serve.client import LIMIT, server  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Write a haiku about the sea.", "Say hello."]
ASKS = [("lora0", 12), ("base", 8), ("lora1", 16), ("lora0", 10)]


@pytest.fixture(scope="module")
def adapters(smollm2_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2_adapters")
    model, _ = make_smollm2()
    for i in range(2):
        ak.attach(model, f"lora{i}", ak.LoRA(r=8, alpha=16), ["q_proj", "v_proj", "down_proj"])
        randomize(model, f"lora{i}", scale=0.05, seed=10 + i)
        ak.save(model, root / f"lora{i}", f"lora{i}")
    return root


def test_concurrent_chats_on_smollm2_equal_each_alone(smollm2_path, adapters) -> None:
    answers: dict[int, list[int]] = {}
    with server(smollm2_path, adapters, max_batch=8, max_wait_ms=5, max_tokens=32) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", timeout=LIMIT * 4, max_retries=0)
        tokenizer = running.server.config.app.state.runner.tokenizer

        def ask(i: int) -> None:
            model, n = ASKS[i]
            reply = client.chat.completions.create(model=model, max_tokens=n, messages=[
                {"role": "user", "content": QUESTIONS[i]}])
            answers[i] = reply.choices[0].message.content, reply.usage.completion_tokens
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ASKS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    model, _ = make_smollm2()
    for i in range(2):
        ak.load(model, adapters / f"lora{i}")
    texts = set()
    for i, (name, n) in enumerate(ASKS):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i]}], add_generation_prompt=True,
                                            return_tensors="pt")
        with torch.no_grad(), ak.use(model, *([name] if name != "base" else [])):
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=2, eos_token_id=2)
        new = out[0, ids.shape[1]:].tolist()
        new = new[:new.index(2)] if 2 in new else new
        assert answers[i] == (tokenizer.decode(new, skip_special_tokens=True), len(new)), (name, QUESTIONS[i])
        texts.add(answers[i][0])
    assert len(texts) == len(ASKS)
