"""A slow, literal oracle of what SparseVLM's released v1.5 code does at inference, batch size 1.

Written independently from the behaviour of Gumpest/SparseVLMs at tag ``v1.5``
(``LlamaDynamicvitModel.forward`` in ``modelling_sparse_llama.py``, ``attn_postprocess_topk`` in
``score.py``, ``cluster_and_merge`` in ``utils.py``) and kept in its shape: one prompt laid out as
``[system text | image tokens | text]``, the released ``v_token_start`` / ``v_token_num`` /
``text_token_start`` bookkeeping, ``topk`` on the rater-mean attention, the policy mask, the
30 % / one-in-ten recycling and DPC-kNN with its ``1e-6 * rand`` density noise (seeded here).

The library's vectorised, batched implementation must agree with it at the released schedules.
"""

from __future__ import annotations

import torch

#: score.py of v1.5: label -> original tokens kept after layers 2, 6, 15 (576 visual tokens)
TABLES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


def raters(embeds: torch.Tensor, v_start: int, n_image: int) -> torch.Tensor:
    """Indices into the text after the image (``t_token_idx[1]``) of the rater tokens; embeds (1, L, D)."""
    v_t = embeds[:, v_start : v_start + n_image, :]
    t_t = embeds[:, v_start + n_image :, :]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)  # (1, T)
    return torch.where(m_v_t > m_v_t.mean())[1]


def cluster_and_merge(x: torch.Tensor, cluster_num: int, generator: torch.Generator | None) -> torch.Tensor:
    """DPC-kNN as released: x (1, N, C) -> (1, cluster_num, C).

    generator: the released ``1e-6 * rand`` density noise, drawn from it. None: no noise, equal
    densities ordered by index instead (the earlier token counts as denser, in float64), which is
    one of the outcomes the noise can give. Ties are systematic with two clusters (each token's
    k = 2 nearest include itself, so mutual nearest neighbours have equal densities): there the
    released result depends on the draw.
    """
    out_dtype = x.dtype
    if generator is None:
        x = x.double()
    b, n, c = x.shape
    dist_matrix = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (c**0.5)  # (1, N, N)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    if generator is not None:
        density = density + torch.rand(density.shape, generator=generator, dtype=density.dtype) * 1e-6
    else:
        density = density - torch.arange(n, dtype=density.dtype) * 1e-12
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)  # [b, i, j]: j denser than i
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)  # (1, k) centres, best first
    to_centres = dist_matrix[0, index_down[0]][None]  # (1, k, N)
    idx_cluster = to_centres.argmin(dim=1)  # (1, N)
    idx_cluster[0, index_down[0]] = torch.arange(cluster_num)
    weight = x.new_ones(b, n, 1)
    all_weight = weight.new_zeros(b * cluster_num, 1).index_add_(0, idx_cluster.reshape(-1), weight.reshape(-1, 1))
    all_weight = all_weight + 1e-6
    norm_weight = weight / all_weight[idx_cluster]
    merged = x.new_zeros(b * cluster_num, c).index_add_(0, idx_cluster.reshape(-1), (x * norm_weight).reshape(-1, c))
    return merged.reshape(b, cluster_num, c).to(out_dtype)


def prune_stage(
    attn: torch.Tensor,
    layer_out: torch.Tensor,
    v_start: int,
    v_num: int,
    rater_idx: torch.Tensor,
    keep: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """One pruning layer: attn (1, H, L, L) probabilities, layer_out (1, L, D) its output.

    Returns (new sequence (1, L', D), new v_token_num, kept visual indices into the stage's visual
    span (sorted), merged cluster tokens (n_clusters, D)).
    """
    text_start = v_start + v_num
    rel = attn.mean(1)[:, rater_idx + text_start, v_start : v_start + v_num].mean(1)  # (1, v_num)
    mask = torch.zeros_like(rel, dtype=torch.bool)
    _, indices = torch.topk(rel, min(keep, v_num - 1), dim=1)
    mask[0][indices] = True
    policy = torch.ones(layer_out.shape[1], dtype=torch.bool)
    policy[v_start:text_start] = mask[0]
    deleted = torch.where(~mask[0])[0]  # visual-span indices, in sequence order
    n_stage2 = int(deleted.shape[0] * 0.3) + 1
    stage2 = rel[0][deleted].topk(n_stage2)[1]  # indices into ``deleted``, best first
    sparse_tokens = layer_out[:, ~policy, :]  # the deleted tokens in sequence order
    cluster_num = int(n_stage2 / 10) + 1
    merged = cluster_and_merge(sparse_tokens[:, stage2, :], cluster_num, generator)
    kept = layer_out[:, policy, :]
    n_kept = int(mask.sum())
    new = torch.cat((kept[:, : v_start + n_kept], merged, kept[:, v_start + n_kept :]), dim=1)
    return new, n_kept + cluster_num, torch.where(mask[0])[0], merged[0]
