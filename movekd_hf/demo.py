"""The embedded demo. For now an end-to-end smoke: build the tiny MoVE-KD model, save it, reload it through
remote code where `movekd_hf` is not importable, and answer a question about a real photo with the
`image-text-to-text` pipeline."""

from __future__ import annotations

import json
from pathlib import Path

_REMOTE_CHECK = """
import json, sys
try:
    import movekd_hf
    raise SystemExit("movekd_hf must not be importable here")
except ImportError:
    pass
from skimage import data
from PIL import Image
from transformers import pipeline
pipe = pipeline("image-text-to-text", model=sys.argv[1] if len(sys.argv) > 1 else {folder!r}, trust_remote_code=True)
image = Image.fromarray(data.astronaut())
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": {question!r}}}]}}]
out = pipe(text=messages, max_new_tokens=8, return_full_text=False, generate_kwargs={{"do_sample": False}})
print(json.dumps({{"model_class": type(pipe.model).__name__, "module": type(pipe.model).__module__,
                  "answer": out[0]["generated_text"]}}))
"""


def run(out_dir: str, quick: bool = False) -> int:
    from .isolated import run_without_package
    from .presets import build_tiny_model

    out = Path(out_dir)
    checkpoint = out / "checkpoint"
    model, processor = build_tiny_model(seed=0)
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    print(f"[1/2] saved the tiny MoVE-KD model to {checkpoint}")
    question = "What is in the picture?"
    result = run_without_package(_REMOTE_CHECK.format(folder=str(checkpoint.resolve()), question=question))
    print(f"[2/2] reloaded through remote code as {result['module']}.{result['model_class']}")
    print(f"      Q: {question}\n      A (untrained model, so arbitrary bytes): {result['answer']!r}")
    (out / "smoke.json").write_text(json.dumps(result, indent=2))
    return 0
