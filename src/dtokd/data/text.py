"""Text for causal language models: documents from local files, split by document, tokenized,
packed into fixed-length blocks.

``data.name: text`` with ``data.root``:

- ``stdlib``: the source of the Python standard library that runs the pipeline (its
  top-level ``Lib/*.py``, one document per file; present on every machine),
- a folder: every file under it whose suffix is in ``extensions`` (hidden entries skipped),
  one document per file, read as UTF-8 (a file that is not is refused, named),
- a ``.jsonl`` file: one document per line, the string under ``field``.

Options (``data.text``, defaults in :data:`TEXT_OPTIONS`): ``block_size`` (tokens a model
sees at once), ``tokenizer`` (``train``: a byte-level BPE of at most ``vocab_size`` tokens
(at least 257: the bytes and the end token; fewer when the text has no more merges) trained on
the training split with ``tokenizers``, cached by content; or a local ``tokenizer.json`` or a
folder holding one: nothing is downloaded), ``eos`` (the token that ends every document; it
must be in the tokenizer's vocabulary), ``test_fraction``, ``split_seed``.

**Splits** are drawn by document with ``split_seed``, not with the run's seed: every run of a
comparison (and the teacher) sees the same training, validation (``data.val_fraction``) and
test documents, and a tokenizer trained on the training split is the same for all of them.
Each split's documents are tokenized, each followed by ``eos``, concatenated in order and cut
into blocks of ``block_size + 1`` tokens (the remainder dropped): a block gives the input
``block[:-1]`` and the next-token targets ``block[1:]``.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dtokd.data.sources import cache_dir
from dtokd.data.tensor_dataset import InMemoryBatches
from dtokd.interrupts import exclusive

TEXT_OPTIONS: dict[str, Any] = {
    "block_size": 128,
    "tokenizer": "train",
    "vocab_size": 2048,
    "eos": "<|endoftext|>",
    "test_fraction": 0.1,
    "split_seed": 0,
    "extensions": [".py", ".txt", ".md", ".rst"],
    "field": "text",
}


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_documents(root: str, extensions: list[str], field: str) -> tuple[list[str], list[str]]:
    """``(names, texts)`` of the documents under ``root`` (see the module notes), sorted by name."""
    if root == "stdlib":
        files = sorted(stdlib_root().glob("*.py"))
        return [f.name for f in files], [_read(f) for f in files]
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(
            f"data.root={root!r} does not exist (give 'stdlib', a folder of text files or a .jsonl file)"
        )
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ValueError(f"data.root={root!r} is a file but not .jsonl (one JSON object per line)")
        names, texts = [], []
        for k, line in enumerate(_read(path).splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{k + 1} is not JSON ({error})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise ValueError(f"{path}:{k + 1} has no string under {field!r} (data.text.field)")
            names.append(f"{path.name}:{k + 1}")
            texts.append(row[field])
        return names, texts
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in extensions
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    return [str(f.relative_to(path)) for f in files], [_read(f) for f in files]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); remove it or convert it") from None


class TokenBlocks(Dataset):
    """Fixed-length blocks of token ids (``(N, block_size + 1)``): an item is the pair
    (``block[:-1]``, ``block[1:]``), the inputs and their next-token targets."""

    streams = False
    """In memory: batches are gathered whole and each rank of a distributed run takes its part."""
    detection = False
    in_channels = 1

    def __init__(self, blocks: Tensor) -> None:
        if blocks.dim() != 2 or blocks.shape[1] < 2 or blocks.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"blocks must be integer (N, block_size + 1), got {blocks.dtype} {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        block = self.blocks[torch.as_tensor(indices, device=self.blocks.device)].long()
        return block[:, :-1], block[:, 1:]

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def image_size(self) -> int:
        """The block length (what a model is built for, as an image size is for images)."""
        return int(self.blocks.shape[1] - 1)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size()

    def to(self, device: torch.device | str) -> "TokenBlocks":
        return TokenBlocks(self.blocks.to(device))

    def train_batches(
        self, batch_size: int, seed: int, epoch: int, *, rank: int = 0, world: int = 1, repeats: int = 1
    ) -> InMemoryBatches:
        """Whole global batches of a permutation drawn from (seed, epoch) (each rank takes its part)."""
        if repeats != 1:
            raise ValueError("data.repeated_augmentation is for streamed image folders (image-folder-stream)")
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return InMemoryBatches(self, batch_size, generator, drop_last=len(self) > batch_size)


@dataclass(frozen=True)
class TextSplits:
    train: TokenBlocks
    val: TokenBlocks | None
    test: TokenBlocks
    vocabulary: tuple[str, ...]
    documents: dict[str, list[str]]
    """The names of each split's documents."""


