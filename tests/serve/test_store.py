"""The adapter store: host memory plus an LRU resident set, run-time load/unload, and constant-time adds."""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.serve.runners import ClassifyRunner, CompletionRunner, Row
from adapterkit.serve.store import AdapterStore, BadNameError, UnknownAdapterError
from tests.serve.fixtures import causal_adapters, causal_dir, classifier_adapters, classifier_dir


@pytest.fixture(scope="module")
def causal(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("causal")
    causal_dir(root / "model")
    causal_adapters(root / "model", root / "adapters", 4)
    return root / "model", root / "adapters"


def _model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_lru_keeps_at_most_max_resident_and_evicts_the_oldest(causal) -> None:
    model_dir, adapters = causal
    model = _model(model_dir)
    store = AdapterStore(model, adapters, max_resident=2)
    assert store.load_all() == ["ad0", "ad1", "ad2", "ad3"]
    assert list(store.resident) == ["ad2", "ad3"] and ak.adapters(model) == ["ad2", "ad3"]
    store.ensure_resident(["ad0"])  # ad2 is the least recently used
    assert list(store.resident) == ["ad3", "ad0"]
    store.ensure_resident(["ad3"])  # a touch moves it to the young end
    store.ensure_resident(["ad1"])
    assert list(store.resident) == ["ad3", "ad1"]
    with pytest.raises(ak.AdapterKitError, match="at most 2"):
        store.ensure_resident(["ad0", "ad1", "ad2"])
    store.remove("ad1")
    assert "ad1" not in store.entries and ak.adapters(model) == ["ad3"]
    assert (adapters / "ad1" / "adapter.json").is_file()  # unloading never touches the files
    with pytest.raises(UnknownAdapterError, match="'ad1' is not loaded"):
        store.get("ad1")
    store.remove("ad3")
    store.remove("ad0")
    store.remove("ad2")
    assert ak.adapters(model) == [] and not [m for m in model.modules() if type(m).__name__ == "Host"]


@torch.no_grad()
def test_evicted_adapter_comes_back_bit_identical(causal) -> None:
    """Rows through an adapter that was evicted and re-attached from host memory equal a plain ak.load."""
    model_dir, adapters = causal
    model = _model(model_dir)
    store = AdapterStore(model, adapters, max_resident=1)
    store.load_all()  # ad0..ad2 were attached once and evicted: they come back from host memory
    runner = CompletionRunner(model, _tokenizer(model_dir), store)
    ids = tuple(range(4, 12))
    got = [runner([Row(name, ids, 6)])[0]["token_ids"] for name in ("ad0", "ad3", "ad1")]
    for name, tokens in zip(("ad0", "ad3", "ad1"), got):
        plain = _model(model_dir)
        ak.load(plain, adapters / name)
        with ak.use(plain, name):
            out = plain.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        reference = out[0, len(ids):].tolist()
        assert tokens == reference[:reference.index(1)] if 1 in reference else tokens == reference
    assert store.stats["attached"] == 4 + 3  # every switch re-attached from memory (one resident slot)


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_names_are_validated_and_bad_folders_change_nothing(causal, tmp_path) -> None:
    model_dir, adapters = causal
    store = AdapterStore(_model(model_dir), adapters, max_resident=2)
    for bad in ("../ad0", "ad0/..", "/etc/passwd", "..", "a.b", "", "x" * 65, "1abc", "a b", "a\\b"):
        with pytest.raises(BadNameError, match="invalid"):
            store.add(bad)
    with pytest.raises(BadNameError, match="reserved"):
        store.add("base")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ak.StateError, match="not an adapter folder"):
        store.add("junk", tmp_path / "junk")
    shutil.copytree(adapters / "ad0", tmp_path / "broken")
    weights = next((tmp_path / "broken").glob("adapter-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(ak.StateError, match="truncated or corrupted"):
        store.add("broken", tmp_path / "broken")
    assert store.entries == {} and store.resident == {}


def test_another_base_model_is_refused(causal, tmp_path) -> None:
    model_dir, adapters = causal
    causal_dir(tmp_path / "other", seed=7)  # same shapes, other weights
    store = AdapterStore(_model(tmp_path / "other"), adapters)
    with pytest.raises(ak.StateError, match="weights differ from the base model"):
        store.add("ad0")
    assert store.entries == {}


class _Calls:
    """Counts every Python and C function call made while active (a structural measure of work)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __enter__(self) -> _Calls:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)

    def _profile(self, frame, event, arg) -> None:
        if event == "call":
            self.counts[f"{frame.f_code.co_filename}:{frame.f_code.co_name}"] += 1
        elif event == "c_call":
            self.counts[getattr(arg, "__qualname__", str(arg))] += 1


def test_adding_the_nth_adapter_does_the_same_work_whatever_n(causal, tmp_path) -> None:
    """Adding adapter 5 and adapter 41 (and bringing an evicted one back) makes exactly the same function calls:
    nothing walks or re-stacks the adapters already held."""
    model_dir, adapters = causal
    for i in range(42):
        shutil.copytree(adapters / "ad0", tmp_path / f"n{i}")  # identical folders: identical work per add
    store = AdapterStore(_model(model_dir), tmp_path, max_resident=3)
    work = {}
    for i in range(42):
        if i in (4, 40):
            with _Calls() as calls:
                store.add(f"n{i}")
            with _Calls() as back:
                store.ensure_resident([f"n{i - 4}"])  # evicted: attached again from host memory
            work[i] = (calls.counts, back.counts)
        else:
            store.add(f"n{i}")
    assert len(store.entries) == 42 and len(store.resident) == 3
    assert sum(work[4][0].values()) > 100  # the measure sees the work that is done
    assert work[4][0] == work[40][0], "adding an adapter costs more with more adapters loaded"
    assert work[4][1] == work[40][1], "re-attaching an adapter costs more with more adapters loaded"


@torch.no_grad()
def test_mixed_heads_in_one_batch_equal_each_row_alone(tmp_path) -> None:
    """Classification: each adapter brings its own head (2, 4 and 3 labels); one mixed batch equals each row run
    alone with a plain ak.load of that run (float32, 1e-5)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier_dir(tmp_path / "model")
    names = classifier_adapters(tmp_path / "model", tmp_path / "runs", [2, 4, 3])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    store = AdapterStore(model, tmp_path / "runs", max_resident=3)
    store.load_all()
    runner = ClassifyRunner(model, tokenizer, store)
    texts = ["the cat sat on the mat", "good", "a very bad film", "hello world", "one two three four five", "no"]
    order = ["cls1", None, "cls0", "cls2", "cls1", "cls0"]
    rows = [Row(n, runner.encode(t)) for n, t in zip(order, texts)]
    mixed = runner(rows)
    for row, text, got in zip(rows, texts, mixed):
        if row.adapter is None:
            continue
        width = len(store.get(row.adapter).labels or [])
        alone = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model", num_labels=width,
                                                                   ignore_mismatched_sizes=True).eval()
        ak.load(alone, tmp_path / "runs" / row.adapter / "adapter")
        probs = alone(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
        assert list(got["probabilities"]) == [f"{row.adapter}_label{k}" for k in range(width)]
        torch.testing.assert_close(torch.tensor(list(got["probabilities"].values())), probs, atol=1e-5, rtol=1e-5)
    assert len({tuple(r["probabilities"].values()) for r in mixed}) == len(mixed)  # heads really differ
    assert names == ["cls0", "cls1", "cls2"]


@torch.no_grad()
def test_left_padded_mixed_generation_scores_equal_each_row_alone(causal) -> None:
    """The completions batch (left padding + mask, one adapter per row): every step's logits of every row equal
    that row generated alone (float32, 1e-5)."""
    from adapterkit.serve.runners import pad_rows, per_row

    model_dir, adapters = causal
    model = _model(model_dir)
    store = AdapterStore(model, adapters, max_resident=4)
    store.load_all()
    names = ["ad2", None, "ad0", "ad3", "ad1", "ad2"]
    rows = [Row(n, tuple(range(4 + b, 6 + 3 * b)), 5) for b, n in enumerate(names)]  # lengths 2..17
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None,
              "output_scores": True, "return_dict_in_generate": True}
    ids, mask = pad_rows(rows, 0, left=True)
    assert ids[0, 0] == 0 and ids[-1, 0] != 0  # short rows really are padded
    with store.lock, per_row(store, names):
        mixed = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    for b, row in enumerate(rows):
        with ak.use(model, *([row.adapter] if row.adapter else [])):  # the plain one-adapter path, no Select
            alone = model.generate(input_ids=torch.tensor([row.ids]), **kwargs)
        assert torch.equal(mixed.sequences[b, ids.shape[1]:], alone.sequences[0, len(row.ids):])
        for step_mixed, step_alone in zip(mixed.scores, alone.scores, strict=True):
            torch.testing.assert_close(step_mixed[b], step_alone[0], atol=1e-5, rtol=1e-5)


def test_the_library_and_store_import_without_the_server_stack() -> None:
    import subprocess

    code = ("import sys, adapterkit, adapterkit.serve.store, adapterkit.serve.runners, adapterkit.serve.batcher, "
            "adapterkit.serve.metrics; bad = [m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules]; "
            "assert not bad, bad")
    src = str(Path(__file__).resolve().parents[2] / "src")
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cli_serve_without_fastapi_is_one_clear_error(monkeypatch, capsys, causal) -> None:
    from adapterkit.cli.main import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    monkeypatch.delitem(sys.modules, "adapterkit.serve.app", raising=False)
    assert main(["serve", "--model", str(causal[0]), "--max-batch", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("error: serve needs fastapi and uvicorn (fastapi is missing): "
                                               "pip install 'adapterkit[serve]'")
    assert main(["serve", "--model", str(causal[0]), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1, got 0" in capsys.readouterr().err


def test_a_row_whose_adapter_was_unloaded_fails_alone(causal) -> None:
    model_dir, adapters = causal
    model = _model(model_dir)
    store = AdapterStore(model, adapters, max_resident=2)
    store.load_all()
    runner = CompletionRunner(model, _tokenizer(model_dir), store)
    rows = [Row("ad1", (5, 6, 7), 2), Row("ad3", (5, 6), 2), Row(None, (8,), 2)]
    store.remove("ad1")  # e.g. DELETE /v1/adapters/ad1 while the row waited in the queue
    results = runner(rows)
    assert isinstance(results[0], UnknownAdapterError) and "unloaded" in str(results[0])
    assert results[1:] == [runner([rows[1]])[0], runner([rows[2]])[0]]


@torch.no_grad()
def test_a_saved_output_layer_is_served_per_row_in_generation(causal, tmp_path) -> None:
    """An adapter saved with its own lm_head (what vLLM refuses as modules_to_save) beside one without: a mixed
    generation batch equals each row generated alone after a plain ak.load (scores at 1e-5)."""
    from adapterkit.serve.runners import pad_rows, per_row

    model_dir, adapters = causal
    donor = _model(model_dir)
    ak.load(donor, adapters / "ad0", name="headed")
    donor.lm_head.weight.add_(torch.randn(donor.lm_head.weight.shape, generator=torch.Generator().manual_seed(5)))
    ak.save(donor, tmp_path / "headed", "headed", modules=("lm_head",))
    model = _model(model_dir)
    store = AdapterStore(model, adapters, max_resident=3)
    store.add("headed", tmp_path / "headed")
    store.add("ad1")
    assert list(store.get("headed").modules) == ["lm_head"]
    names = ["headed", "ad1", None, "headed"]
    rows = [Row(n, tuple(range(10 + b, 14 + 2 * b)), 4) for b, n in enumerate(names)]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None,
              "output_scores": True, "return_dict_in_generate": True}
    ids, mask = pad_rows(rows, 0, left=True)
    with store.lock, per_row(store, names):
        mixed = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    for b, row in enumerate(rows):
        plain = _model(model_dir)
        if row.adapter is not None:
            ak.load(plain, tmp_path / "headed" if row.adapter == "headed" else adapters / row.adapter)
        alone = plain.generate(input_ids=torch.tensor([row.ids]), **kwargs)
        for step_mixed, step_alone in zip(mixed.scores, alone.scores, strict=True):
            torch.testing.assert_close(step_mixed[b], step_alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed.scores[0][0], mixed.scores[0][2], atol=1e-2)  # the head really differs
    assert torch.equal(model.lm_head.weight, _model(model_dir).lm_head.weight)  # the shared head is untouched


def test_tensors_that_do_not_fit_undo_the_attach(causal, tmp_path) -> None:
    import json

    model_dir, adapters = causal
    shutil.copytree(adapters / "ad0", tmp_path / "liar")
    record = json.loads((tmp_path / "liar" / "adapter.json").read_text())
    record["spec"]["r"] = record["spec"]["r"] + 1  # the saved tensors have the old rank
    (tmp_path / "liar" / "adapter.json").write_text(json.dumps(record))
    model = _model(model_dir)
    store = AdapterStore(model, adapters, max_resident=2)
    store.add("ad1")
    where = r"liar/adapter-\w+\.safetensors: adapter at model\.layers\.0\.self_attn\.q_proj: "  # the file, the module
    with pytest.raises(ak.StateError, match=where + r"tensor \w+ has shape \(2, 32\), expected \(3, 32\)"):
        store.add("liar", tmp_path / "liar")
    assert list(store.entries) == ["ad1"] and ak.adapters(model) == ["ad1"]
