"""The heads on the encoder of any family (`make_encoder`): pretraining (masked LM + next
sentence or sentence order), masked LM alone, sequence classification / regression, token
classification, multiple choice and extractive question answering."""

import jax
import jax.numpy as jnp
from flax import nnx, struct

from bert_jax import axes
from bert_jax.models import attention, layers
from bert_jax.models.config import BertConfig
from bert_jax.models.encoder import EncoderOutput, _layer_kwargs, _weight_kwargs
from bert_jax.models.modern import PredictionHead, make_encoder


@struct.dataclass
class PretrainingOutput:
    """mlm_logits [B, P, V] float32 at the masked positions; nsp_logits [B, 2] float32."""

    mlm_logits: jax.Array
    nsp_logits: jax.Array
    encoder: EncoderOutput


class _MaskedLMModel(nnx.Module):
    """The encoder plus the masked-LM head (dense + activation + LayerNorm, then the decoder
    tied to the word embeddings and a per-token output bias), shared by the pretraining and
    masked-LM models so that their weights have the same names."""

    def _init_encoder_and_mlm(self, config: BertConfig, rngs: nnx.Rngs, add_pooling_layer: bool):
        kw = dict(init_std=config.initializer_range, rngs=rngs, **_weight_kwargs(config))
        d, e = config.hidden_size, config.embed_dim
        self.bert = make_encoder(config, rngs=rngs, add_pooling_layer=add_pooling_layer)
        # ALBERT maps to the factorized size E, where the tied decoder lives.
        out_axis = axes.MLP if e == d else None
        self.transform = layers.Dense(
            d, e, kernel_axes=(axes.EMBED, out_axis), use_bias=config.use_bias, **kw
        )
        self.transform_layer_norm = layers.LayerNorm(
            e,
            epsilon=config.layer_norm_eps,
            rngs=rngs,
            use_bias=config.use_bias,
            **_layer_kwargs(config),
        )
        self.output_bias = layers.param(
            jnp.zeros((config.vocab_size,), jnp.dtype(config.param_dtype)), (axes.VOCAB,)
        )
        self.hidden_act = config.hidden_act

    def mlm_logits(self, sequence_output: jax.Array, positions: jax.Array | None) -> jax.Array:
        """[B, P, V] float32 logits at `positions` ([B, P] int32), or at every position."""
        h = sequence_output
        if positions is not None:
            # Only the P masked positions go through the head: never [B, L, V] logits.
            h = attention.gather(h, positions)
        h = self.transform_layer_norm(layers.activation(self.hidden_act, self.transform(h)))
        logits = self.bert.embeddings.word_embeddings.attend(h).astype(jnp.float32)
        return logits + self.output_bias[...].astype(jnp.float32)


class BertForPreTraining(_MaskedLMModel):
    """BERT with the masked-LM head (tied decoder) and the next-sentence head."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self._init_encoder_and_mlm(config, rngs, add_pooling_layer=True)
        kw = dict(init_std=config.initializer_range, rngs=rngs, **_weight_kwargs(config))
        self.seq_relationship = layers.Dense(
            config.hidden_size, 2, kernel_axes=(axes.EMBED, None), **kw
        )

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        masked_lm_positions: jax.Array,
        *,
        only_predicted_positions: bool = False,
        **kwargs,
    ) -> PretrainingOutput:
        """Runs the encoder, then the MLM head on the masked positions only.

        Args:
          input_ids, input_mask, segment_ids: [B, L] as in `BertModel`.
          masked_lm_positions: [B, P] int32 positions whose tokens are predicted (padded
            entries point anywhere; their loss weight is 0).
          only_predicted_positions: the last layer computes only what the heads read, [CLS]
            and the masked positions (the same logits, a tenth of that layer's work at the
            usual 15% masking); `encoder.sequence_output` is then [B, 1 + P, D].
          kwargs: as in `BertModel` (rng, deterministic, output_*, head_mask).
        """
        if only_predicted_positions:
            cls = jnp.zeros_like(masked_lm_positions[:, :1])
            queries = jnp.concatenate([cls, masked_lm_positions], axis=1)
            enc = self.bert(input_ids, input_mask, segment_ids, query_positions=queries, **kwargs)
            mlm_logits = self.mlm_logits(enc.sequence_output[:, 1:], None)
        else:
            enc = self.bert(input_ids, input_mask, segment_ids, **kwargs)
            mlm_logits = self.mlm_logits(enc.sequence_output, masked_lm_positions)
        nsp_logits = self.seq_relationship(enc.pooled_output).astype(jnp.float32)
        return PretrainingOutput(mlm_logits, nsp_logits, enc)


class BertForMaskedLM(_MaskedLMModel):
    """BERT with the masked-LM head only and no pooler (Hugging Face's `BertForMaskedLM`)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self._init_encoder_and_mlm(config, rngs, add_pooling_layer=False)

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        masked_lm_positions: jax.Array | None = None,
        **kwargs,
    ) -> tuple[jax.Array, EncoderOutput]:
        """(MLM logits [B, P, V] float32 at the positions, or [B, L, V] without them; encoder
        output). Keyword arguments as in `BertModel`."""
        enc = self.bert(input_ids, input_mask, segment_ids, **kwargs)
        return self.mlm_logits(enc.sequence_output, masked_lm_positions), enc


