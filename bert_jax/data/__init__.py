"""Text to model inputs: tokenizers, corpora, pretraining instances, the input pipeline."""
