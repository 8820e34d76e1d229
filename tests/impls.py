"""Reference implementations of real networks, written here in plain torch, whose weights the
presets in `surgery/presets/` carry between layouts.

    NanoGPT     Karpathy's nanoGPT (`model.py`): GPT-2 with `nn.Linear` where Hugging Face's
                GPT-2 has `Conv1D` (the same weights, stored transposed).
    MetaLlama   Meta's reference Llama (`llama/model.py` of meta-llama/llama): rotary embeddings
                on interleaved pairs in complex form, grouped-query attention; Hugging Face's
                `LlamaForCausalLM` rotates halves instead, so wq and wk rows are permuted.

Both take keyword arguments with small defaults, so a target spec such as
`tests.impls:MetaLlama?dim=32&n_layers=2&n_heads=4&n_kv_heads=2` builds one; `gpt2_config`
and `llama_config` take the same keyword arguments and give the matching transformers config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# -- nanoGPT ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTArgs:
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 16
    vocab_size: int = 64
    block_size: int = 32


class CausalSelfAttention(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.n_head, self.n_embd = args.n_head, args.n_embd
        self.c_attn = nn.Linear(args.n_embd, 3 * args.n_embd)
        self.c_proj = nn.Linear(args.n_embd, args.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.c_fc = nn.Linear(args.n_embd, 4 * args.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's `gelu_new`
        self.c_proj = nn.Linear(4 * args.n_embd, args.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd)
        self.attn = CausalSelfAttention(args)
        self.ln_2 = nn.LayerNorm(args.n_embd)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's `GPT`: `lm_head.weight` is `transformer.wte.weight` (tied); forward gives the
    logits of every position, (B, T, vocab_size)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.config = args = GPTArgs(**kwargs)
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(args.vocab_size, args.n_embd),
                "wpe": nn.Embedding(args.block_size, args.n_embd),
                "h": nn.ModuleList(Block(args) for _ in range(args.n_layer)),
                "ln_f": nn.LayerNorm(args.n_embd),
            }
        )
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def gpt2_config(**kwargs: Any) -> Any:
    """The transformers `GPT2Config` of the NanoGPT these keyword arguments build."""
    from transformers import GPT2Config

    args = GPTArgs(**kwargs)
    return GPT2Config(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        vocab_size=args.vocab_size,
        n_positions=args.block_size,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
        bos_token_id=args.vocab_size - 1,  # GPT-2's 50256 is outside a tiny vocabulary
        eos_token_id=args.vocab_size - 1,
        attn_implementation="eager",
    )


# -- Meta Llama ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelArgs:
    """Meta's `ModelArgs`; `hidden_dim` given outright overrides Meta's rule (4 * dim, two
    thirds of it, `ffn_dim_multiplier`, rounded up to `multiple_of`)."""

    dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 64
    multiple_of: int = 16
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 32

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """e^(i t f) for every position t and each of the dim/2 frequencies f, as complex64."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head as one complex number."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, n_kv_heads, head_dim) -> (B, T, n_kv_heads * n_rep, head_dim), each kv head repeated."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, -1, head_dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        keys = repeat_kv(xk, self.n_heads // self.n_kv_heads).transpose(1, 2)
        values = repeat_kv(xv, self.n_heads // self.n_kv_heads).transpose(1, 2)
        xq = xq.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaLlama(nn.Module):
    """Meta's `Transformer` without the KV cache (every call starts at position 0). Its
    rotary table is a non-persistent buffer, so the state_dict holds weights only, as
    Meta's Llama 2 and 3 checkpoints do (Llama 1's also held `rope.freqs`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.params = args = ModelArgs(**kwargs)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        freqs_cis = precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len * 2, args.rope_theta)
        self.register_buffer("freqs_cis", freqs_cis, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[:seqlen]
        mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu(1)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        return self.output(self.norm(h)).float()


def llama_config(**kwargs: Any) -> Any:
    """The transformers `LlamaConfig` of the MetaLlama these keyword arguments build."""
    from transformers import LlamaConfig

    args = ModelArgs(**kwargs)
    return LlamaConfig(
        hidden_size=args.dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_heads if args.n_kv_heads is None else args.n_kv_heads,
        intermediate_size=args.ffn_hidden_dim,
        vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_seq_len,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )
