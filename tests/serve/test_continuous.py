"""The continuous decoder (serve/decode.py) against transformers' own ``generate``, row by row, and the text rules
of serve/sequence.py: rows that join a running batch at different steps and leave it when done get, token for
token, what each gets generated alone; stop strings cut across tokens; a multi-byte character is never split."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.serve.decode import Decoder, Running
from adapterkit.serve.rows import Row, Sampling
from adapterkit.serve.sequence import Sequence
from adapterkit.serve.store import AdapterStore
from tests.serve.fixtures import causal_adapters, causal_dir, word_tokenizer

NAMES = ["ad2", None, "ad0", "ad3", "ad1", "ad2", None]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Decoder:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("continuous")
    causal_dir(root / "model")
    causal_adapters(root / "model", root / "adapters", 4)
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    store = AdapterStore(model, root / "adapters", max_resident=4)
    store.load_all()
    return Decoder(model, word_tokenizer(), store)


def _alone(decoder: Decoder, row: Row) -> list[int]:
    """transformers' greedy generate of one row through its adapter alone (no Select, no padding)."""
    model = decoder.model
    with decoder.store.lock:
        decoder.store.ensure_resident([row.adapter] if row.adapter else [])
    with torch.no_grad(), decoder.store.lock, ak.use(model, *([row.adapter] if row.adapter else [])):
        out = model.generate(input_ids=torch.tensor([row.ids]), max_new_tokens=row.max_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=1)
    new = out[0, len(row.ids):].tolist()
    return new[:new.index(1)] if 1 in new else new


def test_rows_joining_and_leaving_at_every_step_equal_each_alone(decoder) -> None:
    rows = [Row(n, tuple(range(4 + 3 * b, 6 + 5 * b)), 2 + (5 * b) % 11) for b, n in enumerate(NAMES)]
    seqs, batch = decoder.start(rows), Running()
    joins = {0: seqs[:2], 1: seqs[2:3], 3: seqs[3:6], 6: seqs[6:]}  # step -> rows that join before it
    widths, step = [], 0
    while step <= max(joins) or batch.seqs:
        decoder.step(batch, joins.get(step, []))
        widths.append(len(batch))
        if batch.seqs:  # the cache holds exactly the running rows, at the mask's width
            assert batch.mask.shape[0] == len(batch) and batch.mask[:, 0].any()
            assert all(layer.keys.shape[0] == len(batch) and layer.keys.shape[2] == batch.mask.shape[1]
                       for layer in batch.cache.layers)
        step += 1
    assert max(widths) >= 4 and min(widths[:-1]) < max(widths)  # rows really shared steps and really left early
    for seq in seqs:
        assert seq.finish in ("stop", "length") and seq.tokens == _alone(decoder, seq.row), seq.row


def test_a_row_finished_by_its_first_token_leaves_before_decoding(decoder) -> None:
    seqs = decoder.run_to_end([Row("ad1", (5, 6, 7), 1), Row(None, (8, 9), 4)])
    assert [len(s.tokens) for s in seqs] == [1, len(_alone(decoder, Row(None, (8, 9), 4)))]
    assert seqs[0].finish == "length"


def test_an_unloaded_adapter_fails_only_its_rows(decoder) -> None:
    store = decoder.store
    seqs, batch = decoder.start([Row("ad3", (5, 6, 7), 8), Row("ad0", (9, 10), 8)]), Running()
    decoder.step(batch, seqs)
    entry = store.entries["ad3"]
    store.remove("ad3")
    try:
        while batch.seqs:
            decoder.step(batch, [])
    finally:
        store.insert(entry)
    assert isinstance(seqs[0].error, ak.AdapterKitError) and "unloaded" in str(seqs[0].error)
    assert seqs[1].error is None and seqs[1].tokens == _alone(decoder, Row("ad0", (9, 10), 8))


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(decoder) -> None:
    sampled = Row("ad2", (5, 6, 7, 8), 10, Sampling(temperature=1.0, seed=11))
    alone = decoder.run_to_end([sampled])[0].tokens
    crowd = [Row(n, (9, 10, 11)[: 1 + b % 3], 3 + b, Sampling(temperature=0.7, seed=b)) for b, n in enumerate(NAMES)]
    mixed = decoder.run_to_end([*crowd[:3], sampled, *crowd[3:]])[3].tokens
    assert mixed == alone
    assert decoder.run_to_end([Row("ad2", (5, 6, 7, 8), 10, Sampling(temperature=1.0, seed=12))])[0].tokens != alone
    nucleus = Row("ad2", (5, 6, 7, 8), 10, Sampling(temperature=1.0, top_p=1e-6))  # only the top token is left
    assert decoder.run_to_end([nucleus])[0].tokens == _alone(decoder, Row("ad2", (5, 6, 7, 8), 10))


def _fed(tokenizer, ids: list[int], stop: tuple[str, ...] = (), max_tokens: int = 100) -> tuple[Sequence, list[str]]:
    seq = Sequence(Row(None, (1,), max_tokens, Sampling(stop=stop)), tokenizer)
    pieces = []
    for token in ids:
        seq.add(token)
        pieces.append(seq.take())
        if seq.finish:
            break
    return seq, pieces


def test_stop_strings_cut_the_text_wherever_tokens_split_them() -> None:
    tokenizer = word_tokenizer()
    ids = tokenizer("the cat sat on the mat")["input_ids"]
    seq, pieces = _fed(tokenizer, ids, stop=("t on",))  # spans "sat" and "on"
    assert (seq.text, seq.finish, "".join(pieces)) == ("the cat sa", "stop", "the cat sa")
    assert len(seq.tokens) == 4  # "on" completed the stop string; it was generated, then cut
    assert pieces == ["the", " ca", "t sa", ""]  # a "t" might start the stop string: held back until settled
    seq, pieces = _fed(tokenizer, ids, stop=("zzz", "mat", "cat s"))  # the earliest of several
    assert seq.text == "the " and "".join(pieces) == "the "
    seq, pieces = _fed(tokenizer, ids, stop=("t ox",), max_tokens=3)  # a prefix that never completes is sent
    assert (seq.text, seq.finish, "".join(pieces)) == ("the cat sat", "length", "the cat sat")


def test_multibyte_characters_are_streamed_whole(smollm2_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    text = "héllo 🙂 世界 naïve ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces_alone = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces_alone)  # the case at hand: single tokens hold parts of characters
    seq, pieces = _fed(tokenizer, ids)
    assert "".join(pieces) == seq.text == text and not any("\ufffd" in p for p in pieces)


def test_end_of_text_ends_the_row_without_being_text() -> None:
    seq = Sequence(Row(None, (1,), 10), word_tokenizer(), frozenset({1}))
    for token in (5, 6, 1):
        seq.add(token)
    assert (seq.finish, seq.tokens, seq.take()) == ("stop", [5, 6], seq.text)


def test_a_sliding_window_cache_is_refused_with_a_pointer_to_request_batching() -> None:
    from adapterkit.serve.decode import CacheLayoutError, _layers

    class Odd:
        layers = [object()]

    with pytest.raises(CacheLayoutError, match="--batching request"):
        _layers(Odd())

