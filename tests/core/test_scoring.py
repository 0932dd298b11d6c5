"""Scorers for towers with and without a [CLS] token, on hand-made tensors."""

import pytest
import torch

from globalcom2 import core
from globalcom2.core import scoring


def _qk(v=2, t=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, t, d, generator=g), torch.randn(v, t, d, generator=g)


def test_attention_received_matches_full_attention_map():
    q, k = _qk()
    heads = 2
    got = scoring.attention_received(q, k, heads, has_cls=True)
    # reference: the full (V, H, T, T) map, averaged over heads and queries, [CLS] column dropped
    qh = q.view(2, 5, heads, 4).transpose(1, 2)
    kh = k.view(2, 5, heads, 4).transpose(1, 2)
    probs = (qh @ kh.transpose(-1, -2)).softmax(-1)  # (V, H, T, T)
    want = probs.mean(dim=(1, 2))[:, 1:]
    torch.testing.assert_close(got, want)
    assert got.shape == (2, 4)
    no_cls = scoring.attention_received(q, k, heads, has_cls=False)
    torch.testing.assert_close(no_cls, probs.mean(dim=(1, 2)))
    torch.testing.assert_close(no_cls.sum(1), torch.ones(2))  # every query's row sums to 1


def test_global_dissimilarity_ranks_the_odd_token_first():
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [-1.0, 1.0]]])  # (1, 4, 2)
    s = scoring.global_dissimilarity(tokens)
    assert s.shape == (1, 4)
    assert int(s.argmax()) == 3
    gist = tokens.mean(1, keepdim=True)
    torch.testing.assert_close(s, -torch.nn.functional.cosine_similarity(tokens, gist, dim=-1))


def test_view_scores_dispatch_and_cls_is_core():
    q, k = _qk(t=6)
    torch.testing.assert_close(
        scoring.view_scores("cls", q, k, None, 2, True, "softmax"), core.cls_attention(q[:, 0], k, 2, "softmax")
    )
    tokens = torch.randn(2, 5, 3)
    torch.testing.assert_close(
        scoring.view_scores("global_dissimilarity", None, None, tokens, 2, True), scoring.global_dissimilarity(tokens)
    )
    with pytest.raises(ValueError, match="scorer must be one of"):
        scoring.view_scores("auto", q, k, tokens, 2, True)


@pytest.mark.parametrize(
    ("requested", "has_cls", "want"),
    [
        ("auto", True, "cls"),
        ("auto", False, "global_dissimilarity"),
        ("attention_received", False, "attention_received"),
        ("global_dissimilarity", True, "global_dissimilarity"),
        ("cls", True, "cls"),
    ],
)
def test_resolve_scorer(requested, has_cls, want):
    assert scoring.resolve_scorer(requested, has_cls) == want


def test_resolve_scorer_errors_name_the_option():
    with pytest.raises(ValueError, match="scorer='cls' needs a \\[CLS\\] token.*SigLIP"):
        scoring.resolve_scorer("cls", False, "SigLIP")
    with pytest.raises(ValueError, match="scorer must be one of \\('auto', 'cls'"):
        scoring.resolve_scorer("max", True)
