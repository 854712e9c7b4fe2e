"""Raw text -> documents of sentences: text files, TFDS corpora, the default stdlib corpus.

Text files are in the original BERT format (one sentence per line, a blank line between
documents). TFDS corpora are read with `tfds.data_source` (no tensorflow needed), each record's
text split into sentences. Bad input is counted, not fatal: invalid UTF-8 is replaced, absurdly
long lines are dropped, empty files are noted; `CorpusStats.report()` names the files.
"""

import ast
import dataclasses
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator, Sequence

from bert_jax import files

# A "sentence" longer than this is not text (a minified file, a base64 blob): drop the line.
MAX_LINE_CHARS = 20_000

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


@dataclasses.dataclass
class CorpusStats:
    """What was read and what was wrong with it."""

    documents: int = 0
    sentences: int = 0
    empty_files: list[str] = dataclasses.field(default_factory=list)
    invalid_utf8: dict[str, int] = dataclasses.field(default_factory=dict)  # file -> lines
    long_lines: dict[str, int] = dataclasses.field(default_factory=dict)  # file -> lines dropped

    def report(self) -> list[str]:
        """Human-readable warnings about the input, one per problem."""
        lines = []
        if self.empty_files:
            lines.append(f"{len(self.empty_files)} empty file(s) skipped: {self.empty_files[:5]}")
        for path, n in sorted(self.invalid_utf8.items()):
            lines.append(f"{path}: {n} line(s) with invalid UTF-8, bad bytes replaced by U+FFFD")
        for path, n in sorted(self.long_lines.items()):
            lines.append(f"{path}: {n} line(s) over {MAX_LINE_CHARS} characters dropped")
        return lines


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: lines are paragraphs, split further at sentence-final punctuation."""
    sentences = []
    for paragraph in text.splitlines():
        paragraph = " ".join(paragraph.split())
        if paragraph:
            sentences.extend(s for s in _SENTENCE_END.split(paragraph) if s)
    return sentences


def iter_text_documents(paths: Sequence[str], stats: CorpusStats) -> Iterator[list[str]]:
    """Documents (lists of sentences) of text files in the original BERT format, streamed."""
    for path in paths:
        document: list[str] = []
        seen_any = False
        with files.open(path, "rb") as f:
            for raw in f:
                seen_any = True
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    stats.invalid_utf8[path] = stats.invalid_utf8.get(path, 0) + 1
                line = line.strip()
                if len(line) > MAX_LINE_CHARS:
                    stats.long_lines[path] = stats.long_lines.get(path, 0) + 1
                    continue
                if line:
                    document.append(line)
                elif document:
                    yield _counted(document, stats)
                    document = []
        if document:
            yield _counted(document, stats)
        if not seen_any:
            stats.empty_files.append(path)


def iter_tfds_documents(
    name: str, split: str, data_dir: str | None, text_key: str, stats: CorpusStats
) -> Iterator[list[str]]:
    """Documents of a TFDS text corpus prepared as ArrayRecord (e.g. `wikipedia/20230601.en`)."""
    import tensorflow_datasets as tfds  # Imported here: slow, and only this path needs it.

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in "
            f"{data_dir or 'the default TFDS data dir'}: {e}; prepare it with "
            f"`tfds build {name} --file_format=array_record` first"
        ) from e
    for i in range(len(source)):
        record = source[i]
        if text_key not in record:
            raise KeyError(f"TFDS records of {name!r} have no {text_key!r} field: {list(record)}")
        text = record[text_key]
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        sentences = split_sentences(text)
        if sentences:
            yield _counted(sentences, stats)


def _counted(document: list[str], stats: CorpusStats) -> list[str]:
    stats.documents += 1
    stats.sentences += len(document)
    return document


def make_text_corpus_builder(files: Sequence[str], data_dir: str):
    """A TFDS builder (`bert_text_corpus`) over local text files: one example per document.

    `builder.download_and_prepare(file_format="array_record")` writes it; afterwards
    `iter_tfds_documents("bert_text_corpus", "train", data_dir, "text", ...)` reads it back.
    """
    import tensorflow_datasets as tfds

    class BertTextCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, document in enumerate(iter_text_documents(list(files), CorpusStats())):
                yield i, {"text": "\n".join(document)}

    return BertTextCorpus(data_dir=data_dir, file_format="array_record")


def build_stdlib_corpus(directory: str) -> str:
    """Writes (once) the default corpus: the Python standard library's docstrings.

    The sources are parsed with `ast`, never imported. Each module is one document: the
    sentences of its module, class and function docstrings in source order (docstrings alone
    are mostly one or two sentences, too short for next-sentence pairs).

    Returns:
      The path of the corpus file.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = os.path.join(directory, f"python{version}_stdlib_docstrings.txt")
    if files.exists(path):
        return path
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    documents = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(n for n in names if n.endswith(".py")):
            sentences = _docstring_sentences(os.path.join(folder, name))
            if sentences:
                documents.append(sentences)
    text = "\n\n".join("\n".join(doc) for doc in documents) + "\n"
    files.atomic_write(path, text.encode("utf-8"))
    return path


def _docstring_sentences(path: str) -> list[str]:
    try:
        with files.open(path, encoding="utf-8") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted(
        (n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0)
    )
    sentences = []
    for node in nodes:
        for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
            sentences.extend(split_sentences(" ".join(paragraph.split())))
    return sentences
