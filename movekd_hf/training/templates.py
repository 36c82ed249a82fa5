"""Conversation templates and label masking (METHOD.md section 5).

A template turns a normalised conversation (`[{"from": "human"|"gpt", "value": str}, ...]`) into text segments,
each marked trained or not. Tokenising segment by segment makes the label mask exact by construction, instead of
LLaVA's re-tokenise-and-subtract arithmetic (with its `-2` corrections for sentencepiece). The `<image>` placeholder
becomes `num_image_tokens` copies of the image token id, as `LlavaProcessor` does at inference, always masked.

- `plain` (stage 1): `<image>` + caption + `"\\n"`; the human turn is replaced by the image alone; only the caption
  and its newline are trained. No EOS, as in LLaVA's `conv_llava_plain`.
- `v1` (stage 2, Vicuna): `SYSTEM USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ...`; a space after the system
  text and inside a turn, none after `</s>` (LLaVA's `sep=" "`, `sep2="</s>"`); only ` {a}</s>` is trained, so
  the prompt ends in `ASSISTANT:` exactly as the generation prompt does.
- `chat_template`: the tokenizer's/processor's own Jinja template; answer spans are found by rendering growing
  prefixes of the conversation (each assistant answer is what its message adds after the generation prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..modeling.llava_conventions import (
    IMAGE_TOKEN,
    move_image_to_front,
    vicuna_v1_prompt,
    vicuna_v1_turn,
)

IGNORE_INDEX = -100
TEMPLATE_NAMES = ("plain", "v1", "chat_template")
_ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class ConversationError(ValueError):
    """A conversation the template cannot render (wrong roles, wrong turn count, ...)."""


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered conversation. `eos=True` appends the tokenizer's EOS id (trained with the text)."""

    text: str
    trained: bool
    eos: bool = False


def canonical_role(role: str) -> str:
    if role not in _ROLE_ALIASES:
        raise ConversationError(f"unknown speaker {role!r}; expected one of {sorted(_ROLE_ALIASES)}")
    return _ROLE_ALIASES[role]


