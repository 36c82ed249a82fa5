"""lmms-eval's `--model movekd`: a MoVE-KD checkpoint evaluated the way LLaVA-1.5 was (METHOD.md section 7).

    lmms-eval --model movekd --model_args pretrained=PATH_OR_HUB_ID --tasks pope,mme,mmbench_en_dev

The checkpoint loads as `movekd-hf eval` loads it: AutoModelForImageTextToText and AutoProcessor with the
checkpoint's remote code (`evaluation.runner.load_model_and_processor`). Each request becomes LLaVA-1.5's `v1`
conversation (`evaluation.prompts`): `<image>` first, then the task's text, optionally with LLaVA-1.5's instruction
added (`instruction=`; lmms-eval's default task prompts already end with it), then `ASSISTANT:`. Images are padded
to a square with the normalisation mean, as LLaVA-1.5 evaluated (`pad_images=True`). Decoding is greedy whatever a
task's `generation_kwargs` ask (LLaVA-1.5's setting); only `max_new_tokens` and `until` are read from them.

Why a class of our own: lmms-eval's generic `--model huggingface` (0.7.3) loads a model type it does not list
through AutoModel, and a MoVE-KD checkpoint's AutoModel is `MoVEKDModel`, the base model without the LM head
(transformers' convention for every LLaVA-like model), which cannot generate.

lmms-eval 0.7.3's evaluator turns `loglikelihood` results into text (`api.instance.unwrap_generation_output` keeps
only strings), so its `multiple_choice` and `loglikelihood` tasks fail there for every model; the paper's eight
benchmarks are `generate_until` tasks in lmms-eval and run. `loglikelihood` here returns what the API specifies.

Request layouts (lmms-eval's simple models, `lmms_eval.api.task.ConfigurableTask.construct_requests`):
generate_until `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`; loglikelihood `(context, continuation
or doc_to_target, doc_to_visual, doc_id, task, split)`; generate_until_multi_round `(context, gen_kwargs,
doc_to_visual, doc_to_text, doc_id, task, split)`. Documents come from `self.task_dict[task][split][doc_id]`.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from ..errors import SettingsError
from ..evaluation.prompts import MULTIPLE_CHOICE, short_answer_prompt, v1_conversation, with_instruction
from ..evaluation.runner import load_model_and_processor
from ..modeling.llava_conventions import IMAGE_TOKEN, expand_to_square, load_image, mean_colour, vicuna_v1_prompt


def multiple_choice_instruction(text: str) -> str:
    """ScienceQA / MMBench: the task's question and options, then LLaVA-1.5's letter instruction."""
    return with_instruction(text, MULTIPLE_CHOICE)


# `instruction=`: what is added to the task's text (nothing twice: `with_instruction` skips a present one).
INSTRUCTIONS: dict[str, Callable[[str], str]] = {
    "task": str.strip,  # the task's text as lmms-eval wrote it
    "short_answer": short_answer_prompt,  # VQAv2, GQA, TextVQA, POPE, MME
    "unanswerable": partial(short_answer_prompt, unanswerable=True),  # VizWiz
    "multiple_choice": multiple_choice_instruction,
}
DEFAULT_MAX_NEW_TOKENS = 128  # LLaVA-1.5's evaluation scripts; a task's own `max_new_tokens` wins


class MoVEKDLmmsEval(lmms):
    """A MoVE-KD (or any LLaVA-1.5-style image-text-to-text) checkpoint as an lmms-eval model.

    Args (lmms-eval's `--model_args`, plus its `--batch_size` / `--device`):
        pretrained: checkpoint folder or Hub id.
        device: torch device; default CUDA when there is one, else CPU. Under `accelerate launch`, each process's.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        batch_size: prompts generated together (left-padded); loglikelihood runs one request at a time.
        instruction: one of `INSTRUCTIONS`.
        pad_images: pad images to a square with the normalisation mean first (LLaVA-1.5's `pad` aspect).
        max_new_tokens: the limit when a task sets none.

    Raises `SettingsError` for an unknown `instruction` or `dtype`, or a batch size below 1.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        instruction: str = "task",
        pad_images: bool = True,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_batch_size: int | None = None,  # passed by lmms-eval's evaluator; batches are fixed-size here
    ) -> None:
        super().__init__()
        if instruction not in INSTRUCTIONS:
            raise SettingsError(f"unknown instruction {instruction!r}", field="instruction",
                                expected=f"one of {', '.join(INSTRUCTIONS)}")  # fmt: skip
        size = int(batch_size) if str(batch_size).isdigit() else 0  # lmms-eval's "auto" is not supported
        if size < 1:
            raise SettingsError(f"batch size {batch_size!r}", field="batch_size", expected="an integer >= 1")
        if dtype != "auto" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise SettingsError(f"unknown dtype {dtype!r}", field="dtype", expected="auto, float32, bfloat16, float16")
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # lmms-eval hands each rank its share of the requests
            self._device = self.accelerator.device
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, self.processor = load_model_and_processor(
            pretrained, dtype if dtype == "auto" else getattr(torch, dtype)
        )
        self.model = model.to(self._device)
        self.batch_size = size
        self.instruction, self.pad_images, self.max_new_tokens = instruction, bool(pad_images), int(max_new_tokens)
        self.image_token = getattr(self.processor, "image_token", IMAGE_TOKEN)
        self.chat_template = None  # lmms-eval reads it; prompts are built here, not by a chat template
        self._warned_sampling = False

    @property
    def device(self) -> torch.device:
        return self._device

    # ---------------------------------------------------------------------------------------------- prompts

    def build_prompt(self, context: str, num_images: int) -> str:
        """LLaVA-1.5's `v1` generation prompt for a task's text: `{system} USER: <image>\\n{text} ASSISTANT:`.

        `<image>` placeholders the task put in its text are moved to the front, one line per image (LLaVA-1.5
        places its single image first); with no image the turn is the text alone."""
        text = INSTRUCTIONS[self.instruction](context.replace(IMAGE_TOKEN, "").strip())
        if num_images == 0:
            return vicuna_v1_prompt(text)
        return v1_conversation(text, "\n".join([self.image_token] * num_images))

    def _images(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list[Any]:
        """The document's images as RGB PIL images, padded to squares when `pad_images`."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        return self._prepare(visuals)

    def _prepare(self, visuals: Any) -> list[Any]:
        if visuals is None:
            return []
        images = [load_image(v) for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals])
                  if v is not None]  # fmt: skip
        if self.pad_images:
            background = mean_colour(self.processor.image_processor)
            images = [expand_to_square(image, background) for image in images]
        return images

    def _inputs(self, prompts: Sequence[str], images: Sequence[Any]) -> Any:
        inputs = self.processor(images=list(images) or None, text=list(prompts), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    # ------------------------------------------------------------------------------------------- generation

    def _settings(self, gen_kwargs: dict | None) -> tuple[int, list[str]]:
        """(max_new_tokens, stop strings) from a task's generation kwargs; sampling settings are not used."""
        gen_kwargs = dict(gen_kwargs or {})
        if not self._warned_sampling and (gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0):
            warnings.warn("movekd: the task asks for sampling; decoding stays greedy (LLaVA-1.5's evaluation)",
                          stacklevel=3)  # fmt: skip
            self._warned_sampling = True
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), [s for s in until if s]

    def generate_batch(
        self, prompts: Sequence[str], images: Sequence[Sequence[Any]], max_new_tokens: int
    ) -> list[str]:
        """Greedy answers for prompts built by `build_prompt` (one image list per prompt), left-padded so every
        row's new tokens start at the same column. Special tokens are dropped from the text."""
        self.processor.tokenizer.padding_side = "left"
        inputs = self._inputs(prompts, [image for row in images for image in row])
        with torch.inference_mode():
            output = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # [B, T_new]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One greedy answer per request, cut at the first of the task's `until` strings, stripped."""
        jobs = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            images = self._images(doc_to_visual, task, split, doc_id)
            jobs.append((self.build_prompt(context, len(images)), images, *self._settings(gen_kwargs)))
        answers = self._run_jobs(jobs)
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", request.args[:2], answer)
        return answers

    def _run_jobs(self, jobs: list[tuple[str, list, int, list[str]]]) -> list[str]:
        """Answers for (prompt, images, max_new_tokens, until) jobs, in order; batched by token limit and by
        whether they have images, longest prompts first (the least padding)."""
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for index, (_, images, max_new_tokens, _) in enumerate(jobs):
            groups[(max_new_tokens, bool(images))].append(index)
        answers: list[str] = [""] * len(jobs)
        bar = tqdm(total=len(jobs), disable=self.rank != 0, desc="movekd generate")
        for (max_new_tokens, _), indices in groups.items():
            indices.sort(key=lambda i: -len(jobs[i][0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self.generate_batch([jobs[i][0] for i in chunk], [jobs[i][1] for i in chunk], max_new_tokens)
                for i, text in zip(chunk, texts):
                    answers[i] = cut_at_stop(text, jobs[i][3]).strip()
                bar.update(len(chunk))
        bar.close()
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Rounds per request until the task's `doc_to_text` says stop. Round 0 answers the request's context;
        round r >= 1 calls `doc_to_text(doc, previous_output=[...], round_idx=r, previous_round_info=...)`, which
        returns (visuals, context, terminal, round outputs to keep, info); each round is a fresh `v1` turn."""
        results = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in (r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            max_new_tokens, until = self._settings(gen_kwargs)
            images, outputs, info, round_idx = self._images(doc_to_visual, task, split, doc_id), [], None, 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(outputs)
                    if terminal:
                        break
                    images = self._prepare(visuals)
                job = (self.build_prompt(context, len(images)), images, max_new_tokens, until)
                outputs.append(self._run_jobs([job])[0])
                round_idx += 1
            results.append(outputs)
        return results

    # -------------------------------------------------------------------------------------------- scoring

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log P(continuation | prompt), whether greedy decoding would produce it) per request.

        The prompt is `build_prompt(context)`, ending in `ASSISTANT:`; a continuation that does not start with
        whitespace gets the conversation's one space before it (LLaVA-1.5 trained on `ASSISTANT: {answer}`).
        Tokens are split as lm-evaluation-harness splits them: the whole text's tokens past the prompt's. The
        log-probability is a natural-log sum over those tokens, computed in float32."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            continuation = target if isinstance(target, str) else str(target(self.task_dict[task][split][doc_id]))
            images = self._images(doc_to_visual, task, split, doc_id)
            result = self.continuation_loglikelihood(self.build_prompt(context, len(images)), continuation, images)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            results.append(result)
        return results

    def continuation_loglikelihood(self, prompt: str, continuation: str, images: Sequence[Any]) -> tuple[float, bool]:
        """Summed log-probability of `continuation` after `prompt` and whether every token is the argmax."""
        if not continuation:
            return 0.0, True
        if not continuation[0].isspace():
            continuation = " " + continuation
        self.processor.tokenizer.padding_side = "left"  # one row: no padding either way
        prompt_length = self._inputs([prompt], images)["input_ids"].shape[1]
        whole = self._inputs([prompt + continuation], images)
        targets = whole["input_ids"][0, prompt_length:]  # [T_cont]
        with torch.inference_mode():
            logits = self.model(**whole).logits[0, prompt_length - 1 : -1].float()  # [T_cont, V]: t predicts t+1
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # [T_cont]
        return float(log_probs.sum()), bool((logits.argmax(dim=-1) == targets).all())


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (lmms-eval's `until`)."""
    for stop in until:
        text = text.split(stop)[0]
    return text
