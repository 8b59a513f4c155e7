"""The data step's config: sources, quality rules, dedup, PII, shards (RECIPE.md section 1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from model.config import Section

SourceKind = Literal["text", "gutenberg", "jsonl", "parquet", "mediawiki", "code", "stackexchange"]


class SourceConfig(Section):
    """One raw corpus. Exactly one of `weight` (share of output tokens) or `epochs`
    (passes over the cleaned source) sets how much of it the mixture takes."""

    name: str
    kind: SourceKind
    paths: list[str]  # files, directories or glob patterns; relative to the working dir
    weight: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    text_field: str = "text"  # jsonl / parquet
    line_documents: bool = False  # text: one document per line instead of per file
    licenses: list[str] = Field(default_factory=lambda: ["MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "PSF-2.0"])
    quality_filter: bool = True  # code keeps its own heuristics
    max_docs: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_amount(self) -> SourceConfig:
        if (self.weight is None) == (self.epochs is None):
            raise ValueError(f"source {self.name!r}: set exactly one of weight or epochs")
        return self


class QualityConfig(Section):
    """Gopher / C4 style document heuristics (thresholds as in the Gopher paper, Rae et al. 2021)."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    max_dup_line_ratio: float = 0.3
    c4_min_sentences: int = 3
    c4_min_words_per_line: int = 3
    c4_require_terminal_punct: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"])
    min_language_score: float = 0.65


class DedupConfig(Section):
    exact: bool = True
    minhash: bool = True
    ngram: int = Field(5, ge=1)  # word shingles
    num_perm: int = Field(112, ge=8)
    bands: int = Field(14, ge=1)
    threshold: float = Field(0.8, gt=0, le=1)  # Jaccard similarity counted as a near duplicate
    line_dedup: bool = True  # CCNet-style: drop lines repeated across many web documents
    line_min_count: int = 3

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class DataConfig(Section):
    sources: list[SourceConfig]
    quality: QualityConfig = QualityConfig()
    dedup: DedupConfig = DedupConfig()
    pii: bool = True
    on_error: Literal["skip", "fail"] = "skip"  # corrupt input: report and skip, or stop
    num_shards: int = Field(4, ge=1)
    total_tokens: int | None = Field(None, gt=0)  # mixture size when sources use weights
