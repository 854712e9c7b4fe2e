"""Runs a `transformers` BERT/ALBERT model and the matching bert_jax model on one padded batch
and compares every output: the shared core of the conversion tests."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bert_jax import convert, models
from bert_jax.models import registry


def padded_batch(vocab_size: int, pad_id: int = 0, types: int = 2):
    """Three rows of 10, 6 and 3 real tokens (then `pad_id`), two segments each (one where
    the model has `types` = 1), three masked positions."""
    lengths = np.array([10, 6, 3])
    ids = np.random.default_rng(0).integers(5, vocab_size, size=(3, 10))
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    segments = ((np.arange(10)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    positions = np.array([[1, 4, 9], [1, 2, 5], [1, 2, 0]], np.int32)
    ids = np.where(mask, ids, pad_id).astype(np.int32)
    return ids, mask, segments * (types > 1), positions


def torch_outputs(model, architecture: str, vocab_size: int) -> dict[str, np.ndarray]:
    """Hidden states of every layer, pooled output (when there is a pooler) and head logits
    (MLM logits at the masked positions for pretraining, everywhere for masked LM)."""
    config = model.config
    types = getattr(config, "type_vocab_size", 0)  # ModernBERT takes no token types
    ids, mask, segments, positions = padded_batch(vocab_size, config.pad_token_id or 0, types)
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    if types:
        inputs["token_type_ids"] = torch.tensor(segments, dtype=torch.long)
    head_name = registry.head_of(architecture)
    with torch.no_grad():
        base = model if head_name == "Model" else model.base_model
        enc = base(**inputs, output_hidden_states=True)
        out = {"hidden": np.stack([h.numpy() for h in enc.hidden_states])}
        if getattr(enc, "pooler_output", None) is not None:  # the masked-LM models have none
            out["pooled"] = enc.pooler_output.numpy()
        elif architecture.startswith("ModernBert") and head_name in _POOLED:
            out["pooled"] = _modernbert_pooled(model, enc.last_hidden_state, inputs).numpy()
        elif architecture.endswith("RobertaForSequenceClassification"):  # its head's first half
            first = enc.last_hidden_state[:, 0]
            out["pooled"] = torch.tanh(model.classifier.dense(first)).numpy()
        if head_name == "ForPreTraining":
            head = model(**inputs)
            out["mlm"] = np.take_along_axis(
                head.prediction_logits.numpy(), positions[..., None], axis=1
            )
            sentence = getattr(head, "seq_relationship_logits", None)
            out["sentence"] = (head.sop_logits if sentence is None else sentence).numpy()
        elif head_name == "ForMaskedLM":
            out["mlm"] = model(**inputs).logits.numpy()
        elif head_name in ("ForSequenceClassification", "ForTokenClassification"):
            out["logits"] = model(**inputs).logits.numpy()
        elif head_name == "ForMultipleChoice":  # the three rows as three choices of one example
            out["logits"] = model(**{k: v[None] for k, v in inputs.items()}).logits.numpy()
        elif head_name == "ForQuestionAnswering":
            head = model(**inputs)
            out["start"], out["end"] = head.start_logits.numpy(), head.end_logits.numpy()
    return out


_POOLED = ("ForSequenceClassification", "ForMultipleChoice")


def _modernbert_pooled(model, last, inputs):
    """ModernBERT's classifiers pool ([CLS] or the mean of the real tokens), then its head."""
    if model.config.classifier_pooling == "cls":
        return model.head(last[:, 0])
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return model.head((last * mask).sum(1) / mask.sum(1))


