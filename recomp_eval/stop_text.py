"""Stop strings that work with every tokenizer: decode and look, never map strings to ids.

transformers' ``stop_strings`` builds token-level tables from the vocabulary and crashes on
vocabularies it does not expect (``substring not found`` on the demo model's tokenizer).
:class:`StopOnText` decodes the last few generated tokens of each sequence at every step and
stops a sequence once a stop string appears; the text is then cut before the first stop string
(:func:`cut_at_stop`). For greedy decoding this gives exactly the text of generating on and
cutting afterwards, since the tokens before the stop do not depend on when generation ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

BYTES_PER_CHAR = 4  # a character can take up to four byte-fallback tokens


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


class StopOnText(StoppingCriteria):
    """Per-sequence stop once the generated text contains one of ``stops``.

    Args:
        tokenizer: decodes the new tokens (``skip_special_tokens=True``, as the final text).
        stops: stop strings (empty strings are ignored).
        prompt_length: L, the width of the (left-padded) prompt batch; new tokens start there.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_length = prompt_length
        # enough trailing tokens to hold any stop string that ends at the newest token
        self.window = BYTES_PER_CHAR * max((len(s) for s in self.stops), default=0) + 2

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        batch = input_ids.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)  # [B]
        if not self.stops:
            return done
        new = input_ids[:, self.prompt_length :]  # [B, T]
        tail = new[:, -self.window :].tolist()  # B x [<= window]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        for i, text in enumerate(texts):
            done[i] = any(s in text for s in self.stops)
        return done
