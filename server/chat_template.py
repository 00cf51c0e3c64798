"""Chat messages -> one prompt for a causal LM, by the template its manifest names.

    template = chat_template(manifest.generation.chat_template)   # None: "plain"
    prompt, stop = template.render([("system", "Be brief."), ("user", "hi")])
    # prompt == "system: Be brief.\nuser: hi\nassistant:"; stop == ("\nuser:", ...)

`generation.chat_template` in headrace.json is the name of a built-in below, or a
table for a model trained on another format:

    "chat_template": {"message": "<|{role}|>\n{content}\n",
                      "generation_prompt": "<|assistant|>\n", "stop": ["<|user|>"]}

`{role}` and `{content}` are replaced literally (braces in a message stay as they
are). `stop` ends the reply where the model would start the next turn; it is added
to the caller's own stop strings. No Jinja: a template is data, not code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
DEFAULT = "plain"


class ChatTemplateError(ValueError):
    """A manifest's chat_template is unknown or malformed."""


@dataclass(frozen=True)
class ChatTemplate:
    message: str  # one turn; {role} and {content} are replaced
    generation_prompt: str  # what opens the reply the model writes
    stop: tuple[str, ...] = ()  # where the model would start another turn

    def render(self, messages: Iterable[tuple[str, str]]) -> tuple[str, tuple[str, ...]]:
        """(role, content) turns -> (prompt, stop strings of the template)."""
        parts = [
            self.message.replace("{role}", role).replace("{content}", content)
            for role, content in messages
        ]
        parts.append(self.generation_prompt)
        return "".join(parts), self.stop


BUILTIN: dict[str, ChatTemplate] = {
    # Role-tagged lines: fits a small LM that never saw a chat format (the demo's
    # tweet model), and reads plainly in a log.
    "plain": ChatTemplate(
        message="{role}: {content}\n",
        generation_prompt="assistant:",
        stop=("\nuser:", "\nsystem:", "\nassistant:"),
    ),
    "chatml": ChatTemplate(
        message="<|im_start|>{role}\n{content}<|im_end|>\n",
        generation_prompt="<|im_start|>assistant\n",
        stop=("<|im_end|>", "<|im_start|>"),
    ),
}


def chat_template(spec: str | Mapping[str, Any] | None) -> ChatTemplate:
    """The template a manifest's `generation.chat_template` names (None: the plain one)."""
    if spec is None:
        return BUILTIN[DEFAULT]
    if isinstance(spec, str):
        try:
            return BUILTIN[spec]
        except KeyError:
            names = ", ".join(sorted(BUILTIN))
            raise ChatTemplateError(f"unknown chat_template {spec!r} (built-in: {names})") from None
    if not isinstance(spec, Mapping):
        raise ChatTemplateError("chat_template must be a name or a table")
    unknown = set(spec) - {"message", "generation_prompt", "stop"}
    if unknown:
        raise ChatTemplateError(f"chat_template: unknown keys {sorted(unknown)}")
    message, prompt, stop = spec.get("message"), spec.get("generation_prompt", ""), spec.get("stop")
    if not isinstance(message, str) or "{content}" not in message:
        raise ChatTemplateError("chat_template.message must be a string holding {content}")
    if not isinstance(prompt, str):
        raise ChatTemplateError("chat_template.generation_prompt must be a string")
    stops = [] if stop is None else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ChatTemplateError("chat_template.stop must be a list of non-empty strings")
    return ChatTemplate(message=message, generation_prompt=prompt, stop=tuple(stops))
