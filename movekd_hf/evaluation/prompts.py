"""The prompts LLaVA-1.5 used per benchmark, put into the `v1` (Vicuna) conversation it generates with (the
conversation itself is one of LLaVA's conventions, `modeling/llava_conventions.py`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..modeling.llava_conventions import IMAGE_TOKEN, vicuna_v1_prompt

SHORT_ANSWER = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."


def with_instruction(question: str, *instructions: str) -> str:
    """`question` followed by each instruction on its own line, skipping ones the text already ends with
    (LLaVA's prepared question files carry them already)."""
    text = question.strip()
    for instruction in instructions:
        if instruction not in text:
            text = f"{text}\n{instruction}"
    return text


def short_answer_prompt(question: str, unanswerable: bool = False) -> str:
    """VQAv2, GQA, TextVQA, POPE, MME: the short-answer instruction; VizWiz first adds the 'Unanswerable' one."""
    return with_instruction(question, *((UNANSWERABLE,) if unanswerable else ()), SHORT_ANSWER)


def multiple_choice_prompt(question: str, options: Sequence[str], hint: str | None = None) -> str:
    """ScienceQA / MMBench: (hint,) question, `A. option` lines, then the letter instruction."""
    lines = []
    if hint and hint.strip():
        lines.append(hint.strip())
    lines.append(question.strip())
    lines.extend(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
    return with_instruction("\n".join(lines), MULTIPLE_CHOICE)


def v1_conversation(prompt: str, image_token: str = IMAGE_TOKEN) -> str:
    """LLaVA-1.5's `v1` generation prompt: system, `USER: <image>\\n{prompt} ASSISTANT:` (`prompt` as given)."""
    return vicuna_v1_prompt(f"{image_token}\n{prompt}")


def chat_template_messages(prompt: str) -> list[Mapping]:
    """The same turn as chat messages, for processors that carry a chat template."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
