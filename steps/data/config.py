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
    """C4 (Raffel et al. 2020, section 2.2) and Gopher (Rae et al. 2021, appendix A1.1) rules.

    Defaults are the papers' thresholds; every rule reports its measured value with a drop."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1  # "#" and ellipses per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    # Gopher repetition rules (table A1): duplicate lines / paragraphs by count and by characters
    max_dup_line_ratio: float = 0.3
    max_dup_para_ratio: float = 0.3
    max_dup_line_char_ratio: float = 0.2
    max_dup_para_char_ratio: float = 0.2
    # share of characters in the most frequent 2-, 3-, 4-gram; in duplicated 5..10-grams
    max_top_ngram_char_ratio: dict[int, float] = Field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_ratio: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    c4_min_sentences: int = 5  # C4 (and TFDS c4_utils): pages with fewer sentences go
    c4_min_words_per_line: int = 3
    c4_require_terminal_punct: bool = True
    c4_max_word_len: int = 1000  # a line holding a longer "word" is not prose
    languages: list[str] = Field(default_factory=lambda: ["en"])
    min_language_score: float = 0.65


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(a pair with this Jaccard shares at least one LSH band) = 1 - (1 - J^rows)^bands."""
    return 1.0 - (1.0 - jaccard ** rows) ** bands


class DedupConfig(Section):
    """Exact and MinHash near-duplicate removal.

    `threshold` is a Jaccard similarity of the SETS of word `ngram`-grams (shingles) of the two
    documents' normalised text (NFKC, lower case, punctuation removed, split on whitespace),
    each shingle hashed to 32 bits. MinHash + LSH only proposes candidates; a candidate pair is
    a duplicate when its EXACT Jaccard over the shingle sets is >= threshold. `bands` x rows
    (= num_perm / bands) must make a pair AT the threshold a candidate with probability >=
    `min_candidate_probability`."""

    exact: bool = True
    minhash: bool = True
    ngram: int = Field(5, ge=1)  # word shingles
    num_perm: int = Field(100, ge=8)
    bands: int = Field(20, ge=1)
    threshold: float = Field(0.8, gt=0, le=1)
    min_candidate_probability: float = Field(0.99, gt=0, lt=1)
    max_bucket_all_pairs: int = Field(32, ge=2)  # larger LSH buckets: star + chain, not all pairs
    # False: every LSH bucket collision is a duplicate, unchecked, as datatrove, NeMo Curator and
    # dolma do. Cheaper, but a pair well below the threshold collides often (20 x 5 bands: p = 0.47
    # at J = 0.5), so precision drops; for like-for-like benchmarks, not for training data.
    verify: bool = True
    line_dedup: bool = True  # CCNet-style: drop lines repeated across many web documents
    line_min_count: int = 3
    max_component_rounds: int = Field(64, ge=1)

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        p = candidate_probability(self.threshold, self.bands, self.rows)
        if self.minhash and p < self.min_candidate_probability:
            raise ValueError(
                f"dedup: {self.bands} bands x {self.rows} rows make a pair at Jaccard {self.threshold} a "
                f"candidate with probability {p:.3f} < {self.min_candidate_probability}; use more bands "
                f"or fewer rows per band (e.g. 20 x 5 for 0.8, 20 x 4 for 0.7)")
        return self


class DataConfig(Section):
    sources: list[SourceConfig]
    quality: QualityConfig = QualityConfig()
    dedup: DedupConfig = DedupConfig()
    pii: bool = True
    on_error: Literal["skip", "fail"] = "skip"  # corrupt input: report and skip, or stop
    num_shards: int = Field(4, ge=1)  # deprecated: output files are sized by shard_bytes
    shard_bytes: int = Field(256 * 2**20, ge=1)  # target text bytes per output Parquet file
    row_group_rows: int = Field(100_000, ge=1)
    drop_audit_fraction: float = Field(1.0, ge=0, le=1)  # dropped documents written to dropped/ (by id hash)
    block_bytes: int = Field(16 * 2**20, ge=1)  # text per block (the unit of every task)
    num_partitions: int | None = Field(None, ge=1)  # shuffle partitions; default: CPUs or text / partition_bytes
    partition_bytes: int = Field(512 * 2**20, ge=1)
    cpus_per_task: float = Field(1.0, gt=0)
    total_tokens: int | None = Field(None, gt=0)  # mixture size when sources use weights
