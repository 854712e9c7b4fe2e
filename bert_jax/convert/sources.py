"""Models on disk, read lazily: Hugging Face directories and original TF checkpoints in,
Hugging Face directories out."""

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from bert_jax import files
from bert_jax.convert.names import (
    architecture_of,
    config_from_hf,
    config_to_hf,
    family,
    infer_architecture,
    params_to_hf,
    tf_to_hf_name,
)
from bert_jax.convert.tf_checkpoint import TFCheckpoint
from bert_jax.data import tokenization
from bert_jax.data.tokenization import Tokenizer
from bert_jax.models import BertConfig, Params, registry
from bert_jax.models.registry import ARCHITECTURES


@dataclasses.dataclass
class Source:
    """A model on disk, read lazily: config, tensors under Hugging Face names, tokenizer."""

    description: str
    config: BertConfig
    architecture: str
    num_labels: int
    tensors: Mapping[str, Any]
    vocab_file: str
    do_lower_case: bool
    keep_accents: bool = False


def read_hf_dir(path: str, scratch_dir: str | None = None, **overrides: Any) -> Source:
    """A Hugging Face model directory (`save_pretrained` output).

    Args:
      path: the directory.
      scratch_dir: where `vocab.txt` is written when the directory only has `tokenizer.json`;
        None: the cache ($BERT_JAX_CACHE or ~/.cache/bert_jax), under `vocab/<content hash>`.
      overrides: BertConfig fields that replace the directory's (e.g. dtype).
    """
    config_file = os.path.join(path, "config.json")
    hf = read_json(
        config_file,
        missing=f"{path} has no config.json; a Hugging Face model directory holds config.json "
        f"and model.safetensors (what save_pretrained writes)",
    )
    config = config_from_hf(hf, config_file, **overrides)
    tensors = _hf_tensors(path)
    architecture = (hf.get("architectures") or [None])[0]
    if architecture not in ARCHITECTURES:
        architecture = infer_architecture(tensors, config.model_type)
    num_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
    vocab_file, lower, keep_accents = _hf_vocab(path, scratch_dir)
    return Source(path, config, architecture, num_labels, tensors, vocab_file, lower, keep_accents)


def read_tf_checkpoint(path: str, **overrides: Any) -> Source:
    """An original google-research/bert release: `bert_config.json`, `vocab.txt` and
    `bert_model.ckpt.*` in one directory (or the checkpoint prefix, with the others beside)."""
    ckpt = TFCheckpoint(path)
    folder = os.path.dirname(ckpt.prefix)
    config_file = os.path.join(folder, "bert_config.json")
    if not files.isfile(config_file):
        raise FileNotFoundError(f"{folder} has no bert_config.json beside {ckpt.prefix}")
    config = config_from_hf(read_json(config_file), config_file, **overrides)
    vocab_file = os.path.join(folder, "vocab.txt")
    if not files.isfile(vocab_file):
        raise FileNotFoundError(f"{folder} has no vocab.txt beside {ckpt.prefix}")
    tensors = _TFTensors(ckpt)
    # Released uncased models say so only in their folder name.
    lower = "cased" not in os.path.basename(folder.rstrip("/")).lower().replace("uncased", "")
    return Source(ckpt.prefix, config, infer_architecture(tensors), 2, tensors, vocab_file, lower)


