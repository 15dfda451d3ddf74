"""P-tuning (Liu et al. 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385): virtual input embeddings
produced by a trained prompt encoder instead of trained directly.

    P = MLP(E)     = W_3 relu(W_2 relu(W_1 E + b_1) + b_2) + b_3                      encoder="mlp"
    P = MLP(LSTM(E)) = W_5 relu(W_4 h + b_4) + b_5,  h = BiLSTM_2(E): (n, 2 * hidden)  encoder="lstm" (the paper's)
    E: (n, d) trained, hidden ``hidden`` wide (default d); the model then runs on [P ; E(x)] as in prompt tuning

The call is rewritten exactly as prompt tuning rewrites it (methods/prompt_tuning.py): only where P comes from
differs. The layout and default init follow peft's ``PromptEncoder`` (``P_TUNING``), so the same weights give
peft's outputs (tests/methods/test_prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from adapterkit.core.precision import master_dtype
from adapterkit.core.registry import register
from adapterkit.core.spec import require
from adapterkit.methods.prompt_tuning import PromptAdapter, _PromptSpec, input_embeddings

ENCODERS = ("mlp", "lstm")


@register("p_tuning")
@dataclass(frozen=True)
class PTuning(_PromptSpec):
    """Virtual tokens from a prompt encoder (``ak.attach(model, "p", ak.PTuning(n_tokens=20))``, no targets)."""

    encoder: str = "mlp"  # one of ENCODERS
    hidden: int | None = None  # the encoder's hidden size (default: the model's embedding size)
    lstm_layers: int = 2  # layers of the bidirectional LSTM (encoder="lstm")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.encoder in ENCODERS, f"p_tuning: encoder must be one of {ENCODERS}, got {self.encoder!r}")
        require(self.hidden is None or self.hidden > 0, f"p_tuning: hidden must be > 0, got {self.hidden}")
        require(self.lstm_layers > 0, f"p_tuning: lstm_layers must be > 0, got {self.lstm_layers}")

    def build(self, base: nn.Module) -> nn.Module:
        weight = input_embeddings(base, self.method).weight
        assert isinstance(weight, Tensor)  # input_embeddings checked it
        return PromptAdapter(self, PromptEncoder(self, weight))


class PromptEncoder(nn.Module):
    """E and the encoder that maps it to P."""

    def __init__(self, spec: PTuning, like: Tensor) -> None:
        super().__init__()
        size = like.shape[1]
        hidden = spec.hidden or size
        kw: dict[str, Any] = {"dtype": master_dtype(like), "device": like.device}
        self.embedding = nn.Embedding(spec.n_tokens, size, **kw)  # N(0, 1), as peft
        self.lstm: nn.LSTM | None = None
        if spec.encoder == "lstm":
            self.lstm = nn.LSTM(size, hidden, num_layers=spec.lstm_layers, bidirectional=True, batch_first=True,
                                **kw)
            self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                      nn.Linear(2 * hidden, size, **kw))
        else:
            self.head = nn.Sequential(nn.Linear(size, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw),
                                      nn.ReLU(), nn.Linear(hidden, size, **kw))

    def forward(self, rows: int) -> Tensor:
        e = self.embedding.weight.unsqueeze(0)  # (1, n, d): the same prompt for every row
        h = e if self.lstm is None else self.lstm(e)[0]  # (1, n, 2 * hidden) after the LSTM
        return self.head(h).expand(rows, -1, -1)  # (B, n, d)
