"""The continual-learning layer: streams and their bad inputs, metrics, every method end to end on a tiny encoder,
resume mid-stream equal to an uninterrupted run, and EAR's growth decisions."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.train import continual as cl


class Tokens:
    """Stands in for a tokenizer: the "texts" are already token-id lists."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=64):
        return {"input_ids": [list(t)[:max_length] for t in texts]}


def tiny_encoder(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config).eval()


def examples(backbone: cl.TextBackbone, classes: list[int], per_class: int, seed: int, offset: int = 0
             ) -> cl.Examples:
    """Class c's sequences are mostly token 4 + 3c (+ offset): separable, and an offset moves the domain."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for c in classes:
        for _ in range(per_class):
            length = int(torch.randint(4, 10, (1,), generator=g))
            noise = torch.randint(1, 64, (length,), generator=g)
            main = torch.full((length,), 4 + 3 * c + offset)
            keep = torch.rand(length, generator=g) < 0.7
            texts.append(torch.where(keep, main, noise).tolist())
            labels.append(c)
    return backbone.encode(texts, labels)


def stream_of(backbone: cl.TextBackbone, groups=((0, 1), (2, 3), (4, 5)), per_class: int = 12) -> cl.Stream:
    tasks = [cl.Task(f"t{i}", examples(backbone, list(g), per_class, seed=i),
                     examples(backbone, list(g), 6, seed=100 + i)) for i, g in enumerate(groups)]
    return cl.Stream(tasks, "class")


def learner_for(model: nn.Module, spec=None, targets=("query", "value"), **config) -> cl.Learner:
    backbone = cl.TextBackbone(model, Tokens())
    settings = {"epochs": 4, "lr": 2e-2, "batch_size": 8, **config}
    return cl.Learner(backbone, spec or ak.LoRA(r=4, alpha=8), list(targets) if targets else None,
                      cl.ContinualConfig(**settings))


def make(name: str) -> cl.ContinualMethod:
    return {"finetune": cl.FineTune, "joint": cl.Joint, "lae": lambda: cl.LAE(momentum=0.9),
            "mos": lambda: cl.MOS(align_epochs=3, align_samples=32),
            "ear": lambda: cl.EAR(dims=512)}[name]()


# ---- streams -------------------------------------------------------------------------------------------------
def test_stream_refuses_a_class_seen_again_in_class_incremental_mode():
    backbone = cl.TextBackbone(tiny_encoder(), Tokens())
    a = cl.Task("a", examples(backbone, [0, 1], 3, 0), examples(backbone, [0, 1], 2, 1))
    b = cl.Task("b", examples(backbone, [1, 2], 3, 2), examples(backbone, [1, 2], 2, 3))
    with pytest.raises(cl.StreamError, match=r"task 'b' \(2 of 2\): classes \[1\] were already seen in task 'a'"):
        cl.Stream([a, b], "class")
    assert len(cl.Stream([a, b], "domain")) == 2  # the same classes in a new domain are fine


def test_stream_refuses_an_empty_task_and_stray_test_labels():
    backbone = cl.TextBackbone(tiny_encoder(), Tokens())
    data = examples(backbone, [0, 1, 2, 3], 3, 0)
    with pytest.raises(cl.StreamError, match=r"task '4-5' \(2 of 2\) has no training examples"):
        cl.Stream.class_incremental(data, data, [[0, 1], [4, 5]])
    a = cl.Task("a", examples(backbone, [0], 3, 0), examples(backbone, [0, 1], 2, 1))
    with pytest.raises(cl.StreamError, match=r"task 'a' \(1 of 1\): test labels \[1\] are not among"):
        cl.Stream([a])
    with pytest.raises(cl.StreamError, match="setting='task'"):
        cl.Stream([a], "task")
    with pytest.raises(cl.StreamError, match="3 inputs but 2 labels"):
        cl.Examples([[1], [2], [3]], torch.tensor([0, 1]))


def test_metrics_on_a_hand_computed_matrix():
    matrix = [[90.0], [70.0, 80.0], [60.0, 75.0, 85.0]]
    assert cl.final_average(matrix) == pytest.approx((60 + 75 + 85) / 3)
    assert cl.average_incremental(matrix) == pytest.approx((90 + 75 + 220 / 3) / 3)
    assert cl.forgetting(matrix) == pytest.approx(((90 - 60) + (80 - 75)) / 2)
    assert cl.backward_transfer(matrix) == pytest.approx(((60 - 90) + (75 - 80)) / 2)
    assert cl.forgetting([[50.0]]) == 0.0


# ---- methods end to end --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["finetune", "joint", "lae", "mos", "ear"])
def test_every_method_learns_the_stream_and_writes_its_result(name, tmp_path):
    model = tiny_encoder()
    learner = learner_for(model)
    stream = stream_of(learner.backbone)
    result = cl.run_stream(make(name), learner, stream, out=tmp_path)
    for matrix in result.matrices.values():
        assert [len(row) for row in matrix] == [1, 2, 3]
        assert all(0.0 <= v <= 100.0 for row in matrix for v in row)
    main = result.matrices[next(iter(result.matrices))]
    assert main[0][0] > 60.0, main  # the first task is learnt (chance is 50)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["metrics"].keys() == result.matrices.keys()
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 1000
    assert result.trainable_params > 0
    for param in model.parameters():  # the base stays frozen and unchanged in kind
        assert not param.requires_grad


@pytest.mark.parametrize("spec,targets", [(ak.SeqBottleneck(reduction_factor=4), ["output.LayerNorm"]),
                                          (ak.methods.PrefixTuning(n_tokens=4), None)])
def test_lae_runs_with_a_bottleneck_and_with_prefix_tuning(spec, targets):
    learner = learner_for(tiny_encoder(), spec, targets)
    result = cl.run_stream(make("lae"), learner, stream_of(learner.backbone, groups=((0, 1), (2, 3))))
    assert result.matrices["ensemble"][0][0] > 55.0


def test_lae_offline_expert_follows_the_online_one_by_ema():
    learner = learner_for(tiny_encoder())
    stream = stream_of(learner.backbone, groups=((0, 1), (2, 3)))
    method = cl.LAE(momentum=0.5, freeze_epochs=0)
    method.learn(learner, stream, 0)
    before = {k: v.detach().clone() for k, v in learner.tensors("lae_online").items()}
    method.learn(learner, stream, 1)  # clones at the start of task 1, then EMA after every step
    online, offline = learner.tensors("lae_online"), learner.tensors("lae_offline")
    moved = [k for k in online if not torch.equal(online[k], before[k])]
    assert moved
    for key in moved:  # the offline copy lies strictly between its start and the online expert
        assert not torch.equal(offline[key], before[key]) and not torch.equal(offline[key], online[key])


def test_mos_refuses_a_domain_incremental_stream():
    learner = learner_for(tiny_encoder())
    task = cl.Task("a", examples(learner.backbone, [0, 1], 3, 0), examples(learner.backbone, [0, 1], 2, 1))
    with pytest.raises(cl.StreamError, match="mos needs a class-incremental stream; this one is domain-incremental"):
        cl.run_stream(make("mos"), learner, cl.Stream([task], "domain"))


# ---- resume --------------------------------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("name", ["finetune", "joint", "lae", "mos", "ear"])
def test_a_stream_resumed_after_a_crash_ends_as_the_uninterrupted_run(name, tmp_path, monkeypatch):
    whole = learner_for(tiny_encoder())
    expected = cl.run_stream(make(name), whole, stream_of(whole.backbone))

    crashing = make(name)
    learn = crashing.learn

    def learn_until_task_2(learner, stream, t):
        if t == 2:
            raise Crash
        learn(learner, stream, t)

    monkeypatch.setattr(crashing, "learn", learn_until_task_2)
    first = learner_for(tiny_encoder())
    with pytest.raises(Crash):
        cl.run_stream(crashing, first, stream_of(first.backbone), out=tmp_path)

    again = learner_for(tiny_encoder())  # a new process: a fresh model, learner and method
    resumed = cl.run_stream(make(name), again, stream_of(again.backbone), out=tmp_path, resume=True)
    assert resumed.matrices == expected.matrices
    assert resumed.events == expected.events
    for adapter in whole.placed:
        for key, value in whole.tensors(adapter).items():
            assert torch.equal(value, again.tensors(adapter)[key]), (adapter, key)


def test_resume_refuses_another_backbone_and_a_damaged_state(tmp_path):
    first = learner_for(tiny_encoder(seed=0))
    cl.run_stream(make("finetune"), first, stream_of(first.backbone, groups=((0, 1),)), out=tmp_path)
    other = learner_for(tiny_encoder(seed=1))
    with pytest.raises(cl.StreamError, match="saved with backbone .* uses a different backbone"):
        cl.run_stream(make("finetune"), other, stream_of(other.backbone, groups=((0, 1),)), out=tmp_path,
                      resume=True)
    same = learner_for(tiny_encoder(seed=0))
    with pytest.raises(cl.StreamError, match="saved with stream .* uses a different stream"):
        cl.run_stream(make("finetune"), same, stream_of(same.backbone, groups=((2, 3),)), out=tmp_path, resume=True)
    state = tmp_path / "stream_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(cl.StreamError, match="the file is damaged"):
        cl.run_stream(make("finetune"), same, stream_of(same.backbone, groups=((0, 1),)), out=tmp_path, resume=True)


# ---- EAR's detector --------------------------------------------------------------------------------------------
def test_ear_grows_an_adaptor_on_a_shift_and_not_on_more_of_the_same():
    learner = learner_for(tiny_encoder(), epochs=1)
    b = learner.backbone
    same = [cl.Task("a", examples(b, [0, 1], 16, 0), examples(b, [0, 1], 8, 1)),
            cl.Task("a-again", examples(b, [0, 1], 16, 2), examples(b, [0, 1], 8, 3)),
            cl.Task("shifted", examples(b, [0, 1], 16, 4, offset=30), examples(b, [0, 1], 8, 5, offset=30))]
    method = cl.EAR(dims=1024)
    result = cl.run_stream(method, learner, cl.Stream(same, "domain"))
    grew = [e["grew"] for e in result.events]
    assert grew == [True, False, True], result.events
    assert result.events[2]["auroc"] > 0.9 and result.events[1]["auroc"] < 0.75
    assert len(method.heads) == 2 and result.memory_bytes > 0


def test_ear_picks_among_candidates_by_the_zero_cost_proxy():
    learner = learner_for(tiny_encoder(), epochs=1)
    method = cl.EAR(candidates=[ak.LoRA(r=2), ak.LoRA(r=8)], dims=256)
    cl.run_stream(method, learner, stream_of(learner.backbone, groups=((0, 1),)))
    assert method.events[0]["spec"].startswith("candidate ")
    assert "ear_probe" not in learner.placed and list(learner.placed) == ["ear_adaptor0"]


# ---- images ---------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Stem conv, BatchNorm, a pointwise conv, pooling: enough for LoRA on a 1x1 conv and a conv bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 16, 1)
        with torch.no_grad():
            self.bn.running_mean.normal_(0.0, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.point(torch.relu(self.bn(self.stem(x))))).mean((2, 3))


def pictures(classes: list[int], per_class: int, seed: int) -> cl.Examples:
    """Class c shifts channel c % 3 up (c < 3) or down (c >= 3) over the whole picture (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(classes) * per_class, 3, 8, 8, generator=g) * 0.3
    labels = torch.tensor(classes).repeat_interleave(per_class)
    for i, c in enumerate(labels.tolist()):
        x[i, c % 3] += 1.5 if c < 3 else -1.5
    return cl.Examples(x, labels)


