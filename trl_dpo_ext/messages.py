"""Messages of conversational rows: the roles a chat template knows, and the checks of each message of a prompt or a
response, in the one message style of `rows.py` (`Row i, column 'c': rejected k, message j: ...`).

A message whose role the template does not know, or whose content is missing, is rendered anyway by a generic
template (ChatML writes any role as the turn's header; a None content as an empty turn), so such rows would train on
the wrong text in silence: every one is an error before training.
"""

from __future__ import annotations

import re
from typing import Any


# Roles every chat template is taken to render; a template may test for more by name (`role == 'ipython'`)
CHAT_ROLES = ("system", "user", "assistant", "tool")
_TEMPLATE_ROLE = re.compile(r"""role['"]?\]?\s*==\s*['"]([A-Za-z_]+)['"]""")


def chat_roles(processing_class: Any = None) -> frozenset[str]:
    """The roles a message may have: system, user, assistant and tool, and any other role the chat template of
    `processing_class` (a tokenizer or a processor) tests for by name. A generic template (ChatML) renders any role as
    its header, so an unknown role would silently become text that the responses differ by."""
    template = getattr(processing_class, "chat_template", None)
    if template is None:
        template = getattr(getattr(processing_class, "tokenizer", None), "chat_template", None)
    if isinstance(template, dict):  # named templates ("default", "tool_use")
        template = " ".join(template.values())
    return frozenset(CHAT_ROLES) | frozenset(_TEMPLATE_ROLE.findall(template or ""))


def check_messages(messages: list, idx: int, column: str, roles: frozenset[str], where: str = "") -> None:
    """Each message is a dict with a known `role` and a `content` (a str, or a list of content parts)."""
    for j, message in enumerate(messages):
        at = f"Row {idx}, column '{column}': {where}message {j}"
        if not isinstance(message, dict):
            raise ValueError(f"{at}: expected a dict with 'role' and 'content', got {type(message).__name__}.")
        if message.get("role") is None:  # absent, or None (`Dataset.from_list` fills a key missing from some rows)
            raise ValueError(f"{at}: no 'role' (missing or None); give each message its role.")
        if message["role"] not in roles:
            raise ValueError(
                f"{at}: role {message['role']!r} is not one the chat template knows ({', '.join(sorted(roles))}); "
                "the template would render it as the turn's header, which the responses would then differ by."
            )
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise ValueError(
                f"{at}: content {content!r:.40} ({type(content).__name__}); expected a str (or a list of content "
                "parts): a None content would render as an empty turn."
            )


def _is_empty(response: Any) -> bool:
    """A response with no text (an empty string, or messages with empty content): only its end-of-sequence or
    end-of-turn tokens would be scored, so it teaches nothing."""
    return response == "" if isinstance(response, str) else not any(m.get("content") for m in response)


def check_response(response: Any, idx: int, column: str, roles: frozenset[str], where: str = "") -> None:
    """A chosen or rejected response has text, and, as messages, starts with an assistant turn (the prompt is
    tokenized with the generation prompt, which opens that turn: any other role would move the boundary)."""
    if isinstance(response, list):
        check_messages(response, idx, column, roles, where)
    if _is_empty(response):
        raise ValueError(
            f"Row {idx}, column '{column}': {where}empty response {response!r:.80}. A response with no text teaches "
            "nothing (only its end-of-sequence token would be scored); fix the row or drop it."
        )
    if isinstance(response, list) and response[0]["role"] != "assistant":
        raise ValueError(
            f"Row {idx}, column '{column}': {where}message 0 has role {response[0]['role']!r}, but a response starts "
            "with an assistant turn (the prompt is tokenized with the generation prompt, which opens it)."
        )
