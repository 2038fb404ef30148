"""A BERT encoder on the real tokens only ("remove padding", as MosaicBERT and FasterTransformer).

A batch of token rows is padded to its longest row; with MOSI's sentence lengths about half of a
random batch of 32 is padding. Everything in a BERT layer but the attention itself acts on each
token alone: the Q/K/V projections, the attention output projection, the feed-forward network,
the dropouts and the LayerNorms. :func:`encode_unpadded` runs those on the packed real tokens, a
(T, H) tensor (T = the number of real tokens in the batch), and only the attention on a padded
layout (rows, heads, L, d), with the encoder's own attention function (``sdpa`` or ``eager``, as
the model is configured) and the mask the encoder's own forward builds. The attention runs in
groups of :data:`ROWS_PER_GROUP` rows of similar length (rows sorted by length), each group
padded only to its own longest row: with MOSI's lengths that is about half the attention's work
of one (B, L) layout. Padded keys are masked in BERT, so a real token never reads a padded one:
the real tokens' states equal those of the padded forward up to float rounding
(``tests/test_unpad.py``), and the states at padded positions, which nothing reads, are returned
as zeros.

The layers' own modules run (no copied weights): their Linear layers, dropouts and LayerNorms, in
train or eval mode as the encoder is. Under training the dropout masks are drawn over the (T, H)
tokens instead of the (B, L, H) layout, so seeded draws differ from the padded forward (the same
Bernoulli distribution per real element; docs/fidelity.md, "Speed options").

Which encoders: BERT-architecture models (``model_type`` bert or roberta: BERT, the packaged
MiniLM, RoBERTa) used as encoders (not decoders, no cross-attention, absolute positions). Any
other model runs its own padded forward: :func:`supports_unpad` says which.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["encode_unpadded", "supports_unpad"]

#: rows per attention group (see :func:`encode_unpadded`): 4 groups in a batch of 32
ROWS_PER_GROUP = 8


#: model types whose layers are transformers' BertLayer (or its copy: RobertaLayer)
_BERT_LIKE = ("bert", "roberta")


def supports_unpad(model: Any) -> bool:
    """True when ``model`` is a BERT-architecture encoder :func:`encode_unpadded` can run."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") not in _BERT_LIKE:
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "position_embedding_type", None) not in (None, "absolute"):
        return False
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not layers or not hasattr(model, "embeddings"):
        return False
    layer = layers[0]
    attention = getattr(getattr(layer, "attention", None), "self", None)
    return all(hasattr(attention, a) for a in ("query", "key", "value", "scaling")) and all(
        hasattr(layer, a) for a in ("intermediate", "output")
    ) and hasattr(layer.attention, "output")


