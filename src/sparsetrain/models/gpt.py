"""A small GPT (decoder-only transformer) of plain ``nn.Linear`` layers, for byte-level language
modelling: both backends apply to every projection.

``GPTMini(num_classes, input_shape, width)``: ``num_classes`` is the vocabulary (256 for bytes),
``input_shape`` is ``(context,)``, the number of tokens a sequence holds, and ``width`` scales
the embedding size (256 at width 1, rounded to a multiple of the 4 heads). Four pre-LayerNorm
blocks of causal self-attention and a 4x GELU MLP; learned position embeddings (``wpe``, which
sparsetrain keeps dense by default); an untied output layer ``head``. Input: token indices
``(batch, context)``, int64; output: logits ``(batch, context, num_classes)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

N_LAYER = 4
N_HEAD = 4
EMBED = 256


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then an MLP."""

    def __init__(self, embed: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(embed)
        self.qkv = nn.Linear(embed, 3 * embed)
        self.proj = nn.Linear(embed, embed)
        self.ln_2 = nn.LayerNorm(embed)
        self.fc = nn.Linear(embed, 4 * embed)
        self.fc_out = nn.Linear(4 * embed, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class GPTMini(nn.Module):
    """A four-block GPT over a vocabulary of ``num_classes`` tokens and ``input_shape[0]``
    positions."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], width: float = 1.0):
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"gpt-mini reads sequences of token indices: input_shape must be "
                             f"(context,), got {tuple(input_shape)}")
        self.context = int(input_shape[0])
        embed = max(N_HEAD, int(round(EMBED * width / N_HEAD)) * N_HEAD)
        self.wte = nn.Embedding(num_classes, embed)
        self.wpe = nn.Embedding(self.context, embed)
        self.blocks = nn.Sequential(*(Block(embed, N_HEAD) for _ in range(N_LAYER)))
        self.ln_f = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, num_classes, bias=False)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, 0.0, 0.02)
                if name.endswith(("proj.weight", "fc_out.weight")):  # GPT-2's residual scaling
                    p.data.mul_(1.0 / (2 * N_LAYER) ** 0.5)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"gpt-mini takes token indices of shape (batch, context), int64; "
                             f"got {tuple(idx.shape)} {idx.dtype}")
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"gpt-mini was built for sequences of at most {self.context} "
                             f"tokens, got {t}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        return self.head(self.ln_f(self.blocks(x)))
