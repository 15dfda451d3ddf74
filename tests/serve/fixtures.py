"""Model and adapter folders for the serving tests and benchmark: a tiny random Llama with a word-level
tokenizer (with an end-of-text token), a tiny random BERT classifier, and LoRA adapters saved beside them."""

from __future__ import annotations

from pathlib import Path

import torch

import adapterkit as ak

ADAPTERS = 8  # LoRA adapters of the tiny Llama in the HTTP tests

WORDS = ("the a cat dog sat on mat ran fast slow big small red blue green one two three four five six seven "
         "eight nine ten and or but not is was very good bad happy sad film book song play run walk talk sing "
         "read write open close up down left right yes no hello world").split()


def word_tokenizer(with_cls: bool = False):
    """A fast word-level tokenizer built offline: <pad>=0, <eos>=1, <unk>=2 (and [CLS]=3 for classifiers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "[CLS]"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if with_cls:
        backend.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", cls_token="[CLS]")


def causal_dir(root: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama (vocab of WORDS) saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def classifier_dir(root: Path, seed: int = 0) -> Path:
    """A random BERT classifier (3 labels) saved with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(with_cls=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _randomize(model: torch.nn.Module, name: str, scale: float, seed: int) -> None:
    from adapterkit.inject.engine import placements

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, host in placements(model, name):
            for param in host.adapter(name).parameters():
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def causal_adapters(model_dir: Path, out: Path, count: int, scale: float = 0.3) -> list[str]:
    """``count`` LoRA adapters (mixed ranks and targets) for the model at ``model_dir``, saved under ``out``."""
    from transformers import AutoModelForCausalLM

    names = []
    for i in range(count):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        name = f"ad{i}"
        targets = ["q_proj", "v_proj"] if i % 2 == 0 else ["q_proj", "o_proj", "down_proj"]
        ak.attach(model, name, ak.LoRA(r=2 + 2 * (i % 3), alpha=8), targets)
        _randomize(model, name, scale, seed=100 + i)
        ak.save(model, out / name, name)
        names.append(name)
    return names


def classifier_adapters(model_dir: Path, out: Path, widths: list[int], scale: float = 0.3) -> list[str]:
    """One LoRA adapter per entry of ``widths``, each with its own head of that many labels, as a run folder
    (run.json with label names + adapter/) like `adapterkit train` writes."""
    import json

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # each adapter gets a fresh head of its own width: the notice is expected
    names = []
    for i, width in enumerate(widths):
        torch.manual_seed(200 + i)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=width,
                                                                   ignore_mismatched_sizes=True).eval()
        name = f"cls{i}"
        ak.attach(model, name, ak.LoRA(r=2 + i % 3), ["query", "value"])
        _randomize(model, name, scale, seed=300 + i)
        with torch.no_grad():
            model.classifier.weight.normal_(0, 1.0)  # a head with opinions: probabilities far from uniform
        ak.save(model, out / name / "adapter", name, modules=("classifier",))
        labels = [f"{name}_label{k}" for k in range(width)]
        (out / name / "run.json").write_text(json.dumps({"labels": labels}))
        names.append(name)
    return names
