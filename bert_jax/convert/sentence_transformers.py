"""sentence-transformers model folders read as embedding models.

A sentence-transformers folder lists its modules in `modules.json`: the transformer (a Hugging
Face directory, usually the folder itself), `Pooling` (`1_Pooling/config.json`: the mode and
`include_prompt`), optionally `Normalize`. The length it cuts texts at is in
`sentence_bert_config.json` (before sentence-transformers 6) or the tokenizer's config (from
6 on); `config_sentence_transformers.json` holds its prompts (E5's "query: ") and similarity
function. `read_folder` turns that into an `EmbeddingSpec`; `embedding_spec` also takes a
plain `hf:` directory or a bert_jax workdir with the pooling chosen by the caller.
"""

import dataclasses
import json
import os

from bert_jax import files
from bert_jax.models import pooling

MODULES = "modules.json"
# Module types read (sentence-transformers 3+ and 6+ name them in different packages).
_TRANSFORMER = ("Transformer",)
_POOLING = ("Pooling",)
_NORMALIZE = ("Normalize",)


@dataclasses.dataclass(frozen=True)
class EmbeddingSpec:
    """How a model embeds a text: its encoder, pooling and normalization, length and prompts."""

    model: str  # the encoder, as `convert.load_pretrained` takes it
    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    normalize: bool = False
    max_seq_length: int | None = None  # None: the encoder's position table
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity: str = "cosine"

    def prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The text put before every input: `prompt` as given, the prompt named (one of the
        model's `prompts`), or the model's default prompt; empty when none."""
        if prompt is not None and prompt_name is not None:
            raise ValueError("give a prompt or a prompt name, not both")
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise ValueError(f"prompt name {name!r} is not one of the model's prompts ({known})")
        return self.prompts[name]


def _kind(module: dict) -> str:
    return module.get("type", "").rsplit(".", 1)[-1]


def is_folder(path: str) -> bool:
    return files.exists(files.join(path, MODULES))


def _read_json(path: str, default=None):
    if not files.exists(path):
        return default
    return json.loads(files.read_bytes(path))


def read_folder(path: str) -> EmbeddingSpec:
    """The embedding model a sentence-transformers folder describes.

    Raises:
      ValueError when the folder has a module bert_jax cannot run (a Dense projection, a
      second transformer), naming it.
    """
    modules = _read_json(files.join(path, MODULES))
    transformer, pool_config, normalize = None, {}, False
    for module in sorted(modules, key=lambda m: int(m.get("idx", 0))):
        where = files.join(path, module.get("path", "")) if module.get("path") else path
        kind = _kind(module)
        if kind in _TRANSFORMER and transformer is None:
            transformer = where
        elif kind in _POOLING:
            pool_config = _read_json(files.join(where, "config.json"), {})
        elif kind in _NORMALIZE:
            normalize = True
        else:
            raise ValueError(
                f"{path}: module {module.get('type')!r} ({module.get('path')}) is not one "
                f"bert_jax embeds with; it reads a transformer, Pooling and Normalize"
            )
    if transformer is None:
        raise ValueError(f"{path}/{MODULES} lists no Transformer module")
    extra = _read_json(files.join(path, "config_sentence_transformers.json"), {})
    return EmbeddingSpec(
        model=f"hf:{transformer}",
        pooling=_modes(pool_config),
        include_prompt=bool(pool_config.get("include_prompt", True)),
        normalize=normalize,
        max_seq_length=_max_seq_length(transformer),
        prompts=dict(extra.get("prompts") or {}),
        default_prompt_name=extra.get("default_prompt_name"),
        similarity=extra.get("similarity_fn_name") or "cosine",
    )


def _max_seq_length(transformer: str) -> int | None:
    """Where the folder cuts texts: `sentence_bert_config.json`'s `max_seq_length` (before
    sentence-transformers 6), else the tokenizer's `model_max_length` (6 keeps it there);
    None when neither says (a tokenizer's "no limit" is a huge number)."""
    bert = _read_json(files.join(transformer, "sentence_bert_config.json"), {})
    if bert.get("max_seq_length"):
        return int(bert["max_seq_length"])
    tokenizer = _read_json(files.join(transformer, "tokenizer_config.json"), {})
    length = tokenizer.get("model_max_length")
    return int(length) if isinstance(length, int | float) and length < 1_000_000 else None


def _modes(config: dict) -> tuple[str, ...]:
    """The pooling modes of a `1_Pooling/config.json`, new (`pooling_mode`) or old
    (`pooling_mode_*_token(s)` flags) spelling."""
    if "pooling_mode" in config:
        return pooling.check_modes(config["pooling_mode"])
    legacy = {
        "pooling_mode_cls_token": "cls",
        "pooling_mode_max_tokens": "max",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens": "weightedmean",
        "pooling_mode_lasttoken": "lasttoken",
    }
    return tuple(mode for key, mode in legacy.items() if config.get(key)) or ("mean",)


def embedding_spec(model: str, pooling_modes=None, normalize: bool | None = None) -> EmbeddingSpec:
    """The spec of `model`: a sentence-transformers folder (its own pooling, unless
    `pooling_modes` or `normalize` are given), or any encoder `convert.load_pretrained` takes
    (`hf:DIR`, a bert_jax workdir) pooled by `pooling_modes` (by default the pooling a
    finetune.py embedding run recorded, else mean)."""
    path = model.split(":", 1)[1] if model.startswith(("hf:", "st:")) else model
    path = os.path.expanduser(path)
    if is_folder(path):
        spec = read_folder(path)
    else:  # a run of `embed:<folder>` records the pooling it was trained with
        recorded = _read_json(files.join(path, "config.json"), {}).get("pooling")
        spec = EmbeddingSpec(model=model, pooling=tuple(recorded or ("mean",)))
    if pooling_modes:
        spec = dataclasses.replace(spec, pooling=pooling.check_modes(pooling_modes))
    if normalize is not None:
        spec = dataclasses.replace(spec, normalize=normalize)
    return spec


# Module types written: the classic names, which every sentence-transformers release reads.
_WRITTEN = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Normalize": "sentence_transformers.models.Normalize",
}
_LEGACY_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def write_folder(params, config, tokenizer, spec: EmbeddingSpec, out: str) -> None:
    """Writes an encoder (`params`, `config`, `tokenizer`: `convert.load_pretrained`'s) with
    `spec`'s pooling, normalization, length and prompts as a sentence-transformers folder that
    `SentenceTransformer(out)` loads. Assembled aside and moved into place whole; an existing
    non-empty `out` is refused."""
    from bert_jax.convert import sources

    if files.isdir(out) and files.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output directory")
    staging = files.make_temp_dir(out, ".st-")  # beside `out`; a local one for a bucket
    try:
        sources.export_hf(params, config, tokenizer, staging, architecture="BertModel")
        _write_st_files(staging, spec, config)
        if files.is_url(out):
            files.upload_tree(staging, out)
        else:
            if files.isdir(out):
                os.rmdir(out)
            os.replace(staging, out)
    finally:
        files.rmtree(staging)  # gone already when it was renamed into place


