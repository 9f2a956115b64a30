"""The one record every data source produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreferencePair:
    prompt_id: str
    prompt: str            # the prompt as plain text (what a reward model reads)
    chosen: str
    rejected: str
    # The prompt as chat turns ((role, content), ...) for tokenizers with a chat template; empty means one
    # user turn holding `prompt`.
    messages: tuple[tuple[str, str], ...] = ()
