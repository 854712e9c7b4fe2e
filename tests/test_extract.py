"""Feature extraction against `transformers`: hidden states of a BertModel built from a config,
word alignment from its own tokenizer (`is_split_into_words`, `word_ids`)."""

import json

import numpy as np
import pytest
import torch
import transformers

from bert_jax import sharding
from bert_jax.tools import extract

VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the cat sat on mat play ##ing ##ed un ##believ ##able "
    "dog , . a ##b ##c"
).split()
LINES = [
    "the cat sat on the mat .",
    "Playing unbelievable xyzzy ||| the dog played .",  # several pieces; [UNK]; a pair
    "the \x07 cat",  # a word of control characters: no piece
    "abc abc abc abc abc abc the cat sat ||| on the mat .",  # cut at 16 pieces
    "",
]


def _hf_model(tmp_path, architecture="BertModel"):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    model = getattr(transformers, architecture)(config).eval()
    directory = tmp_path / architecture
    model.save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return str(directory), model


def _reference(directory, model, line, layers, pooling, max_len=16):
    """Word vectors from transformers' hidden states and transformers' own word alignment."""
    tok = transformers.BertTokenizerFast(f"{directory}/vocab.txt", do_lower_case=True)
    a, _, b = line.partition(" ||| ")
    words_a, words_b = a.split(), (b.split() if b else None)
    enc = tok(
        words_a,
        words_b,
        is_split_into_words=True,
        truncation="longest_first",
        max_length=max_len,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    hidden = torch.stack(out.hidden_states).numpy()[:, 0]  # [N+1, L, D]
    n_words = len(words_a) + len(words_b or [])
    pieces = [[] for _ in range(n_words)]
    for pos, (word, seq) in enumerate(zip(enc.word_ids(), enc.sequence_ids(), strict=True)):
        if word is not None:
            pieces[word + (len(words_a) if seq == 1 else 0)].append(pos)
    vectors = np.full((len(layers), n_words, hidden.shape[-1]), np.nan, np.float32)
    for w, positions in enumerate(pieces):
        if positions:
            chosen = hidden[layers][:, positions]
            vectors[:, w] = {"first": chosen[:, 0], "mean": chosen.mean(1), "sum": chosen.sum(1)}[
                pooling
            ]
    mask = enc["attention_mask"][0].numpy().astype(bool)
    return {
        "vectors": vectors,
        "pieces": [tok.convert_ids_to_tokens(enc["input_ids"][0][p].tolist()) for p in pieces],
        "cls": out.pooler_output[0].numpy(),
        "mean": hidden[-1][mask].mean(0),
    }


# Rows of 16 positions: with 8 rows (one per device) the batch packs three lines in a row;
# with one row (one device) each batch ends when the next line does not fit.
@pytest.mark.parametrize("pooling,rows", [("first", 8), ("mean", 8), ("first", 1)])
def test_features_equal_transformers_hidden_states(tmp_path, pooling, rows):
    directory, model = _hf_model(tmp_path)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(LINES) + "\n")
    layers = [-1, -2, 0]
    if rows == 8:
        mesh = sharding.make_mesh(sharding.MeshConfig())  # the batch is split over 8 devices
    else:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=1), __import__("jax").devices()[:1])
    outputs = {}
    for ext in ("jsonl", "array_record"):
        result = extract.extract(
            f"hf:{directory}",
            str(lines),
            str(tmp_path / f"out.{ext}"),
            layers=layers,
            pooling=pooling,
            max_seq_length=16,
            batch_size=rows,
            mesh=mesh,
            progress=False,
        )
        assert result == {"lines": 5, "truncated": 1, "output": str(tmp_path / f"out.{ext}")}
    outputs["jsonl"] = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    outputs["array_record"] = list(extract.read_array_record(str(tmp_path / "out.array_record")))
    for i, line in enumerate(LINES):
        ref = _reference(directory, model, line, layers, pooling)
        got = outputs["jsonl"][i]
        assert got["line_index"] == i and got["truncated"] == (i == 3)
        assert [w["pieces"] for w in got["words"]] == ref["pieces"]
        vectors = np.array(
            [
                [layer["values"] for layer in w["layers"]] if w["layers"] else [[np.nan] * 32] * 3
                for w in got["words"]
            ],
            np.float32,
        )
        vectors = vectors.reshape(len(got["words"]), len(layers), 32).transpose(1, 0, 2)
        np.testing.assert_allclose(vectors, ref["vectors"], atol=1e-5)
        record = outputs["array_record"][i]
        assert list(record["words"]) == line.replace(" ||| ", " ").split()
        np.testing.assert_allclose(record["features"], ref["vectors"], atol=1e-5)
        for key in ("cls", "mean"):
            np.testing.assert_allclose(record[key], ref[key], atol=1e-5)
            np.testing.assert_allclose(got[key], ref[key], atol=1e-5)
    # The alignment itself, spelled out.
    second = outputs["jsonl"][1]["words"]
    assert [w["pieces"] for w in second] == [
        ["play", "##ing"],
        ["un", "##believ", "##able"],
        ["[UNK]"],
        ["the"],
        ["dog"],
        ["play", "##ed"],
        ["."],
    ]
    control = outputs["jsonl"][2]["words"][1]
    assert control["pieces"] == [] and control["layers"] is None
    # 21 pieces in A, 4 in B, 13 places: A, the longer, loses its end (words 3-8).
    cut = outputs["jsonl"][3]["words"]
    assert [w["layers"] is None for w in cut] == [False] * 3 + [True] * 6 + [False] * 4


def test_bad_requests_are_clear_errors(tmp_path):
    directory, _ = _hf_model(tmp_path)
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat\n")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), __import__("jax").devices()[:1])
    kw = dict(mesh=mesh, progress=False, max_seq_length=16)
    with pytest.raises(ValueError, match="hidden states 0 .embeddings. to 3"):
        extract.extract(f"hf:{directory}", str(lines), str(tmp_path / "o.jsonl"), layers=[4], **kw)
    with pytest.raises(ValueError, match=".jsonl or .array_record"):
        extract.extract(f"hf:{directory}", str(lines), str(tmp_path / "o.csv"), **kw)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        extract.extract(f"hf:{directory}", str(tmp_path / "nowhere.txt"), "o.jsonl", **kw)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        extract.extract(
            f"hf:{directory}", str(lines), str(tmp_path / "o.jsonl"), **{**kw, "max_seq_length": 64}
        )
    assert not (tmp_path / "o.jsonl").exists()
