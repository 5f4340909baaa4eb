"""CLIP ViT-L/14 text encoder, as Stable Diffusion v1 uses it (the `cond_stage_model`).

Attribute names mirror the checkpoint keys `cond_stage_model.transformer.text_model.*`, so a v1 file
loads with a strict `load_state_dict`. The conditioning is the last hidden state after the final
LayerNorm (not the pooled output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block with a causal self-attention."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg.width, cfg.width * cfg.mlp_ratio)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(ids)


class FrozenCLIPEmbedder(nn.Module):
    """The v1 `cond_stage_model`: token ids [B, 77] -> context [B, 77, width]."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.transformer = CLIPTextModel(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids)