def jax_outputs(
    config, architecture: str, params, num_labels: int = 3, pad_id: int | None = None
) -> dict:
    """The same outputs from bert_jax params for `architecture` (padding with `pad_id`,
    default: the family's)."""
    pad_id = max(config.position_offset - 1, 0) if pad_id is None else pad_id
    ids, mask, segments, positions = padded_batch(config.vocab_size, pad_id, config.type_vocab_size)
    cls = convert.model_class(architecture, num_labels)
    graphdef, _ = models.split_params(models.abstract_model(config, cls))
    model = models.merge_params(graphdef, jax.tree.map(jnp.asarray, jax.device_get(params)))
    head_name = registry.head_of(architecture)
    kw = dict(output_hidden_states=True)
    if head_name == "Model":
        enc, out = model(ids, mask, segments, **kw), {}
    elif head_name == "ForPreTraining":
        res = model(ids, mask, segments, positions, **kw)
        enc, out = res.encoder, {"mlm": res.mlm_logits, "sentence": res.nsp_logits}
    elif head_name == "ForMultipleChoice":
        logits, enc = model(ids[None], mask[None], segments[None], **kw)
        out = {"logits": logits}
    elif head_name == "ForQuestionAnswering":
        start, end, enc = model(ids, mask, segments, **kw)
        out = {"start": start, "end": end}
    else:
        logits, enc = model(ids, mask, segments, **kw)
        out = {"mlm" if head_name == "ForMaskedLM" else "logits": logits}
    out["hidden"] = enc.hidden_states
    if enc.pooled_output is not None:
        out["pooled"] = enc.pooled_output
    return out


def assert_same(ours: dict, ref: dict, atol: float = 1e-5) -> None:
    assert sorted(ours) == sorted(ref)
    for key in ref:
        np.testing.assert_allclose(np.asarray(ours[key]), ref[key], atol=atol, rtol=0, err_msg=key)


def write_pair_task(tmp_path) -> list[list[str]]:
    """An MRPC-shaped task the second sentence decides ("good" or "bad" in it), 400 training
    and 80 dev rows under tmp_path/glue/MRPC; the rows."""
    import glue_data

    rng = np.random.default_rng(1)
    rows = [
        [str(i % 2), "a", "b", glue_data.sentence(rng)]
        + [glue_data.sentence(rng, "good" if i % 2 else "bad")]
        for i in range(480)
    ]
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    glue_data.write_tsv(tmp_path / "glue/MRPC/train.tsv", header, rows[:400])
    glue_data.write_tsv(tmp_path / "glue/MRPC/dev.tsv", header, rows[400:])
    glue_data.write_tsv(
        tmp_path / "glue/MRPC/test.tsv", ["index", *header[1:]], [["0", "a", "b", "w1", "good w2"]]
    )
    return rows


def fine_tune_and_compare(tmp_path, model_dir, rows, architecture: str) -> None:
    """finetune.py on the pair task from the Hugging Face directory `model_dir`: dev accuracy
    >= 0.95, and the run exported to `transformers` (as `architecture`) gives the same."""
    import os
    import sys

    import glue_data
    import pytest
    import transformers

    from bert_jax import sharding

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import finetune

    cfg = glue_data.finetune_config(
        init_from=f"hf:{model_dir}",
        tasks=("mrpc",),
        data_dir=str(tmp_path / "glue"),
        max_seq_length=32,
        num_epochs=8.0,  # byte-level pieces: about twice BERT's per word, learned later
        batch_size=16,
        learning_rates=(5e-4,),
    )
    mesh = sharding.make_mesh(cfg.mesh)
    (run,) = finetune.finetune_task(cfg, "mrpc", mesh, str(tmp_path / "work"))["runs"]
    assert run["dev"]["dev"]["accuracy"] >= 0.95, run["history"]

    from bert_jax.convert import __main__ as convert_cli

    convert_cli.main(["export-hf", run["directory"], str(tmp_path / "exported")])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported")
    assert type(model).__name__ == architecture
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    dev = rows[400:]
    batch = hf_tok([r[3] for r in dev], [r[4] for r in dev], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model.eval()(**batch).logits.argmax(-1).numpy()
    accuracy = float(np.mean(predicted == np.array([int(r[0]) for r in dev])))
    assert accuracy == pytest.approx(run["dev"]["dev"]["accuracy"], abs=1e-9)
