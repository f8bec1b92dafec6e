"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): attention_scoring="linear".

softmax(q . k) is replaced by phi(q) . phi(k) with phi(x) = elu(x) + 1 (positive), so that

    out_i = phi(q_i)^T S_i / phi(q_i)^T z_i,   S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j)

over the keys j that query i may see. S and z are carried together as one (d, d_v + 1) matrix (a column
of ones appended to the values gives the denominator in the same product). Bidirectional: one K^T V
product per row. Causal: the sums are cumulative; they are computed in chunks of `chunk` tokens (the
pairs inside a chunk as a small masked product, the earlier chunks through their summed states), so that
time and memory grow as n * d^2, never n^2. Packed documents (position ids restarting at 0) each get
their own sums; padding keys contribute nothing. A generating decoder keeps S and z as a constant-size
recurrent state in transformers' linear-attention cache layer instead of a growing KV cache.

Computed in float32 (with autocast off): cumulative sums of thousands of terms lose too much in bf16.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_twinlm import TwinLMConfig

# Tokens per chunk of the causal (and packed-document) computation: the (chunk x chunk) products inside a
# chunk cost n * chunk * d, the states between chunks n * d^2 / chunk; 64 balances them at head_dim 64.
LINEAR_CHUNK = 64


class LinearScoring(nn.Module):
    """phi(x) = elu(x) + 1: the positive feature map of linear attention (no parameters)."""

    def __init__(self, config: TwinLMConfig):
        super().__init__()

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x.float()) + 1.0


@dataclass
class LinearMask:
    """What a linear-attention layer needs to know about the batch: direction, padding, documents."""

    is_causal: bool
    key_real: torch.Tensor | None = None  # (batch, q_len) bool: False for padding (zero features)
    documents: torch.Tensor | None = None  # (batch, q_len) document id per token (packed rows, no cache past)
    chunk: int = LINEAR_CHUNK
    can_select_queries = False

    def attend(self, attention, query, key, value, cache, dropout, output_attentions, **kwargs):
        """Linear attention of this forward's tokens, after the cache's recurrent state (which then holds the
        sums over every token so far). `dropout` is always 0 (the config refuses attention dropout)."""
        groups = query.shape[1] // key.shape[1]
        key, value = (x.repeat_interleave(groups, dim=1) if groups > 1 else x for x in (key, value))
        layer = attention.layer_idx
        state = cache.get_recurrent_state(layer) if cache is not None else None
        state = state.clone() if state is not None else None  # the cache overwrites its tensor in place
        with torch.autocast(query.device.type, enabled=False):
            phi_q = attention.scoring.feature_map(query)
            phi_k = attention.scoring.feature_map(key)
            if self.key_real is not None:
                phi_k = phi_k * self.key_real[:, None, :, None]
            if output_attentions:  # the weights exist only written out: O(n^2)
                output, weights = self.written_out(phi_q, phi_k, value.float(), state)
                new_state = None if cache is None else _state(phi_k, value.float(), state)
            else:
                output, new_state = linear_attention(
                    phi_q,
                    phi_k,
                    value.float(),
                    self.is_causal,
                    self.documents,
                    chunk=self.chunk,
                    state=state,
                    return_state=cache is not None,
                )
                weights = None
        if cache is not None:
            cache.update_recurrent_state(new_state, layer)
            # The cache counts tokens (get_seq_length, what generate() and the positions read) through its
            # convolution state; linear attention has no convolution: a zero-channel state carries the count.
            cache.update_conv_state(
                query.new_zeros(query.shape[0], 0, query.shape[2]), layer, conv_kernel_size=1
            )
        output = output.to(value.dtype)
        weights = weights.to(value.dtype) if weights is not None else None
        return output.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1), weights

    def written_out(self, phi_q, phi_k, value, state):
        """out = A v with A_ij = phi(q_i).phi(k_j) / sum_j', over the pairs that may attend: the weights, for
        output_attentions (the cache's earlier tokens add to the denominator but have no column)."""
        n = phi_q.shape[-2]
        weights = phi_q @ phi_k.transpose(-1, -2)
        allowed = torch.ones(n, n, dtype=torch.bool, device=phi_q.device)
        if self.is_causal:
            allowed = allowed.tril()
        if self.documents is not None:
            allowed = allowed & (self.documents[:, :, None] == self.documents[:, None, :])[:, None]
        weights = weights * allowed
        numerator, denominator = weights @ value, weights.sum(-1, keepdim=True)
        if state is not None:
            numerator, denominator = (
                numerator + phi_q @ state[..., :-1],
                denominator + phi_q @ state[..., -1:],
            )
        denominator = torch.where(denominator > 0, denominator, 1.0)
        return numerator / denominator, weights / denominator


