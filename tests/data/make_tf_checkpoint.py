"""Writes `tests/data/tf_bert/`: a tiny BERT checkpoint saved by TensorFlow itself.

The variables carry the names and shapes of google-research/bert's `modeling.py` (plus an
optimizer's `adam_m`/`adam_v` slots and `global_step`, as in released and fine-tuned
checkpoints). Values come from `fixture_values()`, a seeded numpy generator that the tests
call too, so the reader is checked against files that TensorFlow wrote.

    pip install tensorflow-cpu && python tests/data/make_tf_checkpoint.py [OUT_DIR]
"""

import json
import os
import sys

import numpy as np

CONFIG = dict(
    vocab_size=40,
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=16,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=16,
    type_vocab_size=2,
    initializer_range=0.02,
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]


def variable_shapes(c: dict = CONFIG) -> dict[str, tuple[int, ...]]:
    """google-research/bert variable names -> shapes (kernels are [in, out])."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes = {
        "bert/embeddings/word_embeddings": (v, h),
        "bert/embeddings/token_type_embeddings": (c["type_vocab_size"], h),
        "bert/embeddings/position_embeddings": (c["max_position_embeddings"], h),
        "bert/embeddings/LayerNorm/gamma": (h,),
        "bert/embeddings/LayerNorm/beta": (h,),
        "bert/pooler/dense/kernel": (h, h),
        "bert/pooler/dense/bias": (h,),
        "cls/predictions/transform/dense/kernel": (h, h),
        "cls/predictions/transform/dense/bias": (h,),
        "cls/predictions/transform/LayerNorm/gamma": (h,),
        "cls/predictions/transform/LayerNorm/beta": (h,),
        "cls/predictions/output_bias": (v,),
        "cls/seq_relationship/output_weights": (2, h),
        "cls/seq_relationship/output_bias": (2,),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"bert/encoder/layer_{i}"
        for name in ("query", "key", "value"):
            shapes[f"{p}/attention/self/{name}/kernel"] = (h, h)
            shapes[f"{p}/attention/self/{name}/bias"] = (h,)
        shapes[f"{p}/attention/output/dense/kernel"] = (h, h)
        shapes[f"{p}/attention/output/dense/bias"] = (h,)
        shapes[f"{p}/attention/output/LayerNorm/gamma"] = (h,)
        shapes[f"{p}/attention/output/LayerNorm/beta"] = (h,)
        shapes[f"{p}/intermediate/dense/kernel"] = (h, f)
        shapes[f"{p}/intermediate/dense/bias"] = (f,)
        shapes[f"{p}/output/dense/kernel"] = (f, h)
        shapes[f"{p}/output/dense/bias"] = (h,)
        shapes[f"{p}/output/LayerNorm/gamma"] = (h,)
        shapes[f"{p}/output/LayerNorm/beta"] = (h,)
    return shapes


def fixture_values(c: dict = CONFIG) -> dict[str, np.ndarray]:
    """The model variables' values; LayerNorm gammas near 1, everything else ~N(0, 0.5)."""
    rng = np.random.default_rng(20181031)
    values = {}
    for name, shape in variable_shapes(c).items():
        x = rng.normal(0.0, 0.5, shape).astype(np.float32)
        values[name] = (1.0 + 0.2 * x) if name.endswith("gamma") else x
    return values


def main(out_dir: str) -> None:
    import tensorflow as tf

    os.makedirs(out_dir, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        values = fixture_values()
        for name, value in values.items():
            tf.compat.v1.get_variable(name, initializer=tf.constant(value))
            for slot in ("adam_m", "adam_v"):
                tf.compat.v1.get_variable(f"{name}/{slot}", initializer=tf.zeros_like(value))
        tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, os.path.join(out_dir, "bert_model.ckpt"), write_meta_graph=False)
    with open(os.path.join(out_dir, "bert_config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    with open(os.path.join(out_dir, "vocab.txt"), "w") as f:
        f.writelines(t + "\n" for t in VOCAB)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "tf_bert"))