def load_text(root: str | None, options: dict[str, Any] | None, val_fraction: float) -> TextSplits:
    """The splits of ``data.name: text`` (see the module notes)."""
    if not root:
        raise ValueError("dataset 'text' needs data.root: 'stdlib', a folder of text files or a .jsonl file")
    settings = check_text_options(options)
    names, texts = read_documents(root, settings["extensions"], settings["field"])
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(settings["split_seed"])).tolist()
    n_test = round(settings["test_fraction"] * len(texts))
    n_val = round(val_fraction * len(texts))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    if len(texts) < 2 or not parts["train"] or not parts["test"]:
        raise ValueError(
            f"data.root={root!r} has {len(texts)} document(s): too few for a training and a test split "
            f"(data.text.test_fraction={settings['test_fraction']}, data.val_fraction={val_fraction})"
        )
    tokenizer = _tokenizer(settings, [texts[i] for i in parts["train"]])
    eos = tokenizer.token_to_id(settings["eos"])
    if eos is None:
        raise ValueError(f"data.text.eos={settings['eos']!r} is not in the tokenizer's vocabulary")
    vocabulary = [""] * tokenizer.get_vocab_size()
    for token, index in tokenizer.get_vocab().items():
        vocabulary[index] = token

    def blocks(indices: list[int], split: str) -> TokenBlocks:
        ids: list[int] = []
        for encoding in tokenizer.encode_batch([texts[i] for i in sorted(indices)]):
            ids.extend(encoding.ids)
            ids.append(eos)
        size = settings["block_size"] + 1
        count = len(ids) // size
        if count == 0:
            raise ValueError(
                f"the {split} split has {len(ids)} tokens, fewer than one block of {size} "
                "(data.text.block_size + 1): use a smaller block_size or more documents"
            )
        return TokenBlocks(torch.tensor(ids[: count * size], dtype=torch.int32).view(count, size))

    return TextSplits(
        blocks(parts["train"], "train"),
        blocks(parts["val"], "val") if parts["val"] else None,
        blocks(parts["test"], "test"),
        tuple(vocabulary),
        {s: [names[i] for i in sorted(v)] for s, v in parts.items()},
    )


def check_text_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``data.text`` with its defaults, every option checked (named, with what is allowed)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(TEXT_OPTIONS))
    if unknown:
        raise ValueError(f"data.text: unknown option(s) {unknown}; allowed: {sorted(TEXT_OPTIONS)}")
    settings = {**TEXT_OPTIONS, **options}
    for key in ("block_size", "vocab_size", "split_seed"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "split_seed" else 2):
            raise ValueError(f"data.text.{key}={value!r} must be an integer >= {0 if key == 'split_seed' else 2}")
    if settings["tokenizer"] == "train" and settings["vocab_size"] < 257:
        raise ValueError(
            f"data.text.vocab_size={settings['vocab_size']} is too small for a byte-level BPE: it holds "
            "the 256 bytes and the end token, so at least 257"
        )
    fraction = settings["test_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"data.text.test_fraction={fraction!r} must lie strictly between 0 and 1")
    for key in ("tokenizer", "eos", "field"):
        if not isinstance(settings[key], str) or not settings[key]:
            raise ValueError(f"data.text.{key}={settings[key]!r} must be a non-empty string")
    if not isinstance(settings["extensions"], list) or not all(isinstance(e, str) for e in settings["extensions"]):
        raise ValueError(f"data.text.extensions={settings['extensions']!r} must be a list of suffixes such as '.py'")
    return settings


def _tokenizer(settings: dict[str, Any], train_texts: list[str]) -> Any:
    """A local tokenizer, or a byte-level BPE trained on the training split (cached by the
    content it was trained on, its size and the ``tokenizers`` version)."""
    try:
        import tokenizers
        from tokenizers import ByteLevelBPETokenizer, Tokenizer
    except ImportError:
        raise ValueError("language-model data need tokenizers: pip install 'dtokd[lm]'") from None
    if settings["tokenizer"] != "train":
        path = Path(settings["tokenizer"])
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"data.text.tokenizer={settings['tokenizer']!r}: no tokenizer.json there "
                "(give a local tokenizer file or folder, or 'train')"
            )
        try:
            return Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises its own exception type for a malformed file
            raise ValueError(f"{path} is not a tokenizers file ({str(error)[:200]})") from None
    digest = hashlib.sha256()
    for text in train_texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    key = f"bpe-{settings['vocab_size']}-{settings['eos']}-{tokenizers.__version__}-{digest.hexdigest()[:20]}"
    path = cache_dir() / "tokenizers" / f"{key}.json"
    with exclusive(cache_dir() / "locks" / f"{key}.lock"):
        if not path.is_file():
            trained = ByteLevelBPETokenizer()
            trained.train_from_iterator(
                train_texts,
                vocab_size=settings["vocab_size"],
                min_frequency=2,
                special_tokens=[settings["eos"]],
                show_progress=False,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(trained.to_str())
            temporary.replace(path)
    return Tokenizer.from_file(str(path))
