"""What users run on a trained model: prediction (`python -m bert_jax.tools.predict`), feature
extraction, attention analysis and head pruning."""
