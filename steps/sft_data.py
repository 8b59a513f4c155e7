"""SFT data: dialogue readers, the dialogue Parquet schema, and packing with prompt masking.

Readers turn public formats into Dialogues (errors name the file, row and field):
    alpaca     [{"instruction", "input", "output"}]            (JSON array or JSONL)
    sharegpt   [{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}]
    messages   [{"messages": [{"role": "system"|"user"|"assistant", "content"}]}]
Packing (RECIPE 5): tokenized dialogues are concatenated to fill rows of seq_len tokens; each
example keeps its own segment id and positions restarting at 0, so attention stays inside it;
targets are -100 except on assistant answers (and their </s>). An example longer than
seq_len is truncated to seq_len (counted in the stats); it is never split across rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.chat import Dialogue, Turn, encode_dialogue
from model.tokenizer import Tokenizer

DIALOGUE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("system", pa.string()),
    pa.field("turns", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("train", pa.bool_())])),
             nullable=False),
])
PACKED_SCHEMA = pa.schema([pa.field(n, pa.list_(pa.int32()), nullable=False)
                           for n in ("tokens", "targets", "segment_ids", "positions")])


class BadDialogueError(ValueError):
    pass


def _records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadDialogueError(f"{path}:{i}: invalid JSON: {e.msg}") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadDialogueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise BadDialogueError(f"{path}: expected a JSON array of records")
    return data


def _need(rec: dict, key: str, path: Path, row: int) -> str:
    value = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(value, str):
        raise BadDialogueError(f"{path}: row {row}: field {key!r} missing or not a string")
    return value


def from_alpaca(rec: dict, path: Path, row: int) -> Dialogue:
    instruction, output = _need(rec, "instruction", path, row), _need(rec, "output", path, row)
    extra = rec.get("input") or ""
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Dialogue([Turn("user", prompt), Turn("assistant", output)], rec.get("system") or None)


def _alternating(pairs: list[tuple[str, str]], path: Path, row: int) -> Dialogue:
    system = None
    turns = []
    for i, (role, content) in enumerate(pairs):
        if role == "system" and i == 0:
            system = content
            continue
        turns.append(Turn(role, content))
    try:
        return Dialogue(turns, system)
    except ValueError as e:
        raise BadDialogueError(f"{path}: row {row}: {e}") from None


def from_sharegpt(rec: dict, path: Path, row: int) -> Dialogue:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    conv = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(conv, list):
        raise BadDialogueError(f"{path}: row {row}: field 'conversations' missing or not a list")
    pairs = []
    for j, m in enumerate(conv):
        if not isinstance(m, dict) or m.get("from") not in roles or not isinstance(m.get("value"), str):
            raise BadDialogueError(f"{path}: row {row}: conversations[{j}] needs 'from' in {sorted(roles)} and 'value'")
        pairs.append((roles[m["from"]], m["value"]))
    return _alternating(pairs, path, row)


def from_messages(rec: dict, path: Path, row: int) -> Dialogue:
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list):
        raise BadDialogueError(f"{path}: row {row}: field 'messages' missing or not a list")
    pairs = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise BadDialogueError(f"{path}: row {row}: messages[{j}] needs 'role' and 'content'")
        pairs.append((m["role"], m["content"]))
    return _alternating(pairs, path, row)


def read_dialogues(path: str | Path) -> list[Dialogue]:
    """Detect the format from the first record and read every row."""
    path = Path(path)
    records = _records(path)
    if not records:
        return []
    first = records[0] if isinstance(records[0], dict) else {}
    reader = from_messages if "messages" in first else from_sharegpt if "conversations" in first else from_alpaca
    return [reader(rec, path, i) for i, rec in enumerate(records)]


def to_table(dialogues: list[Dialogue], source: str) -> pa.Table:
    rows = [{"id": f"{source}/{i}", "source": source, "system": d.system,
             "turns": [{"role": t.role, "content": t.content, "train": t.train} for t in d.turns]}
            for i, d in enumerate(dialogues)]
    return pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)


def from_table(table: pa.Table) -> list[Dialogue]:
    return [Dialogue([Turn(t["role"], t["content"], t["train"]) for t in r["turns"]], r["system"])
            for r in table.to_pylist()]


def pack(tok: Tokenizer, dialogues: list[Dialogue], seq_len: int) -> tuple[dict[str, list[np.ndarray]], dict]:
    """Greedy packing in order; returns columns of PACKED_SCHEMA and stats."""
    rows: dict[str, list[np.ndarray]] = {k: [] for k in PACKED_SCHEMA.names}
    cur = {k: [] for k in rows}
    seg, truncated, trained, total = 0, 0, 0, 0

    def flush() -> None:
        nonlocal seg
        if not cur["tokens"]:
            return
        pad = seq_len - len(cur["tokens"])
        cur["tokens"] += [tok.pad_id] * pad
        cur["targets"] += [-100] * pad
        cur["segment_ids"] += [seg] * pad  # padding gets the next unused id: no example attends to it
        cur["positions"] += list(range(pad))
        for k in rows:
            rows[k].append(np.asarray(cur[k], dtype=np.int32))
            cur[k] = []
        seg = 0

    for d in dialogues:
        ids, mask = encode_dialogue(tok, d)
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            truncated += 1
        # next-token targets inside the example: token i predicts ids[i+1] where that is trained
        targets = [ids[i + 1] if mask[i + 1] else -100 for i in range(len(ids) - 1)] + [-100]
        if len(cur["tokens"]) + len(ids) > seq_len:
            flush()
        cur["tokens"] += ids
        cur["targets"] += targets
        cur["segment_ids"] += [seg] * len(ids)
        cur["positions"] += list(range(len(ids)))
        seg += 1
        trained += sum(t != -100 for t in targets)
        total += len(ids)
    flush()
    stats = {"examples": len(dialogues), "rows": len(rows["tokens"]), "truncated": truncated,
             "trained_token_fraction": trained / max(total, 1),
             "fill": total / max(len(rows["tokens"]) * seq_len, 1)}
    return rows, stats


def write_packed(rows: dict[str, list[np.ndarray]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in rows.items()}, schema=PACKED_SCHEMA)
    pq.write_table(table, path)
