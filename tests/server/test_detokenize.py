"""Incremental detokenization and stop strings, on real tokenizers."""

from __future__ import annotations

import pytest
from headrace.server.engine.detokenize import REPLACEMENT, IncrementalDetokenizer, StopMatcher
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import WordPieceTrainer

from tests.server.scripted import byte_level_bpe

ASCII_CORPUS = ["the quick brown fox jumps over the lazy dog", "stop here and there"] * 8
TEXT = "café naïve 東京 😀 — the end"


@pytest.fixture(scope="module")
def bytelevel() -> Tokenizer:
    """Byte-level BPE that never saw non-ASCII text: each such byte is its own token."""
    return byte_level_bpe(ASCII_CORPUS)


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        ASCII_CORPUS, WordPieceTrainer(vocab_size=80, special_tokens=["[PAD]", "[UNK]"])
    )
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="$A")
    return tok


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt or [])
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_multibyte_characters_are_held_until_complete(bytelevel: Tokenizer) -> None:
    ids = bytelevel.encode(TEXT).ids
    # the test means something only if characters really are split over tokens
    assert any(REPLACEMENT in bytelevel.decode([i]) for i in ids)
    pieces = stream(bytelevel, ids)
    assert "".join(pieces) == TEXT
    assert not any(REPLACEMENT in p for p in pieces)
    assert "" in pieces[:-1]  # some token completed nothing and was held back


def test_prompt_context_gives_wordpiece_its_spaces(wordpiece: Tokenizer) -> None:
    prompt = wordpiece.encode("the quick brown").ids
    out = wordpiece.encode("fox jumps over the lazy dog").ids
    full = wordpiece.decode(prompt + out)
    assert "".join(stream(wordpiece, out, prompt)) == full[len(wordpiece.decode(prompt)) :]


def test_long_streams_stay_exact(bytelevel: Tokenizer) -> None:
    text = " ".join([TEXT] * 40)  # longer than the trimming threshold
    ids = bytelevel.encode(text).ids
    assert "".join(stream(bytelevel, ids)) == text


def test_flush_emits_a_character_cut_by_the_end(bytelevel: Tokenizer) -> None:
    ids = bytelevel.encode("ab 😀").ids[:-1]  # the emoji's last byte never came
    pieces = stream(bytelevel, ids)
    assert not any(REPLACEMENT in p for p in pieces[:-1])
    assert "".join(pieces) == bytelevel.decode(ids)


def feed(matcher: StopMatcher, chunks: list[str]) -> tuple[str, bool]:
    out = []
    for chunk in chunks:
        text, matched = matcher.push(chunk)
        out.append(text)
        if matched:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_string_split_over_chunks_is_caught_and_not_emitted() -> None:
    matcher = StopMatcher(["END"])
    text, matched = matcher.push("the answer is 42. E")
    assert (text, matched) == ("the answer is 42. ", False)
    assert matcher.held == "E"
    assert matcher.push("N") == ("", False)
    assert matcher.push("D and more") == ("", True)


def test_a_held_prefix_is_released_when_it_does_not_complete() -> None:
    assert feed(StopMatcher(["END!"]), ["we E", "ND", " here", " END", "!", "x"]) == (
        "we END here ",
        True,
    )
    assert feed(StopMatcher(["END!"]), ["we E", "ND"]) == ("we END", False)


def test_earliest_stop_string_wins_and_empty_ones_are_ignored() -> None:
    assert feed(StopMatcher(["", "lazy", "quick"]), ["the quick brown lazy"]) == ("the ", True)
    assert feed(StopMatcher([]), ["any", " text"]) == ("any text", False)


def test_stop_inside_one_chunk_cuts_the_rest() -> None:
    assert feed(StopMatcher(["\n\n"]), ["line one\n", "\nline two"]) == ("line one", True)