class _DenseHead(nnx.Module):
    """The shared shape of the classifier heads: BERT, dropout, and a dense layer of `outputs`
    scores on the pooled output (`pooled`) or on every token's output."""

    def _init_head(
        self,
        config: BertConfig,
        outputs: int,
        rngs: nnx.Rngs,
        classifier_dropout: float | None,
        pooled: bool,
    ) -> None:
        if not isinstance(outputs, int) or outputs < 1:
            raise ValueError(f"num_labels must be a positive integer, got {outputs!r}")
        self.bert = make_encoder(config, rngs=rngs, add_pooling_layer=pooled)
        self.token_head = _token_head(config, rngs) if not pooled else None
        self.classifier = layers.Dense(
            config.hidden_size,
            outputs,
            kernel_axes=(axes.EMBED, None),
            init_std=config.initializer_range,
            rngs=rngs,
            **_weight_kwargs(config),
        )
        self.dropout_rate = (
            config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        )

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        **kwargs,
    ) -> tuple[jax.Array, EncoderOutput]:
        """(float32 logits, encoder output): [B, outputs] from the pooled output ([B, K,
        outputs] with `packing`), or [B, L, outputs] from every token's output without a
        pooler; arguments as in `BertModel`."""
        enc_key, drop_key = (None, None) if rng is None else jax.random.split(rng)
        enc = self.bert(
            input_ids, input_mask, segment_ids, rng=enc_key, deterministic=deterministic, **kwargs
        )
        hidden = enc.sequence_output if self.bert.pooler is None else enc.pooled_output
        if self.token_head is not None:
            hidden = self.token_head(hidden)
        hidden = layers.dropout(hidden, self.dropout_rate, drop_key, deterministic)
        return self.classifier(hidden).astype(jnp.float32), enc


class _LabelHead(_DenseHead):
    """A `_DenseHead` of `num_labels` scores, on the pooled output when the class says
    `pooled`, else on every token's output."""

    pooled: bool

    def __init__(
        self,
        config: BertConfig,
        num_labels: int = 2,
        *,
        rngs: nnx.Rngs,
        classifier_dropout: float | None = None,
    ):
        self.num_labels = num_labels
        self._init_head(config, num_labels, rngs, classifier_dropout, pooled=self.pooled)


class BertForSequenceClassification(_LabelHead):
    """BERT with dropout and a dense layer on the pooled output: `num_labels` classes, or a
    regression score when `num_labels` is 1 (STS-B). Called as `_DenseHead`: logits
    [B, num_labels], or [B, K, num_labels] for a packed batch."""

    pooled = True


class BertForTokenClassification(_LabelHead):
    """BERT with dropout and a dense layer on every token's output: `num_labels` scores per
    token (named entities; `transformers`' BertForTokenClassification; no pooler). Called as
    `_DenseHead`: logits [B, L, num_labels]."""

    pooled = False


class BertForMultipleChoice(_DenseHead):
    """BERT scoring each of several (context, choice) rows by a dense layer on its pooled
    output (SWAG; `transformers`' BertForMultipleChoice): inputs [B, C, L], logits [B, C]."""

    def __init__(
        self, config: BertConfig, *, rngs: nnx.Rngs, classifier_dropout: float | None = None
    ):
        self._init_head(config, 1, rngs, classifier_dropout, pooled=True)

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
        **kwargs,
    ) -> tuple[jax.Array, EncoderOutput]:
        """(logits [B, C] float32, the encoder output over the B * C rows); inputs [B, C, L],
        keyword arguments as in `BertModel`."""
        batch, choices, length = input_ids.shape
        flat = [x.reshape(batch * choices, length) for x in (input_ids, input_mask, segment_ids)]
        logits, enc = super().__call__(*flat, rng=rng, deterministic=deterministic, **kwargs)
        return logits.reshape(batch, choices), enc


class BertForQuestionAnswering(nnx.Module):
    """BERT with a dense layer on every token's output giving a start and an end score
    (extractive QA, as `transformers`' BertForQuestionAnswering; no pooler)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.bert = make_encoder(config, rngs=rngs, add_pooling_layer=False)
        self.token_head = _token_head(config, rngs)
        self.qa_outputs = layers.Dense(
            config.hidden_size,
            2,
            kernel_axes=(axes.EMBED, None),
            init_std=config.initializer_range,
            rngs=rngs,
            **_weight_kwargs(config),
        )

    def __call__(
        self,
        input_ids: jax.Array,
        input_mask: jax.Array,
        segment_ids: jax.Array,
        **kwargs,
    ) -> tuple[jax.Array, jax.Array, EncoderOutput]:
        """(start logits [B, L], end logits [B, L], both float32, encoder output); keyword
        arguments as in `BertModel`."""
        enc = self.bert(input_ids, input_mask, segment_ids, **kwargs)
        hidden = enc.sequence_output
        if self.token_head is not None:
            hidden = self.token_head(hidden)
        logits = self.qa_outputs(hidden).astype(jnp.float32)
        return logits[..., 0], logits[..., 1], enc


def _token_head(config: BertConfig, rngs: nnx.Rngs) -> PredictionHead | None:
    """ModernBERT's per-token heads put its prediction head (dense, activation, norm) before
    their last dense layer; BERT's read the encoder's output directly."""
    return PredictionHead(config, rngs=rngs) if config.model_type == "modernbert" else None
