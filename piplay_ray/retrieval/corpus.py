"""A JSONL corpus read lazily through a memory map, and the on-disk cache folders of its indexes.

Row ``i`` of every index is the ``i``-th non-blank line of the corpus file, so an index only stores row
numbers and the documents themselves are parsed on demand: a wiki-18-sized corpus costs no resident memory.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from piplay_ray.errors import UserInputError
from piplay_ray.records import Doc

SCAN_BYTES = 1 << 26


class Corpus:
    """Documents of a JSONL file with ``id``, ``contents`` (or ``text``) and optional ``title``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserInputError(f"corpus file not found: {self.path} (search.corpus)")
        size = self.path.stat().st_size
        if size == 0:
            raise UserInputError(f"{self.path}: the corpus is empty (search.corpus)")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(self._mm, dtype=np.uint8)
        # line ends found a slice at a time: comparing the whole file at once would allocate its size again
        ends = np.concatenate([np.flatnonzero(raw[o : o + SCAN_BYTES] == 10) + o for o in range(0, size, SCAN_BYTES)])
        if not len(ends) or ends[-1] != size - 1:
            ends = np.append(ends, size)
        starts = np.concatenate([[0], ends[:-1] + 1])
        keep = ends - starts > 0  # skip blank lines
        self._starts, self._ends = starts[keep], ends[keep]
        self._lines = np.flatnonzero(keep) + 1  # each row's line number in the file, for errors
        del raw  # the mmap must not be exported when it is closed
        if not len(self._starts):
            raise UserInputError(f"{self.path}: no documents, every line is blank (search.corpus)")

    def __len__(self) -> int:
        return len(self._starts)

    def raw(self, i: int) -> dict:
        line = self._mm[int(self._starts[i]) : int(self._ends[i])]
        where = f"{self.path}:{self._lines[i]}"
        try:
            d = json.loads(line)
        except ValueError as e:
            raise UserInputError(f"{where}: not a JSON object ({e})") from None
        if not isinstance(d, dict) or not isinstance(d.get("contents", d.get("text")), str):
            raise UserInputError(f"{where}: a document needs a string `contents` (or `text`) field, "
                                 f'e.g. {{"id": "1", "contents": "..."}}')
        return d

    def validate(self) -> None:
        """Read every row once (what an index build or a run would meet later, inside an actor): the first bad
        one raises, naming file and line. Remembered per file version (path, size, modification time) under
        the piplay home, so a large corpus is read once, not every run."""
        from piplay_ray import assets

        st = self.path.stat()
        key = hashlib.sha256(f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
        stamp = assets.home() / "checked-corpora" / key
        if stamp.is_file():
            return
        for i in range(len(self)):
            self.raw(i)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(f"{self.path}\n")

    def __getitem__(self, i: int) -> Doc:
        d = self.raw(i)
        contents = d.get("contents", d.get("text"))
        return Doc(id=str(d.get("id", i)), title=str(d.get("title") or title_of(contents)), contents=contents)

    def __iter__(self) -> Iterator[Doc]:
        return (self[i] for i in range(len(self)))

    def texts(self, start: int = 0, stop: int | None = None) -> Iterator[str]:
        """The text to index per row (rows start..stop): the contents, which for wiki JSONL already start
        with the title."""
        for i in range(start, min(len(self), len(self) if stop is None else stop)):
            d = self.raw(i)
            contents = d.get("contents", d.get("text"))
            title = d.get("title")
            yield contents if not title or title in contents[: len(title) + 4] else f"{title}\n{contents}"

    def checksum(self) -> str:
        h = hashlib.sha256()
        for off in range(0, len(self._mm), 1 << 22):
            h.update(self._mm[off : off + (1 << 22)])
        return h.hexdigest()


def title_of(contents: str) -> str:
    """The Search-R1 / FlashRAG wiki convention: the first line holds the title, in double quotes."""
    first = contents.split("\n", 1)[0].strip()
    return first[1:-1] if len(first) >= 2 and first[0] == first[-1] == '"' else first[:100]


def doc_to_wire(doc: Doc) -> dict:
    return {"id": doc.id, "title": doc.title, "contents": doc.contents}


def index_folder(corpus: Corpus, kind: str, params: dict, index_dir: str | None = None) -> Path:
    """Where the `kind` index of `corpus` built with `params` lives: keyed by corpus checksum and params.

    Default: ``<corpus folder>/.piplay-index/``; an explicit ``index_dir`` from the config wins.
    """
    key = hashlib.sha256(json.dumps([corpus.checksum(), kind, params], sort_keys=True).encode()).hexdigest()[:16]
    root = Path(index_dir) if index_dir else corpus.path.parent / ".piplay-index"
    return root / f"{corpus.path.stem}-{kind}-{key}"


def build_once(dest: Path, builder: Callable[[Path], None], params: dict | None = None) -> Path:
    """Run `builder(tmp)` and rename the result to `dest` unless `dest` is complete already.

    The rename is atomic, so concurrent builders (several test sessions, several replicas) never see a
    half-written index; the loser of a race just discards its copy.
    """
    if (dest / "DONE").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        builder(tmp)
        (tmp / "DONE").write_text(json.dumps(params or {}, sort_keys=True))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first (dest exists and is not empty)
            if not (dest / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
