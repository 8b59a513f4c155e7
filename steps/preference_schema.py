"""The Arrow schema of ingested preference pairs (RECIPE.md section 6): the table every
`prefs_v{i}` artifact holds as `pairs.parquet` and the reward models, rejection sampling and
evaluation read. The vendor-facing batch contract (JSONL/Parquet rows a vendor writes) is
documented in the README and validated by steps/preferences.py; this is what it becomes once
accepted: the prompt normalised to a list of turns, plus the accepted batch's version and a
fixed train/eval split per pair.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

STRENGTHS = ("significantly_better", "better", "slightly_better", "negligibly_better")
AXES = ("helpfulness", "safety")
SAFETY_LABELS = ("chosen_safe_rejected_unsafe", "both_safe", "both_unsafe")
ROLES = ("system", "user", "assistant")

TURN = pa.struct([pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)])

PAIR_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    # earlier turns, an optional system turn first, ending with the user turn being answered
    pa.field("prompt", pa.list_(TURN), nullable=False),
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("strength", pa.string(), nullable=False),  # one of STRENGTHS
    pa.field("axis", pa.string(), nullable=False),  # one of AXES
    pa.field("safety_label", pa.string()),  # one of SAFETY_LABELS; null unless axis == safety
    pa.field("source", pa.string(), nullable=False),  # "vendor", "anthropic-hh", ...
    pa.field("annotator_id", pa.string()),
    pa.field("annotated_at", pa.string()),
    pa.field("model_chosen", pa.string()),
    pa.field("model_rejected", pa.string()),
    pa.field("batch", pa.string(), nullable=False),  # accepted batch version "<seq:04d>-<digest[:12]>"
    pa.field("split", pa.string(), nullable=False),  # "train" | "eval": fixed per pair (pair_split)
])


def pair_split(pair_id: str, eval_fraction: float) -> str:
    """A pair's held-out membership, fixed forever by its id (never by arrival order)."""
    h = int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "little")
    return "eval" if h / 2**64 < eval_fraction else "train"


# ----------------------------------------------------------------------------- the batch contract
# One vendor row, as the README's batch contract documents it. Pydantic (strict: no "5" -> 5
# coercion, no unknown fields) does the typing; the validators below add the rules no type
# expresses. Error messages are written for the vendor who has to fix the row.
CONTRACT_FIELDS = ("pair_id", "prompt", "chosen", "rejected", "strength", "axis", "safety_label", "source",
                   "annotator_id", "annotated_at", "model_chosen", "model_rejected")
TEXT_FIELDS = ("chosen", "rejected")  # plus every turn of the prompt; all under max_text_chars
INVALID_SAFETY_CASE = "chosen_unsafe_rejected_safe"


def _utf8(value: str) -> str:
    try:  # a JSON "\ud800" escape parses to a lone surrogate, which no UTF-8 file can hold
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid UTF-8 (unpaired surrogate at character {e.start})") from None
    return value


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("empty or whitespace-only text")
    return _utf8(value)


Text = Annotated[str, AfterValidator(_text)]
OptionalText = Annotated[str | None, AfterValidator(lambda v: v if v is None else _utf8(v))]


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: Text


class BatchRow(BaseModel):
    """One comparison as a vendor delivers it (the public batch contract)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    pair_id: Text
    prompt: Text | list[Turn] = Field(union_mode="left_to_right")
    chosen: Text
    rejected: Text
    strength: Literal[STRENGTHS]  # type: ignore[valid-type]
    axis: Literal[AXES]  # type: ignore[valid-type]
    safety_label: Literal[SAFETY_LABELS] | None = None  # type: ignore[valid-type]
    source: Text
    annotator_id: OptionalText = None
    annotated_at: OptionalText = None
    model_chosen: OptionalText = None
    model_rejected: OptionalText = None

    @field_validator("safety_label", mode="before")
    @classmethod
    def _paper_rule(cls, v: Any) -> Any:
        if v == INVALID_SAFETY_CASE:
            raise ValueError(f"{v!r} is not allowed: a pair whose chosen response is unsafe and rejected one "
                             "safe is never used (RECIPE 6); drop the pair or swap chosen and rejected")
        return v

    def turns(self) -> list[dict[str, str]]:
        """The prompt normalised to turns (a plain string is one user turn)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [t.model_dump() for t in self.prompt]


@dataclass(frozen=True)
class Problem:
    """One reason a row (or a whole file, row None) is invalid: `file:row: field: message`."""

    file: str
    row: int | None  # 1-based line of a JSONL file / row of a Parquet file / item of a JSON array
    field: str  # "-" when the problem is not one field's
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row if self.row is not None else '-'}: {self.field}: {self.message}"


