"""Text corpora for conversion and pretraining, and packing them into token windows.

Design decisions:
- A corpus is a list of documents split train / held-out by a hash of each document's key
  (relative file path, or `file:line` for .jsonl), so the split does not depend on file order,
  on the machine's absolute paths or on how many documents were added elsewhere.
- Three sources: a folder of text files, a .jsonl file with a "text" field per line, and
  "python-sources": the .py files of this interpreter's standard library and site-packages
  (a corpus every Python machine has, used for the embedded demo model).
- Files are read lazily (the python-sources corpus is hundreds of MB); .jsonl is parsed up front
  so a bad line fails before any training starts.
- Training draws windows at random offsets of one packed token array (documents joined by EOS);
  the window of a step depends only on (seed, step, rank), so resuming needs no data-loader state.
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

PYTHON_SOURCES = "python-sources"
HELDOUT_PERCENT = 2
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".js", ".html", ".tex")
MAX_FILE_BYTES = 512 * 1024  # python-sources: skip generated tables and vendored blobs


@dataclass(frozen=True, slots=True)
class Document:
    """One training document: its split key and either its text or the file holding it."""
    key: str
    text: str | None = None
    path: Path | None = None

    def read(self) -> str:
        if self.text is not None:
            return self.text
        return self.path.read_text(encoding="utf-8", errors="replace")


@dataclass(frozen=True)
class Corpus:
    name: str
    train: list[Document] = field(repr=False)
    heldout: list[Document] = field(repr=False)

    def texts(self, split: str, seed: int = 0) -> Iterator[str]:
        """Documents of `split` ("train" or "heldout") in an order shuffled by `seed`."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        docs = list(self.train if split == "train" else self.heldout)
        random.Random(seed).shuffle(docs)
        for doc in docs:
            text = doc.read()
            if text.strip():
                yield text


def is_heldout(key: str, percent: int = HELDOUT_PERCENT) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < percent


def _split(name: str, docs: list[Document]) -> Corpus:
    if not docs:
        raise ValueError(f"corpus {name} is empty: it has no non-empty documents")
    train = [d for d in docs if not is_heldout(d.key)]
    heldout = [d for d in docs if is_heldout(d.key)]
    if not train:
        raise ValueError(f"corpus {name} has no training documents ({len(heldout)} all fell in the held-out split)")
    return Corpus(name, train, heldout)


def open_corpus(spec: str | Path) -> Corpus:
    """`spec` is a folder of text files, a .jsonl file with a "text" field, or "python-sources"."""
    if str(spec) == PYTHON_SOURCES:
        return python_sources()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {path} does not exist (give a folder of text files, a .jsonl file, or {PYTHON_SOURCES!r})")
    if path.is_dir():
        return text_folder(path)
    if path.suffix == ".jsonl":
        return jsonl_file(path)
    raise ValueError(f"corpus {path} must be a folder, a .jsonl file or {PYTHON_SOURCES!r}")


def text_folder(folder: Path) -> Corpus:
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                   and p.stat().st_size > 0)
    if not files:
        raise ValueError(f"corpus folder {folder} has no non-empty text files ({', '.join(TEXT_SUFFIXES)})")
    return _split(str(folder), [Document(p.relative_to(folder).as_posix(), path=p) for p in files])


def jsonl_file(path: Path) -> Corpus:
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not valid JSON: {e}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path} line {n} has no string field "text"')
            if record["text"].strip():
                docs.append(Document(f"{path.name}:{n}", text=record["text"]))
    return _split(str(path), docs)


def python_sources() -> Corpus:
    """The .py files of the standard library and of site-packages (purelib), each once."""
    paths = sysconfig.get_paths()
    roots = {"stdlib": Path(paths["stdlib"]), "purelib": Path(paths["purelib"])}
    docs, seen = [], set()
    for label, root in roots.items():
        if not root.is_dir():
            raise FileNotFoundError(f"python-sources: {label} directory {root} does not exist")
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root)
            # site-packages usually lives inside the stdlib tree; count it under purelib only.
            if label == "stdlib" and rel.parts[0] in ("site-packages", "dist-packages"):
                continue
            if "__pycache__" in rel.parts or not p.is_file():
                continue
            real = p.resolve()
            size = p.stat().st_size
            if real in seen or size == 0 or size > MAX_FILE_BYTES:
                continue
            seen.add(real)
            docs.append(Document(f"{label}/{rel.as_posix()}", path=p))
    return _split(PYTHON_SOURCES, docs)


def pack_tokens(texts: Iterator[str], encode: Callable[[list[str]], list[list[int]]], eos_id: int,
                max_tokens: int, batch_docs: int = 64) -> torch.Tensor:
    """Concatenates encoded documents, each followed by `eos_id`, until `max_tokens` tokens.
    Returns a 1-D int32 tensor (shorter if the corpus runs out)."""
    chunks, total, pending = [], 0, []

    def flush():
        nonlocal total
        for ids in encode(pending):
            chunks.append(torch.tensor(ids + [eos_id], dtype=torch.int32))
            total += len(ids) + 1
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) == batch_docs:
            flush()
            if total >= max_tokens:
                break
    if pending and total < max_tokens:
        flush()
    if not chunks:
        raise ValueError("the corpus produced no tokens")
    return torch.cat(chunks)[:max_tokens]


def sample_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` windows of `seq_len` tokens at random offsets of `tokens` -> [B, seq_len] long."""
    if tokens.numel() < seq_len:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()]).long()


def fixed_windows(tokens: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Consecutive non-overlapping windows (held-out evaluation) -> [N, seq_len] long."""
    n = min(tokens.numel() // seq_len, max_windows)
    if n == 0:
        raise ValueError(f"the held-out split has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    return tokens[:n * seq_len].view(n, seq_len).long()
