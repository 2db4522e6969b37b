"""Appending sampled tokens to a sequence and deciding when it is finished (EOS, stop ids/strings, length)."""
from __future__ import annotations

from r1pipe.engine.scheduler import Sequence
from r1pipe.engine.tokenizer import TokenizerAdapter


class StopChecker:
    """vLLM's stopping rules: EOS (unless ignore_eos) and stop_token_ids end a completion with the token kept;
    a stop string ends it once the decoded text contains it; max_tokens ends it with reason "length"."""

    def __init__(self, eos_token_ids: frozenset[int], tokenizer: TokenizerAdapter | None) -> None:
        self.eos_token_ids, self.tokenizer = eos_token_ids, tokenizer
        self._carriers: dict[tuple[str, ...], frozenset[int] | None] = {}  # stops -> ids that may complete one

    def append(self, seq: Sequence, token: int, logprob: float | None) -> None:
        """Add one sampled token and decide whether the sequence is finished."""
        seq.output_ids.append(token)
        if seq.params.logprobs:
            seq.logprobs.append(logprob)  # type: ignore[arg-type]
        p = seq.params
        reason: str | None = None
        if token in self.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        elif p.stop_token_ids and token in p.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif (p.stop and self.tokenizer is not None and self._may_complete_stop(token, p.stop)
              and (hit := self._stop_string(seq)) is not None):
            reason, seq.stop_reason = "stop", hit
        elif len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            # its routing is recorded when it is fed; the last token never is, so feed it once more
            seq.awaiting_final_feed = p.return_routing

    def _may_complete_stop(self, token: int, stops: list[str]) -> bool:
        """Whether appending `token` can complete one of `stops`, without decoding the tail. Stops are checked
        after every token, so a stop string that appears now ends inside the new token's text: its last
        character is in the token's own text. That is decided from a table (per list of stops, built once)
        when every stop's last character is ASCII and not whitespace; otherwise the tail is always decoded
        (decoders add whitespace between tokens, and a byte of a multi-byte character decodes alone to U+FFFD).
        An id the tokenizer does not know is always decoded."""
        key = tuple(stops)
        if key not in self._carriers:
            self._carriers[key] = self._carriers_of(stops)
        carriers = self._carriers[key]
        return carriers is None or token in carriers or token >= len(self.tokenizer.token_texts())  # type: ignore[union-attr]

    def _carriers_of(self, stops: list[str]) -> frozenset[int] | None:
        """The ids whose own text holds the last character of one of `stops`; None: decode after every token."""
        lasts = {stop[-1] for stop in stops}
        if any(not c.isascii() or c.isspace() for c in lasts):
            return None
        texts = self.tokenizer.token_texts()  # type: ignore[union-attr]  (built once)
        return frozenset(i for i, text in enumerate(texts) if any(c in text for c in lasts))

    def _stop_string(self, seq: Sequence) -> str | None:
        stops = seq.params.stop or []
        window = max(len(s) for s in stops) + 8  # tokens: every token yields at least ~1 character
        tail = self.tokenizer.decode(seq.output_ids[-window:], seq.params.skip_special_tokens)  # type: ignore[union-attr]
        found = [(tail.find(s), s) for s in stops if s in tail]
        return min(found)[1] if found else None
