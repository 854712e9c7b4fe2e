"""Fine-tunes a pretrained BERT on GLUE (not yet available).

The GLUE task table, readers, official metrics and the fine-tuning loop are tracked in the
GLUE issue; until they land this entry point says so instead of pretending to train.
"""

import sys

from absl import app


def main(argv):
    del argv
    sys.exit(
        "finetune.py: GLUE fine-tuning is not implemented yet (see the GLUE issue); "
        "use train.py for pretraining"
    )


if __name__ == "__main__":
    app.run(main)
