"""Fine-tuning tasks: each reads its data, builds fixed-shape features, decodes the model's
outputs back to its own answers and scores them with the task's official metric."""
