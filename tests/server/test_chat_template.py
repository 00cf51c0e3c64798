"""Chat templates: built-ins, tables in the manifest, and the errors a bad one gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from headrace.server.chat_template import ChatTemplateError, chat_template
from headrace.server.manifest import MANIFEST_NAME, ManifestError, read_manifest


def test_plain_is_the_default() -> None:
    prompt, stop = chat_template(None).render([("system", "Be brief."), ("user", "hi {there}")])
    assert prompt == "system: Be brief.\nuser: hi {there}\nassistant:"
    assert "\nuser:" in stop


def test_chatml_and_a_table() -> None:
    prompt, stop = chat_template("chatml").render([("user", "hi")])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert stop[0] == "<|im_end|>"
    table = {
        "message": "<{role}> {content}\n",
        "generation_prompt": "<assistant>",
        "stop": ["<user>"],
    }
    prompt, stop = chat_template(table).render([("user", "{content} stays")])
    assert (prompt, stop) == ("<user> {content} stays\n<assistant>", ("<user>",))


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("jinja", "unknown chat_template"),
        ({"message": "{role}"}, "{content}"),
        ({"message": "{content}", "stop": [""]}, "stop"),
        ({"message": "{content}", "extra": 1}, "unknown keys"),
        (3, "name or a table"),
    ],
)
def test_bad_templates(spec: object, needle: str) -> None:
    with pytest.raises(ChatTemplateError, match=needle):
        chat_template(spec)  # type: ignore[arg-type]


def test_manifest_names_a_template(tiny_models: Path, tmp_path: Path) -> None:
    source = tiny_models / "tiny-generator" / "1"
    data = json.loads((source / MANIFEST_NAME).read_text())
    assert read_manifest(source).generation.chat_template is None  # older manifests read fine
    data["generation"]["chat_template"] = "chatml"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(tmp_path).generation.chat_template == "chatml"
    data["generation"]["chat_template"] = "nonsense"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="chat_template"):
        read_manifest(tmp_path)
