"""bert_jax: BERT and ALBERT encoders in JAX/Flax NNX, pretraining and fine-tuning."""
