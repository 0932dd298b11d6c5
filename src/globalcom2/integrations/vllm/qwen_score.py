"""A replicated copy of one Qwen-VL vision block's ``norm1`` and fused ``attn.qkv``, and the hook that reads
that block's input off vLLM's tower (no vLLM import).

vLLM builds the tower's ``qkv`` as a ``QKVParallelLinear`` that tensor parallelism shards by heads; the
attention a patch receives is a mean over all heads, so the scores are recomputed from a full copy of the
scoring block's weights (taken from the checkpoint as vLLM's loader streams it), with the same functions
the HF path uses (``models.qwen_common.attention_received`` / ``block_qk``): RMSNorm (Qwen2.5-VL) or
LayerNorm (Qwen3-VL) with eps 1e-6 as in transformers' vision blocks, and transformers' own
``apply_rotary_pos_emb_vision``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...models.qwen_common import BlockInput
from .score_layer import ScoreWeights

#: checkpoint names of the tensors the copy holds (``visual.blocks.N`` in real checkpoints, ``model.visual...``
#: as transformers 5 saves them)
SCORE_WEIGHT = re.compile(r"(?:^|\.)visual\.blocks\.(\d+)\.(norm1|attn\.qkv)\.(weight|bias)$")
#: transformers' vision blocks build their norms with this eps (not the config's rms_norm_eps)
EPS = 1e-6


class RMSNorm(nn.Module):
    """transformers' Qwen2 RMSNorm: normalised in float32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float = EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotary(qwen3: bool):
    if qwen3:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    return apply_rotary_pos_emb_vision


class _ScoreAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qwen3: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.num_heads = heads
        self.scaling = (dim // heads) ** -0.5
        self.apply_rotary = _rotary(qwen3)


class QwenScoreBlock(nn.Module):
    """``norm1`` and ``attn.qkv`` of the vision block whose attention rates the tokens (``block_qk`` reads it
    as it reads a stock block)."""

    def __init__(self, dim: int, heads: int, *, rms: bool, qwen3: bool) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim) if rms else nn.LayerNorm(dim, eps=EPS)
        self.attn = _ScoreAttention(dim, heads, qwen3)


class ForwardTap:
    """Wraps one module's ``forward`` on the instance, calling ``before(args, kwargs)`` / ``after(output)``
    around it; ``remove`` restores it (remove stacked taps last first).

    vLLM compiles its vision blocks with ``support_torch_compile``, whose ``__call__`` calls ``self.forward``
    directly (no module hooks run); with the encoder not compiled (vLLM's default, required by the plugin)
    the instance's ``forward`` is what runs."""

    def __init__(self, module: nn.Module, before=None, after=None) -> None:
        self.module = module
        self.previous = module.__dict__.get("forward")
        inner = module.forward

        def forward(*args, **kwargs):
            if before is not None:
                before(args, kwargs)
            out = inner(*args, **kwargs)
            if after is not None:
                after(out)
            return out

        module.forward = forward

    def remove(self) -> None:
        """Put the module's previous ``forward`` back."""
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous


def capture_vllm_block_input(block: nn.Module, seen: dict, key: str = "input") -> ForwardTap:
    """Store a vLLM vision block's input as a ``BlockInput`` in ``seen[key]``.

    vLLM calls a block with ``x`` (S, 1, D), ``cu_seqlens`` and the rotary ``rotary_pos_emb_cos`` / ``_sin``
    (S, hd / 2), neox style: transformers' (cos, sin) are each half repeated (``cat((c, c), -1)``)."""

    def before(args, kwargs):
        x = args[0] if args else kwargs["x"]
        cos, sin = kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"]
        seen[key] = BlockInput(x.reshape(x.shape[0], -1), kwargs["cu_seqlens"],
                               (torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)))  # fmt: skip

    return ForwardTap(block, before=before)


def capture_vllm_block_output(block: nn.Module, seen: dict, key: str) -> ForwardTap:
    """Store a vLLM vision block's output (S, 1, D) in ``seen[key]``."""
    return ForwardTap(block, after=lambda out: seen.__setitem__(key, out))


class QwenScoreWeights(ScoreWeights):
    """Copies the scoring block's tensors into a ``QwenScoreBlock`` while vLLM's loader reads the checkpoint."""

    def __init__(self, block: QwenScoreBlock, position: int) -> None:
        super().__init__(block, position, SCORE_WEIGHT, "vision block",
                         "as visual.blocks.N.norm1.* and visual.blocks.N.attn.qkv.*, the Qwen-VL layout")  # fmt: skip
