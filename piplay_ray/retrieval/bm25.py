"""Fielded BM25 over a JSONL corpus with bm25s: built once, cached beside the corpus, loaded memory-mapped.

Two indexes share one vocabulary: the document text and its title. A document's score is
``bm25_text + title_weight * bm25_title`` (a simple BM25F): each field keeps its own length normalisation,
so the article titled "Nebula" beats "Orion Nebula" for the query "nebula", which one flat index gets wrong
for about one title query in ten. ``title_weight=0`` uses the text index alone through bm25s' batched top-k.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bm25s
import numpy as np
import scipy.sparse as sp
import Stemmer
from bm25s.tokenization import Tokenized, Tokenizer

from piplay_ray.assets import resolve_corpus
from piplay_ray.records import Doc
from piplay_ray.retrieval.base import Retriever
from piplay_ray.retrieval.corpus import Corpus, build_once, index_folder
from piplay_ray.retrieval.queries import check_topk, clean_query

VERSION = 2  # bump when the index layout changes, so old caches are not reused


def _tokenizer() -> Tokenizer:
    return Tokenizer(lower=True, stopwords="english", stemmer=Stemmer.Stemmer("english"))


def build_bm25_index(corpus: Corpus, index_dir: str | None = None, k1: float = 0.9, b: float = 0.4,
                     show_progress: bool = True) -> Path:
    """Build (or find) the BM25 index of `corpus`; k1/b default to Pyserini's, as Search-R1 uses."""
    params = {"v": VERSION, "k1": k1, "b": b, "stem": "english", "stopwords": "english"}
    dest = index_folder(corpus, "bm25", params, index_dir)

    def build(tmp: Path) -> None:
        tok = _tokenizer()
        ids = tok.tokenize(list(corpus.texts()), return_as="ids", show_progress=show_progress)
        titles = tok.tokenize([corpus[i].title for i in range(len(corpus))], update_vocab=False,
                              return_as="ids", show_progress=False)
        vocab = tok.get_vocab_dict()
        for field, field_ids in (("text", ids), ("title", titles)):
            model = bm25s.BM25(k1=k1, b=b)
            model.index(Tokenized(field_ids, vocab), show_progress=show_progress)
            model.save(tmp / field)
        tok.save_vocab(tmp)
        tok.save_stopwords(tmp)

    return build_once(dest, build, params)


class BM25Retriever(Retriever):
    @classmethod
    def from_config(cls, cfg, show_progress: bool = False) -> BM25Retriever:
        return cls(resolve_corpus(cfg.corpus), cfg.index_dir, show_progress=show_progress, max_topk=cfg.max_topk,
                   max_query_chars=cfg.max_query_chars)

    @classmethod
    def build_index(cls, cfg) -> Path:
        return build_bm25_index(Corpus(resolve_corpus(cfg.corpus)), cfg.index_dir, show_progress=True)

    def __init__(self, corpus: str | os.PathLike | Corpus, index_dir: str | None = None, max_topk: int = 50,
                 max_query_chars: int = 512, title_weight: float = 1.0, show_progress: bool = False):
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
        self.max_topk, self.max_query_chars, self.title_weight = max_topk, max_query_chars, title_weight
        self.index_path = build_bm25_index(self.corpus, index_dir, show_progress=show_progress)
        self.model = bm25s.BM25.load(self.index_path / "text", mmap=True, show_progress=False)
        self.title_model = bm25s.BM25.load(self.index_path / "title", mmap=True, show_progress=False)
        self._vocab = len(self.model.vocab_dict)
        self._text, self._title = (sp.csc_matrix((m.scores["data"], m.scores["indices"], m.scores["indptr"]),
                                                 shape=(m.scores["num_docs"], self._vocab))
                                   for m in (self.model, self.title_model))
        self.tokenizer = _tokenizer()
        self.tokenizer.load_vocab(self.index_path)
        self.tokenizer.load_stopwords(self.index_path)
        if len(self.corpus) != self.model.scores["num_docs"]:
            raise RuntimeError(f"{self.index_path}: index has {self.model.scores['num_docs']} docs, "
                               f"the corpus {len(self.corpus)}; delete the index folder to rebuild it")

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        k = min(check_topk(topk, self.max_topk), len(self.corpus))
        cleaned = [clean_query(q, self.max_query_chars) for q in queries]
        out: list[list[Doc]] = [[] for _ in queries]
        live = [i for i, q in enumerate(cleaned) if q]
        if not live:
            return out
        ids = self.tokenizer.tokenize([cleaned[i] for i in live], update_vocab=False, return_as="ids",
                                      show_progress=False)
        # unknown words and stopwords map to the empty token; a query of nothing else matches nothing
        empty = self.tokenizer.get_vocab_dict().get("")
        ids = [[t for t in q if t != empty] for q in ids]
        live, ids = [i for i, q in zip(live, ids, strict=True) if q], [q for q in ids if q]
        if not live:
            return out
        if self.title_weight:
            rows, scores = self._fielded_topk(ids, k)
        else:
            rows, scores = self.model.retrieve(ids, k=k, show_progress=False, n_threads=1)
        for i, row, score in zip(live, rows, scores, strict=True):
            hits = np.asarray(score) > 0  # no query term in the document: not a result
            out[i] = [self._doc(r, s) for r, s in zip(row[hits], score[hits], strict=True)]
        return out

    def _fielded_topk(self, ids: list[list[int]], k: int, chunk: int = 64):
        """Top-k by text + title score for a batch: one sparse product per field and chunk of queries.

        bm25s stores each field as a (docs x vocab) CSC matrix of per-term scores, so the scores of a batch
        are ``S @ Q`` with ``Q[t, j]`` = count of term t in query j, the same sum bm25s computes one query
        at a time.
        """
        rows, scores = [], []
        for lo in range(0, len(ids), chunk):
            part = ids[lo : lo + chunk]
            cols = np.repeat(np.arange(len(part)), [len(q) for q in part])
            terms = np.concatenate([np.asarray(q, dtype=np.int64) for q in part])
            q = sp.csr_matrix((np.ones(len(terms), np.float32), (terms, cols)), shape=(self._vocab, len(part)))
            s = (self._text @ q).toarray() + self.title_weight * (self._title @ q).toarray()  # docs x queries
            for j in range(len(part)):
                col = s[:, j]
                top = np.argpartition(-col, k - 1)[:k] if k < len(col) else np.arange(len(col))
                top = top[np.lexsort((top, -col[top]))]  # by score, ties by row: deterministic
                rows.append(top)
                scores.append(col[top])
        return rows, scores

    def _doc(self, row: int, score: float) -> Doc:
        doc = self.corpus[int(row)]
        doc.score = float(score)
        return doc


if __name__ == "__main__":  # python -m piplay_ray.retrieval.bm25 corpus.jsonl: build the index
    print(build_bm25_index(Corpus(sys.argv[1])))
