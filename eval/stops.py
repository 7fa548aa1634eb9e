"""Stop rules of a completion, shared by eval.sample and the server: which stops are special tokens
(stop on the token id) and which are text (stop on the text, also when it arrives split across tokens)."""

from __future__ import annotations

from collections.abc import Callable


class StopWriter:
    """Writes text as it comes, holding back just enough to recognise a stop string split across tokens."""

    def __init__(self, stops: list[str], write: Callable[[str], None]):
        self.stops, self.write, self.buf = stops, write, ""
        self.keep = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> bool:
        """True when a stop string completed: its text and everything after it are dropped."""
        self.buf += piece
        for s in self.stops:
            i = self.buf.find(s)
            if i >= 0:
                self.write(self.buf[:i])
                self.buf = ""
                return True
        if len(self.buf) > self.keep:
            cut = len(self.buf) - self.keep
            self.write(self.buf[:cut])
            self.buf = self.buf[cut:]
        return False

    def close(self) -> None:
        self.write(self.buf)
        self.buf = ""


def stop_rules(enc, stops: list[str]) -> tuple[list[int], list[str]]:
    """Split --stop values into special-token ids (stop on the token) and plain text (stop on the text)."""
    ids, texts = [], []
    for s in stops:
        if s in enc.special_tokens_set:
            ids.append(enc.encode_single_token(s))
        elif s:
            texts.append(s)
    return ids, texts
