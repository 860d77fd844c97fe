"""GLIP's language backbone: BERT over the padded prompt (SPEC 1.3).

The official module is `language_backbone.body.model`, a HF `BertModel` without pooler. It is
built here from a `BertConfig` (never downloaded): official checkpoints carry the weights.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import BertConfig, BertModel

from model.config import LanguageConfig


def bert_config(config: LanguageConfig) -> BertConfig:
    return BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act="gelu",
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        type_vocab_size=2,
    )


class BertBody(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        bert = bert_config(config)
        bert._attn_implementation = "eager"  # exact softmax attention, as the official BERT
        self.model = BertModel(bert, add_pooling_layer=False)


class LanguageBackbone(nn.Module):
    """forward(input_ids [B, L], attention_mask [B, L]) -> dict:
    hidden [B, L, D] last layer, embedded [B, L, D] (hidden * mask), masks [B, L],
    aggregate [B, D] masked mean."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.body = BertBody(config)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """BERT's own switch: recompute each layer's activations in the backward pass."""
        if enabled:
            self.body.model.gradient_checkpointing_enable()
        else:
            self.body.model.gradient_checkpointing_disable()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        out = self.body.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        mask = attention_mask.to(hidden.dtype)
        embedded = hidden * mask.unsqueeze(-1)
        aggregate = embedded.sum(1) / mask.sum(-1, keepdim=True).clamp(min=1)
        return {"hidden": hidden, "embedded": embedded, "masks": attention_mask, "aggregate": aggregate}