def _attention_function(model: Any) -> Callable:
    """The encoder's configured attention function (``sdpa``, ``eager``, ...), as its layers pick it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    bert = __import__(type(model).__module__, fromlist=["eager_attention_forward"])
    return ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation,
                                                 bert.eager_attention_forward)


def encode_unpadded(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    *,
    before_layer: tuple[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    rows_per_group: int = ROWS_PER_GROUP,
) -> torch.Tensor:
    """The encoder's last hidden states (B, L, H), its layers run on the real tokens only.

    ``input_ids``, ``attention_mask``, ``token_type_ids``: (B, L), right- or left-padded (any
    mask). ``before_layer = (k, f)``: ``f`` maps the padded (B, L, H) input of layer k to what
    that layer reads (MAG's gate); its values at padded positions are never read. Forward hooks on
    ``model.embeddings`` run (MIRD's gate); hooks on the layers do not (they are not called as
    modules). Positions where ``attention_mask`` is 0 are zero in the result.

    ``rows_per_group``: the attention runs on groups of this many rows of similar length (the
    rows sorted by their number of real tokens), each padded only to its own longest row; the
    batch's length when ``rows_per_group >= B``.
    """
    batch, length = input_ids.shape
    embedded = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, L, H)
    hidden = embedded.shape[-1]
    valid = attention_mask > 0  # (B, L)
    index = valid.reshape(-1).nonzero().squeeze(1)  # (T,) positions of the real tokens in B·L
    groups, where = _attention_groups(model, embedded, valid, rows_per_group)
    attend = _attention_function(model)
    inject_at, inject = before_layer if before_layer is not None else (-1, None)

    if inject_at == 0:
        embedded = inject(embedded)  # (B, L, H)
    x = embedded.reshape(batch * length, hidden).index_select(0, index)  # (T, H)
    for k, layer in enumerate(model.encoder.layer):
        if k == inject_at and k > 0:
            x = inject(_scatter(x, index, batch, length)).reshape(batch * length, hidden).index_select(0, index)
        x = _layer(layer, x, groups, where, attend)  # (T, H)
    return _scatter(x, index, batch, length)  # (B, L, H)


def _attention_groups(model: Any, embedded: torch.Tensor, valid: torch.Tensor, rows_per_group: int
                      ) -> tuple[list[tuple[torch.Tensor, int, int, Any]], torch.Tensor]:
    """How the attention reads the packed tokens: per group of rows, the packed index of each of
    its (row, step) slots (n·L_g,) (a slot past the row's end reads token 0: a masked key, a query
    whose output is never read), its rows n, its length L_g and the attention mask the encoder's
    own forward builds for (n, L_g); and ``where`` (T,): each packed token's slot among the
    groups' slots, in order. A row's real tokens keep their order (the positions are already in
    the embeddings; attention over the same keys, so the same result up to float rounding). Rows
    without a real token are in no group."""
    from transformers.masking_utils import create_bidirectional_mask

    lengths = valid.sum(dim=1)  # (B,)
    offsets = lengths.cumsum(0) - lengths  # (B,) the first packed token of each row
    order = torch.sort(lengths, descending=True, stable=True).indices  # (B,)
    sorted_lengths = lengths[order].tolist()
    total = sum(sorted_lengths)
    where = torch.empty(total, dtype=torch.long, device=valid.device)  # (T,)
    groups, base = [], 0
    for start in range(0, len(sorted_lengths), max(1, rows_per_group)):
        width = sorted_lengths[start]
        rows = order[start:start + rows_per_group]
        rows = rows[lengths[rows] > 0]
        n = len(rows)
        if width == 0 or n == 0:
            break
        steps = torch.arange(width, device=valid.device)  # (L_g,)
        real = steps[None, :] < lengths[rows][:, None]  # (n, L_g)
        slots = offsets[rows][:, None] + steps[None, :]  # (n, L_g)
        where[slots[real]] = base + torch.arange(n * width, device=valid.device).view(n, width)[real]
        mask = create_bidirectional_mask(config=model.config, inputs_embeds=embedded[:n, :width],
                                         attention_mask=real.long())
        groups.append((torch.where(real, slots, 0).reshape(-1), n, width, mask))
        base += n * width
    return groups, where


def _scatter(x: torch.Tensor, index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Packed rows (T, W) back to the padded layout (B, L, W), zeros at the padded positions."""
    out = x.new_zeros(batch * length, x.shape[1]).index_copy(0, index, x)  # (B·L, W)
    return out.view(batch, length, x.shape[1])


def _layer(layer: Any, x: torch.Tensor, groups: list, where: torch.Tensor, attend: Callable
           ) -> torch.Tensor:
    """One BertLayer on the packed tokens x (T, H) -> (T, H)."""
    self_attn = layer.attention.self
    heads, head_dim = self_attn.num_attention_heads, self_attn.attention_head_size
    width = heads * head_dim
    dropout = self_attn.dropout.p if self_attn.training else 0.0
    qkv = torch.cat([self_attn.query(x), self_attn.key(x), self_attn.value(x)], dim=1)  # (T, 3·W)
    contexts = []
    for slots, n, length, mask in groups:
        padded = qkv.index_select(0, slots).view(n, length, 3, heads, head_dim)  # (n, L_g, 3, h, d)
        q, k, v = padded.permute(2, 0, 3, 1, 4)  # (n, h, L_g, d) each
        context, _ = attend(self_attn, q, k, v, mask, dropout=dropout,
                            scaling=self_attn.scaling)  # (n, L_g, h, d)
        contexts.append(context.reshape(n * length, width))
    context = (torch.cat(contexts) if contexts else qkv.new_zeros(0, width)).index_select(0, where)  # (T, W)
    attended = layer.attention.output(context, x)  # (T, H): dense, dropout, LayerNorm(+ x)
    return layer.output(layer.intermediate(attended), attended)  # (T, H): FFN, dropout, LayerNorm
