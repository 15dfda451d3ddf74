"""What a continual learner reads features through: a frozen, adapted model and how its inputs are batched.

A backbone turns a batch of a stream's inputs into one feature vector per example. The adapters live on its
model; which of them run is chosen by the method (``adapterkit.use``), so the backbone knows nothing of methods.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.core.host import HOST_ATTR
from adapterkit.inject.fingerprint import tensor_digest
from adapterkit.train.continual.stream import Examples


class Backbone:
    """Base: ``collate`` picks and pads rows, ``features`` maps a collated batch to (B, dim)."""

    dim: int
    model: nn.Module
    train_mode = True  # run the model in train mode while adapters learn (dropout on); CNNs keep BatchNorm frozen

    def collate(self, examples: Examples, rows: Sequence[int]) -> Any:
        raise NotImplementedError

    def features(self, batch: Any) -> Tensor:
        raise NotImplementedError

    def take(self, batch: Any, rows: Sequence[int]) -> Any:
        """Some rows of a collated batch (a tensor, or a dict of tensors with one row per example)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        if isinstance(batch, dict):
            return {key: value[index] for key, value in batch.items()}
        return batch[index]

    def fingerprint(self) -> str:
        """The base weights' names, shapes and a sample of their values (not the adapters'): a resumed stream
        must continue on the same model."""
        h = hashlib.sha256()
        for name, param in self.model.named_parameters():
            if HOST_ATTR in name.split("."):
                continue
            h.update(f"{name}:{tuple(param.shape)}:{tensor_digest(param)}".encode())
        return h.hexdigest()[:16]


class TextBackbone(Backbone):
    """A transformers encoder (``AutoModel``); features are the mean of the last hidden states over real tokens
    (``pooling="mean"``, as sentence-transformers does for MiniLM) or the first token's (``"cls"``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 64, pooling: str = "mean") -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={pooling!r}: use 'mean' or 'cls'")
        self.model, self.tokenizer, self.max_length, self.pooling = model, tokenizer, max_length, pooling
        config: Any = model.config
        self.dim = int(config.hidden_size)
        self.pad_id = tokenizer.pad_token_id or 0

    def encode(self, texts: Sequence[str], labels: Sequence[int]) -> Examples:
        """Tokenise once (truncated to ``max_length``); batches pad to their longest row."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return Examples(ids, torch.tensor(list(labels)))

    def collate(self, examples: Examples, rows: Sequence[int]) -> dict[str, Tensor]:
        seqs = [examples.inputs[i] for i in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        if hidden.shape[1] != mask.shape[1]:  # virtual tokens in front (a prompt adapter that keeps them)
            extra = hidden.shape[1] - mask.shape[1]
            mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class ImageBackbone(Backbone):
    """An image model; inputs are a (N, C, H, W) tensor and features come from ``features_of(model, x)``
    (default: ``model.features(x)``). BatchNorm statistics stay frozen: the model runs in eval mode throughout."""

    train_mode = False

    def __init__(self, model: nn.Module, dim: int,
                 features_of: Callable[[nn.Module, Tensor], Tensor] | None = None) -> None:
        self.model, self.dim = model, dim
        self._features_of = features_of or _features_method

    def collate(self, examples: Examples, rows: Sequence[int]) -> Tensor:
        return examples.inputs[torch.as_tensor(list(rows), dtype=torch.long)]

    def features(self, batch: Tensor) -> Tensor:
        return self._features_of(self.model, batch)


def _features_method(model: Any, x: Tensor) -> Tensor:
    return model.features(x)
