"""Conversation templates and label masking (METHOD.md section 5).

A template turns a normalised conversation (`[{"from": "human"|"gpt", "value": str}, ...]`) into text segments,
each marked trained or not. `tokenize_segments` joins them and tokenises the WHOLE text once, as the processor
tokenises a prompt at inference (`<image>` written as `num_image_tokens` image tokens, as `LlavaProcessor` writes
it), then trains the tokens whose characters fall in trained segments. So the training ids are the inference ids
for any tokenizer: tokenising segment by segment would differ wherever the tokenizer looks across a segment
boundary (a sentencepiece `▁` after an image token, `▁USER` after `</s>` where the whole text has `US`, `ER`).

This is what LLaVA's own `preprocess_v1` intends (llava/train/train.py: tokenise the whole conversation, then mask
each round's instruction). Its mask arithmetic re-tokenises each round alone and subtracts 2 (BOS and the `▁` that
a trailing space becomes), with a `-1` per round for non-legacy LLaMA tokenizers; on other tokenizers the counts are
off (a byte-level BPE has no BOS, `</s>` is several tokens) and LLaVA masks the whole sample with its `tokenization
mismatch` warning. Locating the answers by characters has no such arithmetic: for a legacy LLaMA tokenizer the
labels equal LLaVA's (tests/test_tokenizer_parity.py, text-only samples: with an image LLaVA tokenises the text on
each side of it alone, the extra `▁` above), for the others they are the ones LLaVA meant.

- `plain` (stage 1): `<image>` + caption + `"\n"`; the human turn is replaced by the image alone; only the caption
  and its newline are trained. No EOS, as in LLaVA's `conv_llava_plain`.
- `v1` (stage 2, Vicuna): `SYSTEM USER: <image>\n{q} ASSISTANT: {a}</s>USER: ...` (LLaVA's `conv_vicuna_v1`, the
  processor's chat template); the answer ends with the tokenizer's EOS text (`</s>` for LLaMA tokenizers); only
  ` {a}</s>` is trained, so the prompt ends in `ASSISTANT:` exactly as the generation prompt does.
- `chat_template`: the tokenizer's/processor's own Jinja template; answer spans are found by rendering growing
  prefixes of the conversation (each assistant answer is what its message adds after the generation prompt).

A single-image human turn is normalised first, as LLaVA's `preprocess_multimodal` does: `<image>\n{text}`.
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
    """A piece of the rendered conversation. `eos=True` appends the tokenizer's EOS text (trained with the text)."""

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
            # The template writes its own separator between parts (LLaVA's "<image>\n"), so the newline that
            # LLaVA data puts next to the placeholder is dropped, as LLaVA's own preprocessing does.
            piece = piece.strip() if len(pieces) > 1 else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": "user" if role == "human" else "assistant", "content": parts})
    return messages


def render_chat_template(
    conversations: Sequence[dict[str, str]], renderer: Any, system: str | None = None, num_images: int = 0
) -> list[Segment]:
    """Render with `renderer.apply_chat_template` (a tokenizer or processor carrying a chat template).

    Each answer span is `render(messages[:k+1])` minus `render(messages[:k], add_generation_prompt=True)`; a template
    whose renders are not prefixes of one another cannot be masked this way and raises.
    """
    turns = check_turns(conversations)
    if num_images == 1:
        turns = [(role, move_image_to_front(text)) for role, text in turns]
    messages = _to_messages(turns, system)
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
        return render_chat_template(conversations, renderer, system, num_images)
    raise ValueError(f"template must be one of {TEMPLATE_NAMES}, got {template!r}")