def _write_st_files(folder: str, spec: EmbeddingSpec, config) -> None:
    modes = pooling.check_modes(spec.pooling)
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
    if spec.normalize:
        modules.append(("Normalize", "2_Normalize"))
    listed = [
        {"idx": i, "name": str(i), "path": path, "type": _WRITTEN[kind]}
        for i, (kind, path) in enumerate(modules)
    ]
    pool = {"word_embedding_dimension": config.hidden_size, "include_prompt": spec.include_prompt}
    if list(modes) == [m for m in _LEGACY_FLAGS if m in modes]:  # every release reads flags
        pool.update({flag: mode in modes for mode, flag in _LEGACY_FLAGS.items()})
    else:  # an order the flags cannot say (sentence-transformers 5+ reads it)
        pool["pooling_mode"] = list(modes)
    length = spec.max_seq_length or config.max_length
    written = {
        MODULES: listed,
        "1_Pooling/config.json": pool,
        "sentence_bert_config.json": {"max_seq_length": length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": spec.prompts,
            "default_prompt_name": spec.default_prompt_name,
            "similarity_fn_name": spec.similarity,
        },
    }
    for name, value in written.items():
        files.makedirs(os.path.dirname(files.join(folder, name)) or folder)
        files.atomic_write(files.join(folder, name), json.dumps(value, indent=2).encode())
    if spec.normalize:
        files.makedirs(files.join(folder, "2_Normalize"))
