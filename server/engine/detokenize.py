"""Incremental detokenization and stop strings, one sequence at a time.

`IncrementalDetokenizer` turns a stream of token ids into a stream of text
the way TGI does: it decodes a short window twice (up to the last emitted
token, and up to the newest one) and emits the difference, so sub-word
pieces get their spaces right and a multi-byte character split over several
byte-level tokens is held back until it is complete (a partial UTF-8
sequence decodes to U+FFFD).

`StopMatcher` finds stop strings across token boundaries: it holds back the
longest tail of the text that could still grow into a stop string, and on a
match cuts the text where the stop string begins. The stop string itself is
never emitted.

Both are used from the decoder scheduler's worker thread; neither is
thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded in front of the output, for spacing
_TRIM_AT = 64  # drop ids before the prefix offset once this many pile up


class IncrementalDetokenizer:
    """Token ids in, complete text out (prefix / read offsets as TGI)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # The last prompt tokens give the first output token its left context
        # (a WordPiece "##" piece, a SentencePiece leading space); they are
        # never emitted themselves.
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
        self._prefix = 0  # start of the window that is decoded for context
        self._read = len(self._ids)  # ids before this were emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes ("" while it is held back)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            out = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._trim()
            return out
        return ""

    def flush(self) -> str:
        """The text still held back (the sequence ended): may end in U+FFFD if a
        character was cut by the end of generation, as a full decode would."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""

    def _trim(self) -> None:
        if self._prefix >= _TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0


class StopMatcher:
    """Stop strings across chunk boundaries; the stop string is never emitted."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""

    @property
    def held(self) -> str:
        return self._held

    def push(self, text: str) -> tuple[str, bool]:
        """Feed new text -> (text safe to emit, whether a stop string matched).

        After a match the emitted text ends right before the stop string and
        the matcher holds nothing.
        """
        if not self._stops:
            return text, False
        buf = self._held + text
        if not buf:
            return "", False
        cut = -1
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held tail, when the sequence ends without a match."""
        out, self._held = self._held, ""
        return out

    def _partial_tail(self, buf: str) -> int:
        # the longest suffix of buf that is a proper prefix of some stop string
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