def tokenize_segments(
    segments: Sequence[Segment],
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    add_special_tokens: bool = True,
    *,
    add_bos: bool | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels for rendered segments: the ids `tokenizer(text)` gives for the whole conversation text,
    the processor's inference ids; tokens outside trained segments, and image tokens, get `IGNORE_INDEX`.

    Returns `input_ids` and `labels` (same length). Each `<image>` is written as `num_image_tokens` copies of the
    image token's text (a sequence: one count per `<image>` in text order, for processors whose count depends on
    the image, as LLaVA-OneVision's AnyRes), and an `eos=True` segment ends with the tokenizer's EOS text. A token
    is trained when its characters overlap a trained segment (a fast tokenizer's offsets); a tokenizer without
    offsets counts the tokens of the text before each segment boundary instead (the longest common prefix with the
    whole ids).
    `add_special_tokens`: as at inference (BOS for LLaMA tokenizers); `add_bos` is its former name, kept for callers
    that pass `tokenizer_adds_bos(tokenizer)` (the same ids for every tokenizer that adds BOS or nothing).
    Raises `ValueError` when an `eos=True` segment meets a tokenizer without an EOS token, or when a sequence of
    counts does not have one count per `<image>`.
    """
    if add_bos is not None:
        add_special_tokens = add_bos
    placeholders = sum(segment.text.count(IMAGE_TOKEN) for segment in segments)
    counts = [num_image_tokens] * placeholders if isinstance(num_image_tokens, int) else list(num_image_tokens)
    if len(counts) != placeholders:
        raise ValueError(f"{len(counts)} image-token counts for {placeholders} '{IMAGE_TOKEN}' placeholders")
    text, spans = _join_segments(
        segments, tokenizer.convert_ids_to_tokens(image_token_id), counts, tokenizer.eos_token
    )
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        input_ids = list(encoded["input_ids"])
        trained = _overlapping(encoded["offset_mapping"], spans)
    else:
        input_ids, trained = _tokenize_without_offsets(tokenizer, text, spans, add_special_tokens)
    labels = [token if keep and token != image_token_id else IGNORE_INDEX for token, keep in zip(input_ids, trained)]
    return {"input_ids": input_ids, "labels": labels}


def _join_segments(
    segments: Sequence[Segment], image_token: str, counts: Sequence[int], eos_text: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation text, the i-th `<image>` written as `counts[i]` image tokens, and the character spans
    `[start, end)` of its trained segments."""
    text, spans = "", []
    remaining = iter(counts)
    for segment in segments:
        first, *rest = segment.text.split(IMAGE_TOKEN)
        piece = first + "".join(image_token * next(remaining) + after for after in rest)
        if segment.eos:
            if eos_text is None:
                raise ValueError("the template ends answers with EOS but the tokenizer has no `eos_token`")
            piece += eos_text
        if segment.trained and piece:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def _overlapping(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token, whether its characters `[start, end)` meet one of the ordered, disjoint spans (one pass: tokens
    come in text order). Special tokens a post-processor adds (BOS) have the empty offset (0, 0) and meet none."""
    flags, index = [], 0
    for start, end in offsets:
        while index < len(spans) and spans[index][1] <= start:
            index += 1
        flags.append(index < len(spans) and start < spans[index][1] and end > spans[index][0])
    return flags


def _tokenize_without_offsets(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], add_special_tokens: bool
) -> tuple[list[int], list[bool]]:
    """Ids and trained flags for a tokenizer without offsets (sentencepiece ones): the tokens of the text before a
    span boundary are the longest common prefix of its ids and the whole text's ids (a token across the boundary
    goes with what follows). The special tokens the tokenizer wraps the text in (BOS) are untrained."""

    def encode(part: str) -> list[int]:
        return list(tokenizer(part, add_special_tokens=False)["input_ids"])

    def common_prefix(ids: list[int], other: list[int]) -> int:
        length = 0
        while length < min(len(ids), len(other)) and ids[length] == other[length]:
            length += 1
        return length

    body = encode(text)
    trained = [False] * len(body)
    for start, end in spans:
        first = common_prefix(encode(text[:start]), body)
        last = len(body) if end == len(text) else common_prefix(encode(text[:end]), body)
        trained[first:last] = [True] * (last - first)
    whole = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    lead = next((i for i in range(len(whole) - len(body) + 1) if whole[i : i + len(body)] == body), None)
    if lead is None:
        raise ValueError(f"{type(tokenizer).__name__} adds special tokens inside the text; cannot locate the answers")
    return whole, [False] * lead + trained + [False] * (len(whole) - lead - len(body))


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer(text)` starts with BOS, i.e. whether the inference path will see one."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id