def check_turns(conversations: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """Validate strict human/gpt alternation starting with human and ending with gpt; return (role, text) pairs.

    LLaVA silently drops a leading gpt turn; we refuse it instead, so nothing is dropped without a count.
    """
    if len(conversations) == 0:
        raise ConversationError("the sample has no conversation turns")
    turns = [(canonical_role(turn["from"]), turn["value"]) for turn in conversations]
    for position, (role, _) in enumerate(turns):
        expected = "human" if position % 2 == 0 else "gpt"
        if role != expected:
            raise ConversationError(f"turn {position} is from {role!r}, expected {expected!r} (turns must alternate)")
    if len(turns) % 2 != 0:
        raise ConversationError("the conversation ends with a human turn; the last turn must be the answer")
    return turns


def render_plain(conversations: Sequence[dict[str, str]], num_images: int) -> list[Segment]:
    """Stage-1 template: image, caption, newline; the human text is discarded."""
    turns = check_turns(conversations)
    if len(turns) != 2 or num_images != 1:
        raise ConversationError(
            f"the `plain` template needs one human/gpt pair and one image, got {len(turns)} turns and "
            f"{num_images} images"
        )
    return [Segment(IMAGE_TOKEN, trained=False), Segment(turns[1][1] + "\n", trained=True)]


def render_vicuna_v1(
    conversations: Sequence[dict[str, str]], num_images: int, system: str | None = None
) -> list[Segment]:
    """Stage-2 Vicuna v1 template; answers end with the EOS token (`</s>` for LLaMA tokenizers)."""
    turns = check_turns(conversations)
    segments: list[Segment] = []
    for index, (question, answer) in enumerate(zip(turns[0::2], turns[1::2])):
        text = move_image_to_front(question[1]) if num_images == 1 else question[1]
        # Only the first turn carries the system text (`vicuna_v1_prompt`, what inference sends too).
        prompt = vicuna_v1_prompt(text, system) if index == 0 else vicuna_v1_turn(text)
        segments.append(Segment(prompt, trained=False))
        segments.append(Segment(" " + answer[1], trained=True, eos=True))
    return segments


def _to_messages(turns: list[tuple[str, str]], system: str | None) -> list[dict[str, Any]]:
    """Turns into chat-template messages; `<image>` placeholders become `{"type": "image"}` content parts."""
    messages: list[dict[str, Any]] = (
        [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    )
    for role, text in turns:
        parts: list[dict[str, str]] = []
        pieces = text.split(IMAGE_TOKEN)
        for position, piece in enumerate(pieces):
            if position > 0:
                parts.append({"type": "image"})
            # The template writes its own separator after an image (LLaVA's "<image>\n"), so the newline that
            # LLaVA data puts next to the placeholder is dropped, as LLaVA's own preprocessing does.
            piece = piece.strip() if len(pieces) > 1 else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": "user" if role == "human" else "assistant", "content": parts})
    return messages


def render_chat_template(
    conversations: Sequence[dict[str, str]], renderer: Any, system: str | None = None
) -> list[Segment]:
    """Render with `renderer.apply_chat_template` (a tokenizer or processor carrying a chat template).

    Each answer span is `render(messages[:k+1])` minus `render(messages[:k], add_generation_prompt=True)`; a template
    whose renders are not prefixes of one another cannot be masked this way and raises.
    """
    messages = _to_messages(check_turns(conversations), system)
    offset = 1 if system else 0

    def render(count: int, generation_prompt: bool) -> str:
        return renderer.apply_chat_template(messages[:count], tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[Segment] = []
    done = ""
    for answer_index in range(offset + 1, len(messages), 2):
        prompt_end = render(answer_index, True)
        answer_end = render(answer_index + 1, False)
        if not prompt_end.startswith(done) or not answer_end.startswith(prompt_end):
            raise ConversationError(
                "the chat template does not render conversations as growing prefixes, so answer spans cannot be "
                "located; use template 'v1' or 'plain'"
            )
        segments.append(Segment(prompt_end[len(done) :], trained=False))
        segments.append(Segment(answer_end[len(prompt_end) :], trained=True))
        done = answer_end
    full = render(len(messages), False)
    if full != done:  # text the template writes after the last answer is context, never a target
        segments.append(Segment(full[len(done) :], trained=False))
    return segments


def render_conversation(
    template: str,
    conversations: Sequence[dict[str, str]],
    num_images: int,
    system: str | None = None,
    renderer: Any = None,
) -> list[Segment]:
    if template == "plain":
        return render_plain(conversations, num_images)
    if template == "v1":
        return render_vicuna_v1(conversations, num_images, system)
    if template == "chat_template":
        if renderer is None or getattr(renderer, "chat_template", None) is None:
            raise ValueError("template='chat_template' needs a tokenizer or processor with a `chat_template`")
        return render_chat_template(conversations, renderer, system)
    raise ValueError(f"template must be one of {TEMPLATE_NAMES}, got {template!r}")


def tokenize_segments(
    segments: Sequence[Segment],
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int,
    add_bos: bool = False,
) -> dict[str, list[int]]:
    """Token ids and labels for rendered segments; image tokens and untrained text get `IGNORE_INDEX`.

    Returns `input_ids` and `labels` (same length). Each `<image>` becomes `num_image_tokens` image token ids.
    """
    input_ids: list[int] = [tokenizer.bos_token_id] if add_bos else []
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    for segment in segments:
        ids: list[int] = []
        trainable: list[bool] = []
        for position, piece in enumerate(segment.text.split(IMAGE_TOKEN)):
            if position > 0:
                ids += [image_token_id] * num_image_tokens
                trainable += [False] * num_image_tokens
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                trainable += [segment.trained] * len(piece_ids)
        if segment.eos:
            if tokenizer.eos_token_id is None:
                raise ValueError("the template ends answers with EOS but the tokenizer has no `eos_token_id`")
            ids.append(tokenizer.eos_token_id)
            trainable.append(segment.trained)
        input_ids += ids
        labels += [token if keep else IGNORE_INDEX for token, keep in zip(ids, trainable)]
    return {"input_ids": input_ids, "labels": labels}


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer(text)` starts with BOS, i.e. whether the inference path will see one."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id
