"""Sentence embeddings: a model's pooled (and normalized) vectors of texts.

    python -m bert_jax.tools.predict embed --model=path/to/all-MiniLM-L6-v2 \
        --input=lines.txt --output=vectors.npy     # or .jsonl; stdout: JSON lines

    from bert_jax.tools.embed import Embedder
    model = Embedder("path/to/all-MiniLM-L6-v2")      # a sentence-transformers folder
    vectors = model.encode(["A man is eating food.", "Un homme mange."])  # [2, 384] float32
    queries = Embedder("hf:e5-small").encode(["how do I ..."], prompt="query: ")

A sentence-transformers folder embeds with its own pooling, normalization, length and prompts
(`convert.sentence_transformers`), as `SentenceTransformer.encode` does; any other encoder
(`hf:DIR`, a bert_jax workdir) with the pooling given. Short texts are packed several to a row
of 128 positions (`models.Packing` keeps them apart, so each vector is the text's alone): few
positions are computed for padding, and every step has one of a few shapes. Each step is split
over the devices; the vectors come back in the order of the texts.
"""

import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from bert_jax import axes, convert, files, models, sharding
from bert_jax.convert import sentence_transformers as st
from bert_jax.data import encoding
from bert_jax.models import pooling

PACKED_WIDTH = 128  # packed rows' width (wider only for texts that need it)
MAX_PER_ROW = 16  # texts a packed row holds at most
ROW_GRANULE = 8  # rows a device computes per step come in multiples of this


