"""Which column of a source plays which role: the prompt, the gold answer, the SFT response, a chat
conversation, the row id. Explicit names win; otherwise the first common name present is picked
(and the pick is said in the log, so a surprising choice is visible)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from r1pipe.data.sources import DataError

CANDIDATES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "problem", "question", "instruction", "input", "query"),
    "answer": ("answer", "final_answer", "solution", "response", "gold"),
    "response": ("response", "completion", "output", "solution", "answer"),
    "messages": ("messages", "conversations", "conversation"),
    "id": ("id", "task_id", "unique_id", "problem_id"),
}


@dataclass(frozen=True)
class FieldMap:
    """Column per role (None: the source has none); `detected` lists roles picked automatically."""

    prompt: str | None = None
    answer: str | None = None
    response: str | None = None
    messages: str | None = None
    id: str | None = None
    detected: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"{role}={getattr(self, role)!r}{' (auto)' if role in self.detected else ''}"
                 for role in CANDIDATES if getattr(self, role)]
        return ", ".join(parts) or "no known fields"


def pick_fields(columns: Sequence[str], roles: Sequence[str], explicit: dict[str, str | None] | None = None,
                source: str = "data", option_prefix: str = "") -> FieldMap:
    """Map `roles` (keys of CANDIDATES) to columns. An explicit name that the source lacks is a
    DataError naming the option (`sft.data.prompt_field` for option_prefix "sft.data.", `--prompt-field`
    for "--") and the columns there are."""
    explicit = {k: v for k, v in (explicit or {}).items() if v}
    picked: dict[str, str | None] = {}
    detected: list[str] = []
    taken: set[str] = set()
    for role in roles:
        if role not in CANDIDATES:
            raise ValueError(f"unknown field role {role!r}; known: {', '.join(CANDIDATES)}")
        name = explicit.get(role)
        if name is not None:
            if name not in columns:
                option = f"--{role}-field" if option_prefix == "--" else f"{option_prefix}{role}_field"
                raise DataError(f"{option}={name!r}: {source} has no such field; "
                                f"its fields: {', '.join(columns) or '(none)'}")
        else:
            name = next((c for c in CANDIDATES[role] if c in columns and c not in taken), None)
            if name is not None:
                detected.append(role)
        picked[role] = name
        if name is not None:
            taken.add(name)
    return FieldMap(**picked, detected=tuple(detected))
