"""Arrow schemas of the data stage's Parquet files (a contract for the tokenizer and users)."""

import pyarrow as pa

DOCUMENT_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),  # "<source>/<file or record>", stable across runs
    pa.field("source", pa.string(), nullable=False),  # SourceConfig.name
    pa.field("text", pa.string(), nullable=False),
    pa.field("metadata", pa.string(), nullable=False),  # JSON object: path, title, licence, ...
    pa.field("copy", pa.int32(), nullable=False),  # 0 for the first copy; mixture up-sampling adds 1, 2, ...
])

DUPLICATE_SCHEMA = pa.schema([
    pa.field("removed_id", pa.string(), nullable=False),
    pa.field("kept_id", pa.string(), nullable=False),  # the document it duplicated
    pa.field("kind", pa.string(), nullable=False),  # "exact" or "near"
    # near: the removed document's highest exact Jaccard (word n-gram shingles) to a member of
    # its cluster; exact: 1.0
    pa.field("similarity", pa.float64(), nullable=False),
])

DROPPED_SCHEMA = pa.schema([  # dropped/*.parquet: the audit of every rule's decisions
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # the rule, e.g. gopher_top_2gram
    pa.field("value", pa.float64(), nullable=False),  # what the rule measured (a ratio, a count)
    pa.field("text", pa.string(), nullable=False),  # after the rules that ran before it
    pa.field("metadata", pa.string(), nullable=False),
])