@pytest.mark.parametrize("spec,targets", [(ak.LoRA(r=4, alpha=8), ["point"]),
                                          (ak.methods.SeqConvBottleneck(reduction_factor=2), ["bn"])])
@pytest.mark.parametrize("name", ["lae", "mos"])
def test_image_streams_learn_with_conv_adapters_and_keep_batchnorm_frozen(name, spec, targets):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    stats = model.bn.running_mean.clone()
    learner = cl.Learner(cl.ImageBackbone(model, 16), spec, targets,
                         cl.ContinualConfig(epochs=4, lr=2e-2, batch_size=8))
    tasks = [cl.Task(f"t{i}", pictures(list(g), 16, i), pictures(list(g), 8, 50 + i))
             for i, g in enumerate(((0, 1), (2, 3), (4, 5)))]
    result = cl.run_stream(make(name), learner, cl.Stream(tasks))
    main = result.matrices[next(iter(result.matrices))]
    assert main[0][0] > 80.0 and cl.final_average(main) > 25.0, main  # chance: 16.7
    assert torch.equal(model.bn.running_mean, stats)  # BatchNorm's statistics were never updated


def test_ear_grows_for_classes_no_adaptor_knows_and_reports_routing():
    """Task b's classes 2/3 look exactly like a's 0/1 (offset -6: the same tokens): the detector cannot see them as
    new; grow="auto" grows for them anyway (the labels say so), grow="detector" does not."""

    def look_alike(b: cl.TextBackbone) -> cl.Stream:
        return cl.Stream([cl.Task("a", examples(b, [0, 1], 16, 0), examples(b, [0, 1], 8, 1)),
                          cl.Task("b", examples(b, [2, 3], 16, 2, offset=-6), examples(b, [2, 3], 8, 3, offset=-6))])

    learner = learner_for(tiny_encoder(), epochs=1)
    result = cl.run_stream(cl.EAR(dims=1024), learner, look_alike(learner.backbone))
    assert [e["grew"] for e in result.events] == [True, True]
    assert result.events[1]["detector_shift"] is False and result.events[1]["grew_for"] == "new classes"
    assert all(0.0 <= e["routing_accuracy"] <= 100.0 for e in result.events)
    strict = cl.EAR(dims=1024, grow="detector")
    other = learner_for(tiny_encoder(), epochs=1)
    cl.run_stream(strict, other, look_alike(other.backbone))
    assert [e["grew"] for e in strict.events] == [True, False] and len(strict.heads) == 1
    assert strict.heads[0].classes == [0, 1, 2, 3]  # the one adaptor learnt the new classes too
    with pytest.raises(ValueError, match="grow='always'"):
        cl.EAR(grow="always")


def test_resume_refuses_a_stream_with_the_same_labels_but_other_inputs(tmp_path):
    first = learner_for(tiny_encoder())
    b = first.backbone
    saved = cl.Stream([cl.Task("a", examples(b, [0, 1], 8, 0), examples(b, [0, 1], 4, 1))])
    cl.run_stream(make("finetune"), first, saved, out=tmp_path)
    other = cl.Stream([cl.Task("a", examples(b, [0, 1], 8, 7), examples(b, [0, 1], 4, 1))])  # other texts, same labels
    with pytest.raises(cl.StreamError, match="uses a different stream"):
        cl.run_stream(make("finetune"), learner_for(tiny_encoder()), other, out=tmp_path, resume=True)
