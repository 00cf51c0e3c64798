"""The checks every front's calls pass: one place, one error type, canonical field names.

A front parses its wire format into a ClassifyCall or GenerateCall (server/types.py),
applying its own defaults, and hands it to the model (server/models.py). The model runs
these checks against its own limits before any work, then the token limits once the
text is tokenized, so no front can skip one and every front gets the same answer. A
failed check raises InvalidArgument(field, message) with a canonical field name, and
the message begins with that name.

Canonical names are the paths of headrace.v1's ClassifyRequest / GenerateRequest:

    texts  texts[i]  prompt  max_new_tokens  stop  stop[i]
    sampling.temperature  sampling.top_p  sampling.top_k  sampling.repetition_penalty
    sampling.seed

The gRPC front (server/convert.py) reports them as they are. A front whose fields
are named otherwise keeps one small table and reports `error.renamed(TABLE)`
(server/types.py); an index is kept and the message's leading name follows. For an
OpenAI-style HTTP front

    {"max_new_tokens": "max_tokens", "sampling.temperature": "temperature",
     "sampling.top_p": "top_p", "prompt": "prompt", "stop": "stop"}

keeps `InvalidArgument("stop[1]", "stop[1] must not be empty")` as it is and turns
`("max_new_tokens", "max_new_tokens must be ...")` into `("max_tokens", "max_tokens
must be ...")`. The KServe front (server/kserve/convert.py) names the tensor that
carries the value and says the value as that tensor holds it: ("texts[1]", ...)
becomes ("text", "input tensor 'text': element 1 must not be empty").
"""

from __future__ import annotations

import math

from headrace.server.manifest import Limits
from headrace.server.types import ClassifyCall, GenerateCall, InvalidArgument, SamplingParams

MAX_TOP_K = 1_000_000  # bound for top_k when the model's vocabulary size is unknown
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
SEED_END = 2**64  # seeds are uint64 on the wire


def check_classify(call: ClassifyCall, limits: Limits) -> None:
    if not call.texts:
        raise InvalidArgument("texts", "texts must hold at least one text")
    if len(call.texts) > limits.max_texts:
        raise InvalidArgument(
            "texts", f"texts must hold at most {limits.max_texts} texts, got {len(call.texts)}"
        )
    for i, text in enumerate(call.texts):
        if not text:
            raise InvalidArgument(f"texts[{i}]", f"texts[{i}] must not be empty")
    if call.top_k < 0:
        raise InvalidArgument("top_k", "top_k must not be negative (0 returns every label)")


def check_generate(call: GenerateCall, limits: Limits, vocab_size: int | None) -> None:
    if not call.prompt:
        raise InvalidArgument("prompt", "prompt must not be empty")
    if not 0 <= call.max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgument(
            "max_new_tokens",
            f"max_new_tokens must be in [0, {limits.max_new_tokens}] (0 means the model's default)",
        )
    check_sampling(call.sampling, vocab_size)
    if len(call.stop) > limits.max_stop_strings:
        raise InvalidArgument(
            "stop", f"stop holds {len(call.stop)} strings; at most {limits.max_stop_strings}"
        )
    for i, s in enumerate(call.stop):
        if not s:
            raise InvalidArgument(f"stop[{i}]", f"stop[{i}] must not be empty")
        if len(s) > limits.max_stop_length:
            raise InvalidArgument(
                f"stop[{i}]", f"stop[{i}] must be at most {limits.max_stop_length} characters"
            )


def check_sampling(p: SamplingParams, vocab_size: int | None) -> None:
    """Ranges of SamplingParams' own terms (a front maps its "off" values before)."""
    if not (math.isfinite(p.temperature) and 0.0 <= p.temperature <= MAX_TEMPERATURE):
        raise InvalidArgument(
            "sampling.temperature",
            f"sampling.temperature must be in [0, {MAX_TEMPERATURE:g}] (0 is greedy)",
        )
    if not (math.isfinite(p.top_p) and 0.0 < p.top_p <= 1.0):
        raise InvalidArgument("sampling.top_p", "sampling.top_p must be in (0, 1] (1 turns it off)")
    k_max = vocab_size or MAX_TOP_K
    if not 0 <= p.top_k <= k_max:
        raise InvalidArgument(
            "sampling.top_k", f"sampling.top_k must be in [0, {k_max}] (0 turns it off)"
        )
    rp = p.repetition_penalty
    if not (math.isfinite(rp) and 0.0 < rp <= MAX_REPETITION_PENALTY):
        raise InvalidArgument(
            "sampling.repetition_penalty",
            f"sampling.repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] "
            "(1 turns it off)",
        )
    if p.seed is not None and not 0 <= p.seed < SEED_END:
        raise InvalidArgument("sampling.seed", "sampling.seed must be in [0, 2**64)")


def overlong(field: str, tokens: int, limit: int) -> InvalidArgument:
    """`field` ("texts[3]", "prompt") has more tokens than the model takes (reject_overlong)."""
    return InvalidArgument(field, f"{field} has {tokens} tokens; the model takes at most {limit}")
