"""Routing heat maps: the library functions and `adapterkit plot-routing` write real PNGs; bad input is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.train import poly_tools
from adapterkit.train.routing_plot import plot_routing, plot_task_routing, task_panels, token_panels
from tests.conftest import make_tiny, randomize

PNG = b"\x89PNG\r\n\x1a\n"


def _toy_record() -> ak.Routing:
    routing = ak.Routing()
    for layer in range(3):  # a token-level router over 2 experts: (B, T, K)
        weights = torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(layer)).softmax(-1)
        routing.record("router", f"encoder.layer.{layer}.attention.self.query", weights)
    routing.record("gate", "encoder.layer.0.output.dense", torch.tensor([[0.2, 0.8], [0.5, 0.5]]))  # (B, K)
    return routing


def test_token_level_record_becomes_layers_by_tokens_panels(tmp_path: Path) -> None:
    routing = _toy_record()
    panels = token_panels(routing, example=1, tokens=list("abcde"))
    assert [p[0] for p in panels] == ["router: expert 0", "router: expert 1", "gate"]
    title, matrix, rows, cols, _ = panels[1]
    assert matrix.shape == (3, 5) and cols == list("abcde") and rows[0] == "0.attention.self.query"
    torch.testing.assert_close(matrix[2], routing.weights["router"]["encoder.layer.2.attention.self.query"][1, :, 1])
    torch.testing.assert_close(panels[2][1], torch.tensor([[0.5, 0.5]]))
    out = plot_routing(routing, tmp_path / "tokens.png", example=1, tokens=list("abcde"))
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 2000
    with pytest.raises(ak.AdapterKitError, match="the routing record is empty"):
        plot_routing(ak.Routing(), tmp_path / "empty.png")
    with pytest.raises(ak.AdapterKitError, match="combiner 'fusion' reported nothing"):
        token_panels(routing, combiners=["fusion"])
    with pytest.raises(ak.AdapterKitError, match="example 4 is not in the batch of 2"):
        token_panels(routing, example=4, combiners=["router"])


def _poly_model() -> tuple[torch.nn.Module, ak.Mix]:
    model = make_tiny("bert").bert
    block = poly_tools.attach_poly(model, "poly", ak.LoRA(r=2), ["query", "value"], n_tasks=3, n_skills=4, n_splits=2)
    for index, name in enumerate(["poly", *block.children]):
        randomize(model, name, scale=1.0 if name == "poly" else 0.05, seed=index)
    return model.eval(), block


def test_task_routing_plot_has_a_summary_and_one_panel_per_task(tmp_path: Path) -> None:
    model, block = _poly_model()
    table = poly_tools.task_routing(model, "poly")
    panels = task_panels(table, tasks=["sst2", "subj", "trec"])
    assert [p[0] for p in panels] == ["all modules (mean)", "sst2", "subj", "trec"]
    assert panels[0][1].shape == (3, 4) and panels[1][1].shape == (4, 4)
    torch.testing.assert_close(panels[0][1].sum(-1), torch.ones(3))
    out = plot_task_routing(table, tmp_path / "tasks.png", tasks=["sst2", "subj", "trec"])
    assert out.read_bytes().startswith(PNG)
    with pytest.raises(ak.AdapterKitError, match="2 task names for 3 tasks"):
        task_panels(table, tasks=["a", "b"])


def test_cli_plot_routing_writes_a_png_for_a_task_route_model(tmp_path: Path, capsys) -> None:
    model, block = _poly_model()
    model.save_pretrained(tmp_path / "base")
    folders = []
    for name in ["poly", *block.children]:
        folders.append(str(ak.save(model, tmp_path / name, name)))
    (tmp_path / "block.json").write_text(json.dumps(block.to_dict()))
    out = tmp_path / "routing.png"
    code = main(["plot-routing", "--model", str(tmp_path / "base"), "--adapter", *folders,
                 "--block", str(tmp_path / "block.json"), "--tasks", "a,b,c", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes().startswith(PNG) and str(out) in capsys.readouterr().out
    code = main(["plot-routing", "--model", str(tmp_path / "base"), "--adapter", *folders,
                 "--block", "{not json", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --block: not valid JSON") and err.count("\n") == 1
    code = main(["plot-routing", "--model", str(tmp_path / "base"), "--adapter", *folders,
                 "--block", json.dumps(ak.Stack(*block.children).to_dict()), "--out", str(out)])
    assert code == 2 and "has no learned block" in capsys.readouterr().err