def check_row(obj: Any, file: str, row: int, max_text_chars: int) -> tuple[BatchRow | None, list[Problem]]:
    """Validate one decoded row against the contract; the model or the row's problems."""
    if not isinstance(obj, dict):
        return None, [Problem(file, row, "-", f"a row must be an object, got {_kind(obj)}")]
    try:
        parsed = BatchRow.model_validate(obj)
    except ValidationError as e:
        return None, _problems(e, obj, file, row)
    out = []
    if parsed.chosen == parsed.rejected:
        out.append(Problem(file, row, "rejected",
                           "identical to chosen: a comparison needs two different responses"))
    if parsed.axis == "safety" and parsed.safety_label is None:
        out.append(Problem(file, row, "safety_label",
                           f"required when axis is 'safety' (one of {', '.join(SAFETY_LABELS)})"))
    if parsed.axis != "safety" and parsed.safety_label is not None:
        out.append(Problem(file, row, "safety_label",
                           f"only allowed when axis is 'safety' (axis is {parsed.axis!r})"))
    if isinstance(parsed.prompt, list):
        out += _check_turns(parsed.prompt, file, row)
        prompt_texts = [(f"prompt[{i}].content", t.content) for i, t in enumerate(parsed.prompt)]
    else:
        prompt_texts = [("prompt", parsed.prompt)]
    for name, text in prompt_texts + [(f, getattr(parsed, f)) for f in TEXT_FIELDS]:
        if len(text) > max_text_chars:
            out.append(Problem(file, row, name, f"{len(text)} characters, over the limit of {max_text_chars} "
                                                "(preference.max_text_chars)"))
    return (None, out) if out else (parsed, [])


def _check_turns(turns: list[Turn], file: str, row: int) -> list[Problem]:
    if not turns:
        return [Problem(file, row, "prompt", "an empty list of turns")]
    out = []
    if turns[-1].role != "user":
        out.append(Problem(file, row, f"prompt[{len(turns) - 1}].role",
                           f"the last turn must be the user's (got {turns[-1].role!r})"))
    for i, t in enumerate(turns):
        if t.role == "system" and i != 0:
            out.append(Problem(file, row, f"prompt[{i}].role", "a system turn may only come first"))
    return out


def _kind(v: Any) -> str:
    return "null" if v is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                     int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _problems(err: ValidationError, obj: dict[str, Any], file: str, row: int) -> list[Problem]:
    """Pydantic's errors in the contract's words, one per field (a union yields one per branch)."""
    by_field: dict[str, Problem] = {}
    for e in err.errors():
        # drop pydantic's union-branch tags ('str', 'list[Turn]', 'function-after[...]') from the path
        loc = [p for i, p in enumerate(e["loc"]) if i == 0 or isinstance(p, int) or not _branch_tag(p)]
        top = str(loc[0]) if loc else "-"
        if top == "prompt":
            value = obj.get("prompt")
            branch = e["loc"][1] if len(e["loc"]) > 1 else ""
            if isinstance(value, list) == (not str(branch).startswith("list")) and e["type"] != "missing":
                continue  # the error of the branch that does not apply to this value's type
            if not isinstance(value, (str, list)) and e["type"] != "missing":
                by_field["prompt"] = Problem(file, row, "prompt", "must be a string or a list of "
                                                                  f"{{role, content}} turns, got {_kind(value)}")
                continue
        name = top + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        message = "unknown field (a turn has only role and content)" if (
            e["type"] == "extra_forbidden" and len(loc) > 1) else _message(e)
        by_field.setdefault(name, Problem(file, row, name, message))
    return list(by_field.values())


def _branch_tag(part: str) -> bool:
    return part in ("str", "none") or "[" in part


def _message(e: Any) -> str:
    kind, got = e["type"], e.get("input")
    if kind == "missing":
        return "missing (a required field)"
    if kind == "extra_forbidden":
        return f"unknown field (the contract's fields are: {', '.join(CONTRACT_FIELDS)})"
    if kind == "literal_error":
        expected = e["ctx"]["expected"].replace(" or ", ", ")
        return f"{got!r} is not one of {expected}"
    if kind in ("string_type", "list_type", "model_type", "model_attributes_type", "dict_type"):
        want = {"string_type": "a string", "list_type": "a list"}.get(kind, "an object")
        return f"expected {want}, got {_kind(got)}"
    return e["msg"].removeprefix("Value error, ")
