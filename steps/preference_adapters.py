"""Adapters from public preference formats to the batch contract (steps/preference_schema.py).

Each adapter maps one raw row to one contract row; the result then goes through exactly the
same validation as a vendor's row, so an adapter never has to be trusted. A row the adapter
cannot read raises AdapterError(field, message), reported as `file:row: field: message`.

Rules for the fields the public formats lack (also in the README):
- pair_id: `<format>-` + the first 16 hex digits of sha256 over the normalised prompt, chosen
  and rejected (SHP: its own post and comment ids). Same content, same id, so a re-delivered
  public file is recognised as duplicates.
- strength: formats with a plain binary preference (HH, ShareGPT-DPO) give `better`, the
  contract's unqualified level; SHP derives it from the score ratio (SHP_STRENGTH below).
- axis: `helpfulness`, except HH rows from a file whose path contains "harmless" (Anthropic's
  harmless-base red-team data, which the paper mixes into the safety RM): `safety` with
  safety_label `both_unsafe`, the label that claims nothing is safe (HH grades harm relatively:
  its chosen answer is the less harmful one, not a certified safe one).
- source: `anthropic-hh`, `sharegpt-dpo`, `stanford-shp`.
- Any contract field already present in the raw row (pair_id, strength, axis, safety_label,
  source, annotator_id, annotated_at, model_chosen, model_rejected) is kept as given.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from steps.preference_schema import CONTRACT_FIELDS

FORMATS = ("contract", "hh", "sharegpt-dpo", "shp")

# SHP: strength from r = score(preferred) / score(other). SHP keeps only pairs with r >= 2
# (its authors' filter), so the levels split that range; a ratio under 2 is 'negligibly_better'.
SHP_STRENGTH = ((8.0, "significantly_better"), (4.0, "better"), (2.0, "slightly_better"))

_PASSTHROUGH = tuple(f for f in CONTRACT_FIELDS if f not in ("prompt", "chosen", "rejected"))


class AdapterError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def adapt(fmt: str, row: Any, file: str) -> Any:
    """The contract row for one raw row of format `fmt` (identity for 'contract')."""
    if fmt == "contract":
        return row
    if not isinstance(row, dict):
        raise AdapterError("-", f"a {fmt} row must be an object")
    out = ADAPTERS[fmt](row, file)
    out.update({k: row[k] for k in _PASSTHROUGH if k in row})
    return out


def _pair_id(prefix: str, prompt: Any, chosen: str, rejected: str) -> str:
    payload = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
    return f"{prefix}-{hashlib.sha256(payload.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def _str(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise AdapterError(key, "missing" if v is None else f"expected a string, got {type(v).__name__}")
    return v


# ----------------------------------------------------------------------------- Anthropic HH-RLHF
# "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant: <answer>" for chosen and for
# rejected; the two transcripts share everything before the last "Assistant:".
_HH_MARKER = re.compile(r"\n\n(Human|Assistant): ?")


def hh_turns(transcript: str, field: str) -> list[dict[str, str]]:
    """Parse one HH transcript into {role, content} turns."""
    parts = _HH_MARKER.split(transcript if transcript.startswith("\n\n") else "\n\n" + transcript)
    if parts[0].strip():
        raise AdapterError(field, "text before the first '\\n\\nHuman:' marker")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
             for who, text in zip(parts[1::2], parts[2::2], strict=True)]
    if not turns or turns[-1]["role"] != "assistant":
        raise AdapterError(field, "the transcript must end with an '\\n\\nAssistant:' turn")
    return turns


def from_hh(row: dict[str, Any], file: str) -> dict[str, Any]:
    chosen, rejected = hh_turns(_str(row, "chosen"), "chosen"), hh_turns(_str(row, "rejected"), "rejected")
    prompt = chosen[:-1]
    if rejected[:-1] != prompt:
        raise AdapterError("rejected",
                           "the chosen and rejected transcripts differ before the last Assistant turn")
    out: dict[str, Any] = {
        "pair_id": _pair_id("hh", prompt, chosen[-1]["content"], rejected[-1]["content"]),
        "prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"],
        "strength": "better", "axis": "helpfulness", "source": "anthropic-hh"}
    if "harmless" in file.lower():
        out.update(axis="safety", safety_label="both_unsafe")
    return out


# ----------------------------------------------------------------------------- ShareGPT-style DPO
# {"conversations": [{"from": "human", "value": ...}, ...], "chosen": {"from": "gpt", "value": ...},
#  "rejected": {...}} (LLaMA-Factory's "ranking" sharegpt layout); an optional "system" string;
# turns may also be OpenAI-style {"role", "content"}; chosen/rejected may be plain strings.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
          "chatgpt": "assistant", "model": "assistant", "system": "system"}


def _turn(t: Any, where: str) -> dict[str, str]:
    if not isinstance(t, dict):
        raise AdapterError(where, "a turn must be an object")
    who, text = t.get("from", t.get("role")), t.get("value", t.get("content"))
    if who not in _ROLES:
        raise AdapterError(where, f"unknown speaker {who!r} (known: {', '.join(sorted(_ROLES))})")
    if not isinstance(text, str):
        raise AdapterError(where, "a turn needs a string 'value' (or 'content')")
    return {"role": _ROLES[who], "content": text}


def _answer(v: Any, field: str) -> str:
    if isinstance(v, str):
        return v
    turn = _turn(v, field)
    if turn["role"] != "assistant":
        raise AdapterError(field, f"the answer's speaker must be the assistant, got {turn['role']!r}")
    return turn["content"]


def from_sharegpt_dpo(row: dict[str, Any], file: str) -> dict[str, Any]:
    conv = row.get("conversations", row.get("messages"))
    if not isinstance(conv, list):
        raise AdapterError("conversations", "missing or not a list of turns")
    prompt = [_turn(t, f"conversations[{i}]") for i, t in enumerate(conv)]
    if isinstance(row.get("system"), str) and row["system"].strip():
        prompt.insert(0, {"role": "system", "content": row["system"]})
    chosen, rejected = _answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected")
    return {"pair_id": _pair_id("sharegpt", prompt, chosen, rejected), "prompt": prompt, "chosen": chosen,
            "rejected": rejected, "strength": "better", "axis": "helpfulness", "source": "sharegpt-dpo"}


# ----------------------------------------------------------------------------- Stanford SHP
# {"post_id", "history" (the post), "c_root_id_A/B", "human_ref_A/B" (two comments),
#  "score_A/B" (their net upvotes), "labels" (1: A preferred, 0: B), optional "score_ratio"}.
def shp_strength(ratio: float) -> str:
    for threshold, name in SHP_STRENGTH:
        if ratio >= threshold:
            return name
    return "negligibly_better"


def from_shp(row: dict[str, Any], file: str) -> dict[str, Any]:
    a, b = _str(row, "human_ref_A"), _str(row, "human_ref_B")
    scores = [row.get("score_A"), row.get("score_B")]
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise AdapterError("score_A", "score_A and score_B must be numbers")
    label = row.get("labels")
    if label not in (0, 1, None):
        raise AdapterError("labels", f"must be 1 (A preferred) or 0 (B preferred), got {label!r}")
    a_wins = scores[0] > scores[1] if label is None else label == 1
    hi, lo = (scores[0], scores[1]) if a_wins else (scores[1], scores[0])
    ratio = row.get("score_ratio")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        ratio = max(hi, 1) / max(lo, 1)  # SHP scores are >= 1; clamp so a 0 or negative cannot divide
    chosen, rejected = (a, b) if a_wins else (b, a)
    prompt = _str(row, "history")
    ids = [row.get(k) for k in ("post_id", "c_root_id_A", "c_root_id_B")]
    pair_id = ("shp-" + "-".join(ids)) if all(isinstance(i, str) and i for i in ids) else _pair_id(
        "shp", prompt, chosen, rejected)
    return {"pair_id": pair_id, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "strength": shp_strength(float(ratio)), "axis": "helpfulness", "source": "stanford-shp"}


ADAPTERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "hh": from_hh, "sharegpt-dpo": from_sharegpt_dpo, "shp": from_shp}
