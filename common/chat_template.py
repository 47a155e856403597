"""A model's chat template: messages -> the prompt text the model was trained on.

Rendered as transformers' `apply_chat_template` renders it (a sandboxed Jinja2
environment with `trim_blocks` and `lstrip_blocks`, `raise_exception`, `tojson` without
ASCII escaping, `strftime_now`, loop controls), so a prompt built here tokenizes to the
ids transformers would give. The template comes from the model folder: `chat_template.jinja`
or the `chat_template` key of `tokenizer_config.json` (where the special tokens' strings,
`bos_token` / `eos_token`, also come from). A folder without either has no template
(`ChatTemplate.from_folder` returns None): chat requests to it are refused, not guessed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The template does not parse, or refused the messages (`raise_exception`)."""


def _special(value: Any) -> str:
    # tokenizer_config.json names a special token as a string or as an AddedToken dict.
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    return str(value) if value is not None else ""


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate | None:
        folder = Path(folder)
        config: dict[str, Any] = {}
        path = folder / TOKENIZER_CONFIG
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ChatTemplateError(f"{path}: malformed JSON: {exc}") from None
        source = config.get("chat_template")
        if (folder / TEMPLATE_FILE).is_file():
            source = (folder / TEMPLATE_FILE).read_text()
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        return cls(
            source,
            bos_token=_special(config.get("bos_token")),
            eos_token=_special(config.get("eos_token")),
        )

    @cached_property
    def _compiled(self) -> Any:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, **kw: Any) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            return env.from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template does not parse: {exc}") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt text of `messages` (each a mapping with `role` and `content`);
        `add_generation_prompt` appends the assistant's opening. Raises ChatTemplateError
        when the template refuses them or fails."""
        from jinja2 import TemplateError

        try:
            return str(
                self._compiled.render(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                    **extra,
                )
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError) as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from None