def _state(phi_k: torch.Tensor, value: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """The sums over every key so far, (batch, heads, d, d_v + 1): the recurrent state."""
    total = phi_k.transpose(-1, -2) @ F.pad(value, (0, 1), value=1.0)
    return total if state is None else total + state


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    value: torch.Tensor,
    is_causal: bool,
    documents: torch.Tensor | None = None,
    chunk: int = LINEAR_CHUNK,
    state: torch.Tensor | None = None,
    return_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention of features phi_q, phi_k (batch, heads, n, d) (zero for padding keys) and values
    (batch, heads, n, d_v). `documents` (batch, n): tokens attend only within their document. `state`
    (batch, heads, d, d_v + 1): the sums over earlier tokens (a cache; causal), seen by every query.
    Returns the output (batch, heads, n, d_v) (0 for a query that sees no key) and, if asked, the new state."""
    value_one = F.pad(value, (0, 1), value=1.0)  # the last column sums phi(k): the denominator
    if is_causal or documents is not None:
        numerator, total = _chunked(phi_q, phi_k, value_one, is_causal, documents, chunk)
    else:  # every query sees every key: one K^T V product per row
        total = phi_k.transpose(-1, -2) @ value_one
        numerator = phi_q @ total
    if state is not None:
        numerator, total = numerator + phi_q @ state, total + state
    denominator = numerator[..., -1:]
    output = numerator[..., :-1] / torch.where(denominator > 0, denominator, 1.0)
    return output, total if return_state else None


def _chunked(phi_q, phi_k, value_one, is_causal, documents, chunk):
    """Chunks of `chunk` tokens: inside a chunk a masked (chunk x chunk) product, across chunks the summed
    states of the chunks before (and, bidirectional, after) that belong to the query's document."""
    b, h, n, d = phi_q.shape
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    q, k, v = (F.pad(x, (0, 0, 0, pad)).view(b, h, chunks, chunk, -1) for x in (phi_q, phi_k, value_one))
    doc = None
    if documents is not None:  # padding past n: a document of its own (its keys are zero anyway)
        doc = F.pad(documents, (0, pad), value=-1).view(b, chunks, chunk)
    inside = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device)
    inside = inside.tril() if is_causal else inside
    if doc is not None:
        inside = inside & (doc[..., :, None] == doc[..., None, :])[:, None]  # (b, 1, chunks, c, c)
    numerator = ((q @ k.transpose(-1, -2)) * inside) @ v
    kv = k.transpose(-1, -2) @ v  # (b, h, chunks, d, d_v + 1): each chunk's sums
    numerator = numerator + _earlier_chunks(q, k, v, kv, doc)
    if not is_causal:  # the chunks after: the same computation on the reversed sequence, reversed back
        reverse = lambda x: x.flip(2, 3)  # noqa: E731  (chunks and the tokens in them)
        later = _earlier_chunks(
            reverse(q), reverse(k), reverse(v), kv.flip(2), None if doc is None else doc.flip(1, 2)
        )
        numerator = numerator + reverse(later)
    return numerator.view(b, h, chunks * chunk, -1)[:, :, :n], kv.sum(2)


def _earlier_chunks(q, k, v, kv, doc):
    """What each query gets from the keys of the chunks before its own, within its document: (b, h,
    chunks, c, d_v + 1). Without documents, the sum of all earlier chunks' states (a cumulative sum).
    With documents, only the document that runs across the chunk's start reaches back: its keys are the
    tail of the last chunk r < c in which a document starts (from that start on) plus every chunk after r
    (tail(r) + P(c) - P(r + 1), P the cumulative sum), and only the queries of that document see them."""
    zero = torch.zeros_like(kv[:, :, :1])
    before = torch.cat([zero, kv.cumsum(2)], dim=2)  # before[c] = sum of chunks < c
    if doc is None:
        return q @ before[:, :, :-1]
    b, chunks, c = doc.shape
    # the keys of a chunk from its last document start on: those of the document its last token is in
    in_tail = doc == doc[..., -1:]
    tail = torch.cat([zero, k.transpose(-1, -2) @ (v * in_tail[:, None, ..., None])], dim=2)
    previous = torch.cat(
        [doc.new_full((b, 1), -2), doc[:, :-1, -1]], dim=1
    )  # last document id of chunk c - 1
    starts = (doc[..., 1:] != doc[..., :-1]).any(-1) | (doc[..., 0] != previous)  # a document starts in chunk
    chunk_index = torch.arange(chunks, device=doc.device)
    last_start = torch.where(starts, chunk_index, -1).cummax(1).values  # r(c) inclusive of c
    r = torch.cat([doc.new_full((b, 1), -1), last_start[:, :-1]], dim=1) + 1  # (b, chunks): r(c) + 1

    def at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # x (b, h, chunks + 1, d, e) at (b, chunks)
        return x.gather(2, index[:, None, :, None, None].expand(-1, x.shape[1], -1, *x.shape[-2:]))

    carried = at(tail, r) + before[:, :, :-1] - at(before, r)
    continues = (doc == previous[..., None])[
        :, None, ..., None
    ]  # the query's document began before the chunk
    return (q @ carried) * continues
