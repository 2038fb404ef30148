"""A BERT encoder on the real tokens only ("remove padding", as MosaicBERT and FasterTransformer).

A batch of token rows is padded to its longest row; with MOSI's sentence lengths about half of a
random batch of 32 is padding. Everything in a BERT layer but the attention itself acts on each
token alone: the Q/K/V projections, the attention output projection, the feed-forward network,
the dropouts and the LayerNorms. :func:`encode_unpadded` runs those on the packed real tokens, a
(T, H) tensor (T = the number of real tokens in the batch), and only the attention on the padded
layout (B, heads, L, d), with the encoder's own attention function (``sdpa`` or ``eager``, as
the model is configured) and the same attention mask. Padded keys are masked in BERT, so a real
token never reads a padded one: the real tokens' states equal those of the padded forward up to
float rounding (``tests/test_unpad.py``), and the states at padded positions, which nothing
reads, are returned as zeros.

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
) -> torch.Tensor:
    """The encoder's last hidden states (B, L, H), its layers run on the real tokens only.

    ``input_ids``, ``attention_mask``, ``token_type_ids``: (B, L), right- or left-padded (any
    mask). ``before_layer = (k, f)``: ``f`` maps the padded (B, L, H) input of layer k to what
    that layer reads (MAG's gate); its values at padded positions are never read. Forward hooks on
    ``model.embeddings`` run (MIRD's gate); hooks on the layers do not (they are not called as
    modules). Positions where ``attention_mask`` is 0 are zero in the result.
    """
    batch, length = input_ids.shape
    embedded = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, L, H)
    hidden = embedded.shape[-1]
    valid = attention_mask > 0  # (B, L)
    # a row without any real token is all zeros (its padded attention never reaches a result)
    index = valid.reshape(-1).nonzero().squeeze(1)  # (T,) positions of the real tokens in B·L
    mask = _attention_mask(model, embedded, attention_mask)
    attend = _attention_function(model)
    layers = model.encoder.layer
    inject_at, inject = before_layer if before_layer is not None else (-1, None)

    if inject_at == 0:
        embedded = inject(embedded)  # (B, L, H)
    x = embedded.reshape(batch * length, hidden).index_select(0, index)  # (T, H)
    for k, layer in enumerate(layers):
        if k == inject_at and k > 0:
            x = inject(_scatter(x, index, batch, length)).reshape(batch * length, hidden).index_select(0, index)
        x = _layer(layer, x, index, batch, length, mask, attend)  # (T, H)
    return _scatter(x, index, batch, length)  # (B, L, H)


def _attention_mask(model: Any, embedded: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The 4-d mask the encoder's own forward builds for its attention implementation."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.config, inputs_embeds=embedded,
                                     attention_mask=attention_mask)


def _scatter(x: torch.Tensor, index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Packed rows (T, W) back to the padded layout (B, L, W), zeros at the padded positions."""
    out = x.new_zeros(batch * length, x.shape[1]).index_copy(0, index, x)  # (B·L, W)
    return out.view(batch, length, x.shape[1])


def _layer(layer: Any, x: torch.Tensor, index: torch.Tensor, batch: int, length: int,
           mask: Any, attend: Callable) -> torch.Tensor:
    """One BertLayer on the packed tokens x (T, H) -> (T, H)."""
    self_attn = layer.attention.self
    heads, head_dim = self_attn.num_attention_heads, self_attn.attention_head_size
    width = heads * head_dim
    qkv = torch.cat([self_attn.query(x), self_attn.key(x), self_attn.value(x)], dim=1)  # (T, 3·W)
    padded = _scatter(qkv, index, batch, length)  # (B, L, 3·W)
    q, k, v = padded.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (B, h, L, d) each
    context, _ = attend(self_attn, q, k, v, mask,
                        dropout=self_attn.dropout.p if self_attn.training else 0.0,
                        scaling=self_attn.scaling)  # (B, L, h, d)
    context = context.reshape(batch * length, width).index_select(0, index)  # (T, W)
    attended = layer.attention.output(context, x)  # (T, H): dense, dropout, LayerNorm(+ x)
    return layer.output(layer.intermediate(attended), attended)  # (T, H): FFN, dropout, LayerNorm
