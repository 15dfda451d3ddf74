"""Two tiny random causal LMs with different word-level vocabularies and a chat template, saved as model folders:
a Llama source and a GPT-2 target for the Trans-LoRA tests (the target's vocabulary is ordered differently, is
larger, and holds words the source cannot read)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a film movie story plot actor scene good bad great awful fun dull sad happy very not and but is was "
         "it this that i loved hated liked real synthetic here are some examples write one more of texts reviews "
         "funny boring long short warm cold bright dark one two three").split()
TARGET_ONLY = "cinema ending music song dialogue camera".split()
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
SPECIALS = ["<pad>", "<eos>", "<unk>", "user", "assistant", ":"]


def word_tokenizer(words: list[str]):
    """A fast word-level tokenizer over ``words`` with the chat template above: <pad>=0, <eos>=1, <unk>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def source_dir(root: Path, seed: int = 0) -> Path:
    """A random Llama over WORDS, saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(WORDS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(config).eval().save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def target_dir(root: Path, seed: int = 1) -> Path:
    """A random GPT-2 over the words reversed plus TARGET_ONLY (another vocabulary), saved with its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = word_tokenizer([*TARGET_ONLY, *reversed(WORDS)])
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        pad_token_id=0,
                        eos_token_id=1, bos_token_id=1)
    GPT2LMHeadModel(config).eval().save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
