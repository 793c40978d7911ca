"""Text encoders: per-token caption states from a Hugging Face encoder (BERT-like such as MiniLM, or a T5 encoder).

A plain nn.Module around an already-built tokenizer and model; loading from disk lives in hpcvid.stages.encoders.
"""
from __future__ import annotations

import torch
from torch import nn


class TextEncoder(nn.Module):
    """captions -> (states (B, L, D), mask (B, L)); L is fixed at `max_tokens` so batches stack into shards."""

    def __init__(self, tokenizer, model: nn.Module, max_tokens: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model
        self.max_tokens = max_tokens
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(device)
        states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()                   # (B, L)
        return states * mask[..., None], mask                   # padded positions zeroed: (B, L, D), (B, L)
