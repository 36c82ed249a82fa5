"""The model card body, a Jinja template rendered by `huggingface_hub.ModelCard.from_template`.

Kept as a Python string (not a package-data file) so it ships with the wheel without packaging rules.
Every optional section is guarded: a run that lacks a part gets no section for it.
"""

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_title }}
{% if toy_reasons %}
> **A toy model, for trying the code only.** {% for reason in toy_reasons %}{{ reason }}. {% endfor %}Its
> answers and scores say nothing about MoVE-KD at scale.
{% endif %}
A LLaVA-style vision-language model whose vision encoder was trained with **MoVE-KD**
([Mixture-of-Visual-Encoder Knowledge Distillation]({{ paper_url }}), CVPR 2025): several frozen vision
encoders (the teachers) are distilled into the single vision encoder of the VLM, whose MLPs carry a mixture
of LoRA experts (MoLE) with a per-token router. At inference only the student encoder runs.

## Model

| part | value |
|---|---|
{% for name, value in architecture %}| {{ name }} | {{ value }} |
{% endfor %}
{% if llm_lora %}
## LLM LoRA

The language model was trained with a LoRA (peft), saved in `{{ llm_lora_dir }}/`; the top-level weights hold the
language model as it started. `from_pretrained(..., trust_remote_code=True)` attaches the LoRA through
transformers' peft integration, so **peft must be installed** (`pip install peft`); without it loading stops with
an error rather than answering with the untrained language model. For a checkpoint that needs no peft, fold the
LoRA into the weights with `movekd-hf merge CHECKPOINT OUT` and publish OUT.
{% endif %}{% if teachers %}
## Teachers

The teachers are used during training only; they are not part of these weights.
{% if teacher_set %}Teacher set: **{{ teacher_set }}**.
{% endif %}
| teacher | model id | licence |
|---|---|---|
{% for teacher in teachers %}| `{{ teacher.name }}` | {{ teacher.model_id }} | {{ teacher.license }} |
{% endfor %}{% endif %}
{% if hyperparameters %}
## Training recipe

{{ recipe_summary }}

| hyper-parameter | value |
|---|---|
{% for name, value in hyperparameters %}| `{{ name }}` | {{ value }} |
{% endfor %}{% endif %}
{% if results %}
## Evaluation

| benchmark | metric | value | run |
|---|---|---|---|
{% for benchmark, metric, value, note in results %}| {{ benchmark }} | {{ metric }} | {{ value }} | {{ note }} |
{% endfor %}
{% if any_published %}Results of runs over a whole benchmark (or given as such) are also in this card's `model-index`
metadata and, for benchmarks hosted on the Hub, in `.eval_results/*.yaml`; limited runs are not.
{% else %}None of these runs covered a whole benchmark, so none is published as a benchmark result in the metadata.
{% endif %}{% endif %}
{% if comparisons %}
## Paired comparisons

This run minus another on the same questions (`movekd-hf compare`): the difference in points with its bootstrap
interval over questions; a difference whose interval includes zero is not resolved.

| benchmark | against | question type | n (confidence) | difference [interval] |
|---|---|---|---|---|
{% for benchmark, against, kind, n, text in comparisons %}| {{ benchmark }} | {{ against }} | {{ kind }} | {{ n }} | {{ text }} |
{% endfor %}{% endif %}
{% if plots %}
## Training curves

{% for plot in plots %}![{{ plot.stem }}](plots/{{ plot.name }})

{% endfor %}{% endif %}
## Quick start

This repository holds remote code (`*.py`), so loading needs `trust_remote_code=True`.

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{{ repo_id }}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{{ repo_id }}", trust_remote_code=True)

messages = [{"role": "user", "content": [
    {"type": "image", "url": "{{ example_image }}"},
    {"type": "text", "text": "What is shown in this image?"},
]}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
generated = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With the pipeline:

```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{{ repo_id }}", trust_remote_code=True)
print(pipe(text=messages, max_new_tokens=64))
```

On transformers 4.x the same checkpoint also loads through `AutoModelForVision2Seq`:

```python
from transformers import AutoModelForVision2Seq

model = AutoModelForVision2Seq.from_pretrained("{{ repo_id }}", trust_remote_code=True)
```

## Licences

{% if license %}These weights are released under `{{ license }}`; they{% else %}These weights{% endif %} derive
from the base language model and the student encoder, whose licences apply.{% if teachers %} The teachers'
licences are listed above.{% endif %}

## Citation

Paper: [arXiv {{ arxiv_id }}]({{ paper_url }})

```bibtex
{{ citation }}
```
"""
