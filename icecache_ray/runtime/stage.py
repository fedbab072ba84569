"""One pipeline stage of a Llama-family causal LM, and the greedy-decoding state a driver keeps.

:class:`StageModel` runs layers ``[start, stop)`` of a stock transformers model exactly as the
model's own ``forward`` does (same mask, rotary embeddings and layer calls), so a pipeline of
stages produces the same tokens as the whole model. The first stage embeds token ids, the last
one applies the final norm and the LM head to the last position. Weights of other layers are
dropped, so a worker holds only its shard.

:class:`GreedyBatch` is the driver's side of one request group: padded inputs for the prefill,
one-token inputs per decode step, finished rows fed the pad token (as ``model.generate`` does).
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask


def stage_ranges(n_layers: int, stages: int, n_full_layers: int = 0, layer_reuse: int = 1) -> list[range]:
    """Split ``n_layers`` into ``stages`` contiguous ranges of near-equal size; boundaries inside
    the sparse part are moved to the start of a ``layer_reuse`` run (an anchor and its followers
    stay in one stage). Raises ValueError when there are fewer layers than stages."""
    if stages < 1 or stages > n_layers:
        raise ValueError(f"stages={stages}: must be between 1 and the model's {n_layers} layers")
    cuts = [round(i * n_layers / stages) for i in range(stages + 1)]
    for i in range(1, stages):
        c = cuts[i]
        if c > n_full_layers and layer_reuse > 1:
            cuts[i] = n_full_layers + (c - n_full_layers) // layer_reuse * layer_reuse
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"stages={stages}: too many stages for {n_layers} layers with layer_reuse={layer_reuse}")
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


class StageModel:
    """Layers ``layers`` of ``model`` (see module docstring)."""

    def __init__(self, model, layers: range) -> None:
        n = model.config.num_hidden_layers
        if layers.start < 0 or layers.stop > n or len(layers) == 0:
            raise ValueError(f"layers={layers}: must be a non-empty part of the model's {n} layers")
        self.model, self.layers = model, layers
        self.first, self.last = layers.start == 0, layers.stop == n
        inner = model.model
        for i in range(n):
            if i not in layers:
                inner.layers[i] = torch.nn.Module()  # free the weights this stage never runs

    @torch.inference_mode()
    def forward(self, cache, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x: token ids [B, T] (first stage) or hidden states [B, T, D]; attention_mask [B, past + T]
        (1 = token, 0 = left padding); position_ids [B, T].

        Returns hidden states [B, T, D], or on the last stage the logits of the last position [B, V]."""
        inner = self.model.model
        device = inner.norm.weight.device
        x, attention_mask, position_ids = x.to(device), attention_mask.to(device), position_ids.to(device)
        hidden = inner.embed_tokens(x) if self.first else x
        mask = create_causal_mask(config=inner.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids, layer_idx=self.layers.start)
        rotary = inner.rotary_emb(hidden, position_ids=position_ids)
        for i in self.layers:
            hidden = inner.layers[i](hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids,
                                     cache=cache, use_cache=True)
        if not self.last:
            return hidden
        return self.model.lm_head(inner.norm(hidden[:, -1:]))[:, -1]


class GreedyBatch:
    """Inputs and outputs of greedy decoding for one group of prompts (see module docstring)."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, eos: int | None, pad: int) -> None:
        width = max(len(p) for p in prompts)
        self.ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        self.positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
        self.max_new_tokens, self.eos, self.pad = max_new_tokens, eos, pad
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.unfinished = torch.ones(len(prompts), dtype=torch.bool)

    @property
    def done(self) -> bool:
        return len(self.tokens[0]) >= self.max_new_tokens or not bool(self.unfinished.any())

    def prefill_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [B, T], mask [B, T], positions [B, T])."""
        return self.ids, self.mask, self.positions

    def advance(self, next_tokens: torch.Tensor) -> None:
        """Record the argmax tokens [B] of the last step (pad for rows that already finished)."""
        nxt = torch.where(self.unfinished, next_tokens.cpu(), torch.full_like(next_tokens.cpu(), self.pad))
        for row, tok in zip(self.tokens, nxt.tolist()):
            row.append(tok)
        if self.eos is not None:
            self.unfinished &= nxt != self.eos
        self.ids = nxt[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [B, 1], mask [B, past + 1], positions [B, 1]) of the next decode step."""
        return self.ids, self.mask, self.positions

    def results(self) -> list[list[int]]:
        """Generated ids per prompt, cut after the first EOS."""
        eos = self.eos
        return [row[: row.index(eos) + 1] if eos is not None and eos in row else list(row) for row in self.tokens]
