"""Writes small GLUE folders in the exact layout of the GLUE download, for the tests."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FILLER = [f"w{i}" for i in range(30)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "yes", "no", *FILLER]

_MNLI_TRAIN = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
    "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label"
).split()
_MNLI_DEV = _MNLI_TRAIN[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
_MNLI_TEST = _MNLI_TRAIN[:10]
_STSB = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
_MRPC = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
_MRPC_TEST = ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"]


def sentence(rng, key: str | None = None, n: int = 6) -> str:
    """Filler words, with `key` (e.g. "good") at a random place when given."""
    words = list(rng.choice(FILLER, size=n))
    if key is not None:
        words.insert(int(rng.integers(0, n + 1)), key)
    return " ".join(words)


def write_tsv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = ([] if header is None else ["\t".join(header)]) + ["\t".join(r) for r in rows]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_glue(root, n: int = 24, seed: int = 0) -> dict[str, int]:
    """All nine tasks and the diagnostic set; labels follow the text ("good"/"yes": positive).

    Returns the number of test rows per submission file.
    """
    rng = np.random.default_rng(seed)
    test_rows = {}

    def pos(i):
        return i % 2 == 0

    def word(i):
        return "good" if pos(i) else "bad"

    for split in ("train", "dev"):
        write_tsv(
            f"{root}/CoLA/{split}.tsv",
            None,
            [
                ["gj04", str(int(pos(i))), "" if pos(i) else "*", sentence(rng, word(i))]
                for i in range(n)
            ],
        )
        write_tsv(
            f"{root}/SST-2/{split}.tsv",
            ["sentence", "label"],
            [[sentence(rng, word(i)), str(int(pos(i)))] for i in range(n)],
        )
        write_tsv(
            f"{root}/MRPC/{split}.tsv",
            _MRPC,
            [
                [
                    str(int(pos(i))),
                    str(100 + i),
                    str(200 + i),
                    sentence(rng, word(i)),
                    '"' + sentence(rng),
                ]
                for i in range(n)
            ],
        )
        write_tsv(
            f"{root}/STS-B/{split}.tsv",
            _STSB,
            [
                [
                    str(i),
                    "main-news",
                    "2012",
                    "2012",
                    str(i),
                    "none",
                    "none",
                    sentence(rng, word(i)),
                    sentence(rng),
                    f"{4.5 if pos(i) else 0.5:.3f}",
                ]
                for i in range(n)
            ],
        )
        write_tsv(
            f"{root}/QQP/{split}.tsv",
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [
                [
                    str(i),
                    str(i),
                    str(n + i),
                    sentence(rng, word(i)),
                    sentence(rng),
                    str(int(pos(i))),
                ]
                for i in range(n)
            ],
        )
        for task, labels in (
            ("QNLI", ("entailment", "not_entailment")),
            ("RTE", ("entailment", "not_entailment")),
            ("WNLI", ("1", "0")),
        ):
            cols = (
                ["index", "question", "sentence", "label"]
                if task == "QNLI"
                else ["index", "sentence1", "sentence2", "label"]
            )
            write_tsv(
                f"{root}/{task}/{split}.tsv",
                cols,
                [
                    [str(i), sentence(rng, word(i)), sentence(rng), labels[0 if pos(i) else 1]]
                    for i in range(n)
                ],
            )
    nli = ("entailment", "neutral", "contradiction")
    mnli_word = ("good", "yes", "bad")
    write_tsv(
        f"{root}/MNLI/train.tsv",
        _MNLI_TRAIN,
        [
            [
                str(i),
                "1",
                "1e",
                "fiction",
                "(x)",
                "(y)",
                "(ROOT x)",
                "(ROOT y)",
                sentence(rng, mnli_word[i % 3]),
                sentence(rng),
                nli[i % 3],
                nli[i % 3],
            ]
            for i in range(n)
        ],
    )
    for name in ("dev_matched", "dev_mismatched"):
        # label1 disagrees with gold_label: the reader must take the last column.
        write_tsv(
            f"{root}/MNLI/{name}.tsv",
            _MNLI_DEV,
            [
                [
                    str(i),
                    "1",
                    "1e",
                    "fiction",
                    "(x)",
                    "(y)",
                    "(ROOT x)",
                    "(ROOT y)",
                    sentence(rng, mnli_word[i % 3]),
                    sentence(rng),
                    nli[(i + 1) % 3],
                    nli[i % 3],
                    nli[i % 3],
                    nli[i % 3],
                    nli[i % 3],
                    nli[i % 3],
                ]
                for i in range(n)
            ],
        )
    test_specs = {
        "CoLA": (["index", "sentence"], 1, "CoLA.tsv"),
        "SST-2": (["index", "sentence"], 1, "SST-2.tsv"),
        "MRPC": (_MRPC_TEST, 2, "MRPC.tsv"),
        "STS-B": (_STSB[:-1], 2, "STS-B.tsv"),
        "QQP": (["id", "question1", "question2"], 2, "QQP.tsv"),
        "QNLI": (["index", "question", "sentence"], 2, "QNLI.tsv"),
        "RTE": (["index", "sentence1", "sentence2"], 2, "RTE.tsv"),
        "WNLI": (["index", "sentence1", "sentence2"], 2, "WNLI.tsv"),
    }
    for i, (task, (header, _, submission)) in enumerate(test_specs.items()):
        rows = [
            [str(j) if h in ("index", "id") else sentence(rng) for h in header]
            for j in range(5 + i)
        ]
        write_tsv(f"{root}/{task}/test.tsv", header, rows)
        test_rows[submission] = len(rows)
    for name, submission in (("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv")):
        rows = [[str(j)] + ["x"] * 7 + [sentence(rng), sentence(rng)] for j in range(7)]
        write_tsv(f"{root}/MNLI/{name}.tsv", _MNLI_TEST, rows)
        test_rows[submission] = 7
    write_tsv(
        f"{root}/diagnostic/diagnostic.tsv",
        ["index", "sentence1", "sentence2"],
        [[str(j), sentence(rng), sentence(rng)] for j in range(4)],
    )
    test_rows["AX.tsv"] = 4
    return test_rows


def write_vocab(path) -> str:
    with open(path, "w") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    return str(path)


def finetune_config(**kw):
    """A FinetuneConfig for tests: tiny batches, one seed, one epoch; `kw` overrides."""
    import finetune
    from bert_jax import sharding

    base = dict(
        init_from="",
        tasks=("sst2",),
        source="tsv",
        data_dir="",
        tfds_data_dir="",
        max_seq_length=16,
        max_train_examples=0,
        batch_size=8,
        eval_batch_size=16,
        num_epochs=1.0,
        learning_rates=(1e-3,),
        seeds=(0,),
        warmup_fraction=0.1,
        weight_decay=0.01,
        classifier_dropout=-1.0,
        eval_every_steps=0,
        pack=True,
        pack_max_examples=16,
        early_stopping_patience=0,
        log_every=10,
        numerics=dict(dtype="float32", param_dtype="float32", remat="none"),
        mesh=sharding.MeshConfig(data=-1),
    )
    return finetune.FinetuneConfig(**{**base, **kw})