class _TFTensors(Mapping):
    """A TF checkpoint's model variables under their Hugging Face names (optimizer slots and
    counters left out), read on access."""

    def __init__(self, ckpt: TFCheckpoint):
        self._ckpt = ckpt
        self._names = {}
        for name in ckpt.names():
            hf = tf_to_hf_name(name)
            if hf is not None:
                self._names[hf] = name

    def __getitem__(self, key: str) -> np.ndarray:
        name = self._names[key]
        value = self._ckpt.read(name)
        # TF dense kernels are [in, out]; Hugging Face's Linear weights are [out, in].
        return value.T if name.endswith("/kernel") else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _SafetensorsTensors(Mapping):
    """Tensors of one or more safetensors files, each read when asked for."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self._handles, self._where = {}, {}
        for file in files:
            try:
                handle = safe_open(file, framework="numpy")
            except Exception as e:
                raise ValueError(
                    f"{file} is not a readable safetensors file ({e}); it is damaged or "
                    f"truncated: save or copy the model again"
                ) from e
            self._handles[file] = handle
            for key in handle.keys():
                self._where[key] = file

    def __getitem__(self, key: str) -> np.ndarray:
        file = self._where[key]
        try:
            return self._handles[file].get_tensor(key)
        except Exception as e:
            raise ValueError(f"cannot read tensor {key} from {file} ({e})") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _hf_tensors(path: str) -> Mapping[str, Any]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = os.path.join(path, index_name)
        if files.isfile(index):
            names = sorted(set(read_json(index)["weight_map"].values()))
        elif files.isfile(os.path.join(path, single)):
            names = [single]
        else:
            continue
        # Both readers map local files: a bucket's are copied to the cache first.
        paths = [files.local_copy(os.path.join(path, name)) for name in names]
        return (
            _SafetensorsTensors(paths) if single.endswith("safetensors") else _torch_tensors(paths)
        )
    raise FileNotFoundError(
        f"{path} has no model.safetensors (or pytorch_model.bin); save the model with "
        f"save_pretrained into this directory"
    )


def _torch_tensors(files: list[str]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {files[0]} needs PyTorch (pip install torch); or save the model as "
            f"safetensors (save_pretrained does so by default)"
        ) from e
    out = {}
    for file in files:
        try:  # weights_only: tensors and containers only, never arbitrary pickled code
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"{file} is not a readable PyTorch weights file ({e})") from e
        out.update({k: v.float().numpy() for k, v in state.items()})
    return out


def _hf_vocab(path: str, scratch_dir: str | None) -> tuple[str, bool, bool]:
    """(vocab.txt, spiece.model or tokenizer.json path, do_lower_case, keep_accents) of a
    Hugging Face directory: a WordPiece tokenizer.json becomes the vocab.txt BERT's rules read,
    any other is read as it is (`tokenization.HFTokenizer`)."""
    settings_file = os.path.join(path, "tokenizer_config.json")
    settings = read_json(settings_file) if files.isfile(settings_file) else {}
    lower = bool(settings.get("do_lower_case", True))
    keep_accents = bool(settings.get("keep_accents", False))
    for name in ("vocab.txt", "spiece.model"):  # WordPiece (BERT), SentencePiece (ALBERT)
        if files.isfile(os.path.join(path, name)):
            return os.path.join(path, name), lower, keep_accents
    tokenizer_file = os.path.join(path, "tokenizer.json")
    bpe_files = [os.path.join(path, n) for n in ("vocab.json", "merges.txt")]
    if not files.isfile(tokenizer_file) and all(files.isfile(p) for p in bpe_files):
        return _byte_level_bpe(*bpe_files, settings, scratch_dir), False, False
    spec = read_json(
        tokenizer_file,
        missing=f"{path} has neither vocab.txt, tokenizer.json nor vocab.json + merges.txt; "
        f"save the tokenizer there too (tokenizer.save_pretrained)",
    )
    if spec.get("model", {}).get("type") != "WordPiece":  # RoBERTa's, XLM-R's, ModernBERT's
        return tokenizer_file, False, False
    normalizer = spec.get("normalizer") or {}
    lower = bool(normalizer.get("lowercase", lower))
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise ValueError(f"{tokenizer_file}: the vocabulary ids are not 0..n-1")
    text = "".join(t + "\n" for t, _ in vocab).encode("utf-8")
    if scratch_dir is None:
        scratch_dir = os.path.join(
            files.cache_root(), "vocab", hashlib.sha256(text).hexdigest()[:16]
        )
    out = os.path.join(scratch_dir, "vocab.txt")
    files.makedirs(scratch_dir)
    files.atomic_write(out, text)
    return out, lower, False


def _byte_level_bpe(vocab_json: str, merges: str, settings: dict, scratch_dir) -> str:
    """The tokenizer.json of a byte-level BPE given as vocab.json + merges.txt (RoBERTa's
    earlier releases), as `transformers`' RobertaTokenizer builds it from them: the special
    tokens of `tokenizer_config.json` (default fairseq's) and `<s> A </s></s> B </s>` pairs."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer, processors

    local = [files.local_copy(p) for p in (vocab_json, merges)]
    prefix = bool(settings.get("add_prefix_space", False))
    trim = bool(settings.get("trim_offsets", True))
    tok = ByteLevelBPETokenizer(*local, add_prefix_space=prefix, trim_offsets=trim)
    names = {
        k: settings.get(f"{k}_token", default)
        for k, default in (
            ("cls", "<s>"), ("sep", "</s>"), ("unk", "<unk>"), ("pad", "<pad>"), ("mask", "<mask>")
        )
    }  # fmt: skip
    names = {k: v["content"] if isinstance(v, dict) else v for k, v in names.items()}
    tok.add_special_tokens([AddedToken(n, normalized=False) for n in names.values()])
    cls, sep = names["cls"], names["sep"]
    tok.post_processor = processors.RobertaProcessing(
        (sep, tok.token_to_id(sep)), (cls, tok.token_to_id(cls)), trim, prefix
    )
    text = tok.to_str().encode("utf-8")
    if scratch_dir is None:
        scratch_dir = os.path.join(
            files.cache_root(), "vocab", hashlib.sha256(text).hexdigest()[:16]
        )
    out = os.path.join(scratch_dir, "tokenizer.json")
    files.makedirs(scratch_dir)
    files.atomic_write(out, text)
    return out


def export_hf(
    params: Params,
    config: BertConfig,
    tokenizer: Tokenizer,
    out: str,
    num_labels: int = 2,
    architecture: str | None = None,
) -> str:
    """Writes a directory that `transformers` loads with `from_pretrained`; returns the
    architecture written (`architecture`, or the one the params show: a multiple-choice
    head and a one-label classifier hold the same tensors, so name it for those). The
    directory is assembled aside and renamed into place, so a crash leaves no half-written
    model, and an existing non-empty `out` is refused."""
    if files.isdir(out) and files.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output directory")
    from safetensors.numpy import save_file

    if architecture is None:
        architecture = architecture_of(params, config)
    else:  # the family follows the config: a run records BERT names for ALBERT encoders too
        architecture = registry.architecture(family(config), architecture)
    tmp = files.make_temp_dir(out, ".export-")
    try:
        save_file(
            params_to_hf(params, config, architecture),
            os.path.join(tmp, "model.safetensors"),
            metadata={"format": "pt"},
        )
        hf_config = config_to_hf(config, architecture, num_labels)
        if config.model_type == "modernbert":  # its config names the tokenizer's special ids
            cls, sep = tokenizer.cls_id, tokenizer.sep_id
            hf_config.update(
                pad_token_id=tokenizer.pad_id,
                cls_token_id=cls,
                sep_token_id=sep,
                bos_token_id=cls,
                eos_token_id=sep,
            )
        with files.open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        _write_tokenizer(tokenizer, tmp, config.max_length)
        if files.is_url(out):  # a bucket has no rename: each object appears whole
            files.upload_tree(tmp, out)
        else:
            if files.isdir(out):
                os.rmdir(out)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return architecture


_SPECIALS = ("cls", "sep", "pad", "mask", "unk")


def _write_tokenizer(tokenizer: Tokenizer, out: str, max_length: int) -> None:
    """The tokenizer's file and the `tokenizer_config.json` that `transformers` reads."""
    kind = tokenization.kind_of(tokenizer)
    name = {"wordpiece": "vocab.txt", "sentencepiece": "spiece.model"}.get(kind, "tokenizer.json")
    files.copy(tokenizer.vocab_file, os.path.join(out, name))
    settings = {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.do_lower_case}
    if kind == "sentencepiece":
        settings.update(tokenizer_class="AlbertTokenizer", keep_accents=tokenizer.keep_accents)
    if kind == "huggingface":
        specials = ("cls", "sep", "pad", "mask", "unk")
        settings = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{
                f"{k}_token": tokenizer.id_to_token(getattr(tokenizer, f"{k}_id")) for k in specials
            },
        }
    with files.open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({**settings, "model_max_length": max_length}, f, indent=2)


def check_vocab(tokenizer: Tokenizer, config: BertConfig, source: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the vocabulary {tokenizer.vocab_file} has {tokenizer.vocab_size} tokens but the "
            f"word embedding matrix of {source} has {config.vocab_size} rows (vocab_size); "
            f"the vocabulary belongs to another model"
        )


def read_json(path: str, missing: str = "") -> dict:
    """The JSON object of `path`; with `missing`, a FileNotFoundError saying it when the file
    does not exist."""
    if missing and not files.isfile(path):
        raise FileNotFoundError(missing)
    try:
        with files.open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