class Embedder:
    """An embedding model loaded once, for any number of `encode` calls."""

    def __init__(
        self,
        model: str,
        *,
        pooling_modes: Sequence[str] | None = None,
        normalize: bool | None = None,
        max_seq_length: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules = sharding.MeshConfig.rules,
    ):
        """`model`: a sentence-transformers folder, `hf:DIR` or a bert_jax workdir;
        `pooling_modes`/`normalize` replace the folder's (for others: mean, not normalized);
        `max_seq_length`: where texts are cut (the folder's, else the position table's)."""
        self.spec = st.embedding_spec(model, pooling_modes, normalize)
        self.mesh = mesh or sharding.make_mesh(sharding.MeshConfig())
        self.rules = rules
        self.pretrained = convert.load_pretrained(
            self.spec.model, "BertModel", mesh=self.mesh, rules=rules
        )
        config = self.pretrained.config
        self.max_seq_length = max_seq_length or self.spec.max_seq_length or config.max_length
        if config.length_problem(self.max_seq_length):
            raise ValueError(config.length_problem(self.max_seq_length))
        graphdef, _ = models.split_params(models.abstract_model(config, models.make_encoder))
        self._step = jax.jit(self._make_step(graphdef))
        self.data_parallel = sharding.data_parallel_size(self.mesh, rules)

    def _make_step(self, graphdef):
        modes, normalize, rules = self.spec.pooling, self.spec.normalize, self.rules

        def embed_step(params, batch, prompt_length):
            model = models.merge_params(graphdef, params)
            packing = models.Packing(
                batch["example_ids"], batch["position_ids"], batch["cls_positions"]
            )
            with axes.axis_rules(rules):
                out = model(
                    batch["input_ids"], batch["input_mask"], batch["segment_ids"], packing=packing
                )
            vectors = pooling.pool_packed(
                out.sequence_output,
                batch["example_ids"],
                batch["position_ids"],
                batch["cls_positions"],
                modes,
                prompt_length,
            )
            return pooling.normalize(vectors) if normalize else vectors

        return embed_step

    @property
    def dimension(self) -> int:
        return len(self.spec.pooling) * self.pretrained.config.hidden_size

    def token_ids(self, texts: Sequence[str], prompt: str = "") -> tuple[list[list[int]], int]:
        """Each text's ids (`[CLS] prompt text [SEP]`, cut at `max_seq_length`) and the
        prompt's length counting [CLS] (0 without a prompt)."""
        tok = self.pretrained.tokenizer
        pieces = tok.encode_batch([prompt + t for t in texts])
        keep = self.max_seq_length - 2
        ids = [[tok.cls_id, *p[:keep], tok.sep_id] for p in pieces]
        return ids, (1 + len(tok.encode(prompt)) if prompt else 0)

    def encode(
        self,
        texts: Sequence[str],
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
        batch_size: int = 32,
    ) -> np.ndarray:
        """The vectors of `texts`: [N, dimension] float32, in the order of the texts. The
        texts are packed into rows of 128 positions (several short texts a row, each embedded
        as alone); a step computes up to `batch_size` rows a device.

        `prompt` goes before every text (or the model's prompt `prompt_name`, or its default
        prompt); with the model's `include_prompt=False` its tokens are not pooled.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        text_prompt = self.spec.prompt(prompt, prompt_name)
        ids, prompt_length = self.token_ids(texts, text_prompt)
        excluded = prompt_length if text_prompt and not self.spec.include_prompt else 0
        if not ids:
            return np.zeros((0, self.dimension), np.float32)
        packed, per_step = self._pack(ids, max(1, batch_size))
        source = packed.pop("source")
        outputs = []
        with jax.set_mesh(self.mesh):
            for start in range(0, len(source), per_step):
                host = {k: v[start : start + per_step] for k, v in packed.items()}
                batch = sharding.global_batch(host, self.mesh, self.rules)
                vectors = self._step(self.pretrained.params, batch, jnp.int32(excluded))
                outputs.append(np.asarray(jax.device_get(vectors)))
        return encoding.unpack(np.concatenate(outputs), source, len(ids))

    def _pack(self, ids: list[list[int]], rows_per_device: int) -> tuple[dict, int]:
        """The texts packed into rows (`encoding.pack`: up to 16 a row, kept apart by
        `models.Packing`), and the rows a step: up to `rows_per_device` a device, in
        multiples of 8 (few shapes to compile). Rows are 128 wide, or as wide as the longest
        text needs (a power of two) within `max_seq_length`."""
        longest = max(len(x) for x in ids)
        width = PACKED_WIDTH
        while width < longest:
            width *= 2
        width = min(width, self.max_seq_length)
        n = len(ids)
        input_ids = np.zeros((n, width), np.int32)
        input_mask = np.zeros((n, width), np.int32)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            input_mask[i, : len(row)] = 1
        features = {
            "input_ids": input_ids,
            "input_mask": input_mask,
            "segment_ids": np.zeros_like(input_ids),
            "label": np.zeros(n, np.int32),
        }
        lengths = input_mask.sum(axis=1)
        needed = len(encoding.pack_rows(lengths, width, MAX_PER_ROW))
        dp = self.data_parallel
        per_device = min(rows_per_device, -(-needed // (dp * ROW_GRANULE)) * ROW_GRANULE)
        per_step = per_device * dp
        rows = -(-needed // per_step) * per_step
        packed = encoding.pack(features, MAX_PER_ROW, dp, rows=rows)
        for key in ("label", "label_weights"):
            packed.pop(key)
        return packed, per_step


def write_embeddings(
    embedder: Embedder,
    lines: Iterable[str],
    output: str | None,
    *,
    batch_size: int = 256,
    prompt: str | None = None,
    prompt_name: str | None = None,
    progress: bool = True,
) -> int:
    """Embeds lines as they are read, `batch_size` at a time, and writes them: JSON lines
    (`{"embedding": [...]}` a line, to stdout when `output` is None) as each batch is done, or
    a `.npy` file of [N, dimension] float32 at the end (written to a temporary name, then
    renamed). Returns the number of lines."""
    check_output(output)
    npy = output is not None and output.endswith(".npy")
    out = None if npy else (files.open(output, "w", encoding="utf-8") if output else sys.stdout)
    kept, count = [], 0
    bar = tqdm.tqdm(unit="line", desc="embed", disable=not progress)
    try:
        for chunk in chunks(lines, batch_size):
            vectors = embedder.encode(chunk, prompt=prompt, prompt_name=prompt_name)
            count += len(chunk)
            bar.update(len(chunk))
            if npy:
                kept.append(vectors)
                continue
            out.write("".join(json.dumps({"embedding": v.tolist()}) + "\n" for v in vectors))
            out.flush()
    finally:
        bar.close()
        if out is not None and out is not sys.stdout:
            out.close()
    if npy:
        buffer = io.BytesIO()
        empty = np.zeros((0, embedder.dimension), np.float32)
        np.save(buffer, np.concatenate(kept) if kept else empty)
        files.atomic_write(output, buffer.getvalue())
    return count


def check_output(output: str | None) -> None:
    if output is not None and not output.endswith((".npy", ".jsonl")):
        raise ValueError(f"--output={output}: use a .jsonl or .npy file name")


def chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lines (newline stripped) in lists of `size`, the last shorter, as they are read."""
    chunk = []
    for line in lines:
        chunk.append(line.rstrip("\n"))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
