"""Model card: rendered offline from a run directory, every metadata field checked by parsing its YAML."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from _hub_fixtures import PAPER_TABLE, TRAINING_ARGS, fake_hub, make_run_dir, write_json
from huggingface_hub import ModelCard, parse_eval_result_entries

from movekd_hf.cli import main
from movekd_hf.hub_cards.card import CITATION, KNOWN_TEACHERS, build_model_card, resolve_teachers, write_card
from movekd_hf.hub_cards.run_dir import read_run_dir

REPO_ID = "me/movekd-tiny"


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "card has no YAML front matter"
    return yaml.safe_load(match.group(1))


@pytest.fixture
def full_card(tmp_path, monkeypatch):
    run_dir = make_run_dir(tmp_path / "run")
    with fake_hub(monkeypatch) as hub:  # any HTTP request would be recorded: rendering must make none
        written = write_card(run_dir, repo_id=REPO_ID)
    assert hub.requests == []
    return run_dir, written


def test_card_metadata_fields(full_card):
    run_dir, _ = full_card
    text = (run_dir / "checkpoint" / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["base_model"] == "liuhaotian/llava-v1.5-7b"
    assert meta["license"] == "llama2"
    assert meta["datasets"] == ["liuhaotian/LLaVA-Pretrain", "liuhaotian/LLaVA-Instruct-150K"]
    assert {"movekd", "llava", "knowledge-distillation", "custom_code"} <= set(meta["tags"])
    # huggingface_hub parses its own model-index back: every (benchmark, metric) of results.json is there.
    card = ModelCard(text)
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got[("VQAv2", "accuracy")] == 79.9
    assert got[("POPE", "f1")] == 86.3 and got[("POPE", "accuracy")] == 87.1
    assert got[("ScienceQA-IMG", "accuracy")] == 69.8  # "SQA" alias resolved
    assert got[("my_private_bench", "score")] == 0.5  # unknown benchmark kept under its own name
    assert len(got) == sum(len(metrics) for metrics in PAPER_TABLE.values())
    types = {r.dataset_name: r.dataset_type for r in card.data.eval_results}
    assert types["GQA"] == "lmms-lab/GQA" and types["MMBench"] == "lmms-lab/MMBench"
    assert {r.task_type for r in card.data.eval_results} == {"image-text-to-text"}
    assert meta["model-index"][0]["name"] == "movekd-tiny"


def test_card_body_sections(full_card):
    run_dir, _ = full_card
    body = (run_dir / "checkpoint" / "README.md").read_text()
    for teacher in KNOWN_TEACHERS.values():  # every teacher with its id and licence, in one table row
        assert f"| `{teacher.name}` | {teacher.model_id} | {teacher.license} |" in body
    assert "Teacher set: **v1.1**" in body
    for row in ("| `lambda_kd` | 0.5 |", "| `lambda_bal` | 0.01 |", "| `learning_rate` | 2e-05 |",
                "| `per_device_train_batch_size` | 8 |", "| `lr_scheduler_type` | cosine |"):  # fmt: skip
        assert row in body
    assert "logging_dir" not in body and "max_steps" not in body  # non-recipe and "unset" fields stay out
    assert "| `num_train_epochs` | 1.0 |" in body
    assert "`openai/clip-vit-large-patch14-336` (clip_vision_model, 2 layers, hidden 32, 28 px, patch 14)" in body
    assert "num_experts=3, lora_rank=4" in body and "lora_b_init=kaiming, expert_output_scale=none" in body
    assert f'AutoModelForImageTextToText.from_pretrained("{REPO_ID}", trust_remote_code=True)' in body
    assert f'pipeline("image-text-to-text", model="{REPO_ID}", trust_remote_code=True)' in body
    assert f'AutoModelForVision2Seq.from_pretrained("{REPO_ID}", trust_remote_code=True)' in body
    assert "https://arxiv.org/abs/2501.01709" in body and CITATION in body
    assert "| VQAv2 | accuracy | 79.9 |" in body
    assert "![loss](plots/loss.png)" in body and "![router_balance](plots/router_balance.png)" in body


def test_citation_is_wellformed_bibtex():
    fields = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*?)\},?$", CITATION, flags=re.MULTILINE | re.DOTALL))
    assert CITATION.startswith("@inproceedings{cao2025movekd,") and CITATION.count("{") == CITATION.count("}")
    assert fields["title"] == "MoVE-KD: Knowledge Distillation for VLMs with Mixture of Visual Encoders"
    assert fields["year"] == "2025" and fields["eprint"] == "2501.01709"
    authors = " ".join(fields["author"].split()).split(" and ")
    assert authors[0] == "Cao, Jiajun" and authors[-1] == "Zhang, Shanghang" and len(authors) == 8


def test_eval_results_files(full_card):
    run_dir, written = full_card
    folder = run_dir / "checkpoint" / ".eval_results"
    names = sorted(p.name for p in folder.iterdir())
    # one file per known benchmark; the unknown one has no Hub dataset id, so no file
    assert names == sorted(
        f"{k}.yaml" for k in ("vqav2", "gqa", "textvqa", "vizwiz", "pope", "scienceqa", "mme", "mmbench")
    )
    pope = parse_eval_result_entries(yaml.safe_load((folder / "pope.yaml").read_text()))
    assert [(e.dataset_id, e.task_id, e.value) for e in pope] == [
        ("lmms-lab/POPE", "f1", 86.3),
        ("lmms-lab/POPE", "accuracy", 87.1),
    ]
    assert pope[0].source_url == f"https://huggingface.co/{REPO_ID}" and pope[0].source_name == "Model card"
    raw = yaml.safe_load((folder / "mme.yaml").read_text())
    assert raw == [{"dataset": {"id": "lmms-lab/MME", "task_id": "perception"}, "value": 1509.1,
                    "source": {"url": f"https://huggingface.co/{REPO_ID}", "name": "Model card"},
                    "notes": "movekd-hf evaluation: LLaVA-1.5 prompts, greedy decoding"}]  # fmt: skip
    assert (run_dir / "checkpoint" / "plots" / "loss.png").read_bytes() == (
        run_dir / "plots" / "loss.png"
    ).read_bytes()
    assert run_dir / "checkpoint" / "plots" / "loss.png" in written


def test_minimal_run_omits_optional_parts(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", full=False)
    card = build_model_card(read_run_dir(run_dir))
    meta = _front_matter(str(card))
    assert not {"base_model", "license", "datasets", "model-index"} & set(meta)
    for section in ("## Teachers", "## Training recipe", "## Evaluation", "## Training curves"):
        assert section not in card.text
    assert "<namespace>/<model-name>" in card.text  # no repo id given: an explicit placeholder, not a guess
    write_card(run_dir)
    assert not (run_dir / "checkpoint" / ".eval_results").exists()


def test_run_dir_can_be_the_checkpoint(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", full=False)
    flat = run_dir / "checkpoint"
    write_json(flat / "eval" / "results.json", {"gqa": {"exact_match": 61.0}})
    write_card(flat)
    assert "| GQA | exact_match | 61.0 |" in (flat / "README.md").read_text()


def test_teacher_licence_not_invented():
    teachers = resolve_teachers({"teachers": {"clip": "my-org/other-clip", "dino": "facebook/dinov2-large"}})
    assert [(t.name, t.model_id, t.license) for t in teachers] == [
        ("clip", "my-org/other-clip", "not recorded"),  # a known slug with other weights loses the known licence
        ("dino", "facebook/dinov2-large", "not recorded"),
    ]
    listed = resolve_teachers({"teachers": [{"name": "dino", "model_id": "x/y", "license": "Apache-2.0"}]})
    assert listed[0].license == "Apache-2.0"
    with pytest.raises(ValueError, match="each teacher needs a string `name`"):
        resolve_teachers({"teachers": [{"model_id": "x/y"}]})


def test_bad_results_and_missing_checkpoint_name_the_problem(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", full=False)
    write_json(run_dir / "eval" / "results.json", {"gqa": {"exact_match": "high"}})
    with pytest.raises(ValueError, match=r"gqa\.exact_match must be a number"):
        read_run_dir(run_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_run_dir(tmp_path / "empty")


def test_card_command(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path / "run")
    out = tmp_path / "out"
    assert main(["card", str(run_dir), "--repo-id", REPO_ID, "--output", str(out)]) == 0
    assert (out / "README.md").is_file() and (out / ".eval_results" / "gqa.yaml").is_file()
    assert not (run_dir / "checkpoint" / "README.md").exists()  # --output respected
    assert "wrote" in capsys.readouterr().out
    assert json.loads((run_dir / "checkpoint" / "config.json").read_text())["model_type"] == "movekd_llava"


# ------------------------------------------------------------------------- metadata the Hub accepts, and true


def _validated(text: str) -> ModelCard:
    """The card parsed back by huggingface_hub, every id in its metadata checked with the Hub's own rules."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
    from huggingface_hub.utils import validate_repo_id

    card = ModelCard(text)
    data = card.data
    for repo_id in ([data.base_model] if isinstance(data.base_model, str) else data.base_model or []) + list(
        data.datasets or []
    ):
        validate_repo_id(repo_id)
    if data.eval_results:
        assert all(isinstance(result, EvalResult) for result in data.eval_results)
        name, results = model_index_to_eval_results(eval_results_to_model_index(data.model_name, data.eval_results))
        assert name == data.model_name and len(results) == len(data.eval_results)
    return card


@pytest.mark.parametrize("base_model", ["preset:tiny", "/home/me/runs/demo/init/movekd_default", "local_init"])
def test_base_model_is_a_hub_id_or_left_out(tmp_path, base_model):
    run_dir = make_run_dir(tmp_path / "run", full=False)
    (tmp_path / "local_init").mkdir()  # a relative name that is a local folder, not a Hub repo
    write_json(run_dir / "train_config.json", {"base_model": base_model, "datasets": ["data/llava.json", "me/data"]})
    text = str(build_model_card(read_run_dir(run_dir)))
    card = _validated(text)
    assert card.data.base_model is None and card.data.datasets == ["me/data"]
    assert "/home/me" not in text  # a local path means nothing to a reader (and leaks the machine's layout)
    hub = make_run_dir(tmp_path / "hub", full=False)
    write_json(hub / "train_config.json", {"base_model": "liuhaotian/llava-v1.5-7b"})
    assert _validated(str(build_model_card(read_run_dir(hub)))).data.base_model == "liuhaotian/llava-v1.5-7b"


def test_tiny_teachers_are_not_credited_as_the_papers(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", full=False)
    write_json(run_dir / "train_config.json", {"teacher_set": "tiny", "teachers": ["clip", "convnext", "sam"],
                                               "base_model": "preset:tiny"})  # fmt: skip
    text = str(build_model_card(read_run_dir(run_dir)))
    _validated(text)
    for paper in KNOWN_TEACHERS.values():
        assert paper.model_id not in text
    assert text.count("random weights, nothing downloaded") == 3 and "| MIT |" not in text
    assert "A toy model, for trying the code only." in text and "random `preset` model" in text


def test_demo_card_says_it_is_a_toy(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", full=False)
    write_json(run_dir / "train_config.json", {"teacher_set": "demo", "base_model": str(tmp_path / "init"),
                                               "license": "apache-2.0"})  # fmt: skip
    card = _validated(str(build_model_card(read_run_dir(run_dir))))
    assert "A toy model" in card.text and "`movekd-hf demo`" in card.text
    assert card.data.license == "apache-2.0" and card.data.base_model is None
    full = make_run_dir(tmp_path / "full")
    assert "A toy model" not in str(build_model_card(read_run_dir(full)))  # a paper run is no toy


def test_limited_evaluation_is_not_published_as_a_benchmark_result(tmp_path):
    from movekd_hf.cli.evaluate import write_results

    run_dir = make_run_dir(tmp_path / "run", full=False)
    eval_dir = run_dir / "eval"
    eval_dir.mkdir()
    # What `movekd-hf eval --limit 2` left before records carried the limit: no word of it.
    write_results(eval_dir, "pope", {"f1": 100.0, "accuracy": 100.0, "num_missing": 0.0}, "ckpt")
    old = json.loads((eval_dir / "pope.json").read_text())
    write_json(eval_dir / "pope.json", {k: v for k, v in old.items() if k not in ("limit", "num_samples")})
    (eval_dir / "pope_answers.jsonl").write_text('{"question_id": 1}\n{"question_id": 2}\n')
    # A record that says it was limited, and one that says it ran the whole benchmark.
    write_results(eval_dir, "gqa", {"accuracy": 50.0, "num_questions": 2.0}, "ckpt", limit=2, num_samples=2)
    write_results(eval_dir, "mme", {"perception": 1500.0}, "ckpt", limit=None, num_samples=2374)
    write_card(run_dir, repo_id=REPO_ID)
    text = (run_dir / "checkpoint" / "README.md").read_text()
    card = _validated(text)
    assert {r.dataset_name for r in card.data.eval_results} == {"MME"}
    assert sorted(p.name for p in (run_dir / "checkpoint" / ".eval_results").iterdir()) == ["mme.yaml"]
    mme = parse_eval_result_entries(
        yaml.safe_load((run_dir / "checkpoint" / ".eval_results" / "mme.yaml").read_text())
    )
    assert mme[0].notes.endswith("; 2374 samples")
    assert "| POPE | f1 | 100.0 | 2 samples; not recorded as a run over the whole benchmark" in text
    assert (
        "| GQA | accuracy | 50.0 | limited run (2 samples, `--limit 2`): a smoke test, not a benchmark result |"
        in text
    )
    assert "| MME | perception | 1500.0 | whole benchmark, 2374 samples |" in text


def test_licence_must_be_a_hub_identifier(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", full=False)
    write_json(run_dir / "train_config.json", {"license": "Apache 2.0"})
    with pytest.raises(ValueError, match=r"`license` must be a Hub licence identifier .* got 'Apache 2.0'"):
        build_model_card(read_run_dir(run_dir))


def test_card_command_records_licence_datasets_and_base_model(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", full=False)
    args = ["card", str(run_dir), "--license", "llama2", "--dataset", "liuhaotian/LLaVA-Pretrain",
            "--dataset", "data/local.json", "--base-model", "liuhaotian/llava-v1.5-7b"]  # fmt: skip
    assert main(args) == 0
    card = _validated((run_dir / "checkpoint" / "README.md").read_text())
    assert (card.data.license, card.data.datasets) == ("llama2", ["liuhaotian/LLaVA-Pretrain"])
    assert card.data.base_model == "liuhaotian/llava-v1.5-7b"


def test_hyperparameters_are_read_from_the_checkpoint_folder(tmp_path):
    """A trainer's checkpoint keeps train_config.json and training_args.json beside the weights: a card
    re-rendered from a run whose checkpoint sits in RUN/checkpoint still lists them."""
    from _hub_fixtures import TRAIN_CONFIG, TRAINING_ARGS

    run_dir = make_run_dir(tmp_path / "run", full=False)
    write_json(run_dir / "checkpoint" / "train_config.json", TRAIN_CONFIG)
    write_json(run_dir / "checkpoint" / "training_args.json", TRAINING_ARGS)
    for _ in range(2):  # rendering twice gives the same table
        write_card(run_dir)
        body = (run_dir / "checkpoint" / "README.md").read_text()
        assert "| `learning_rate` | 2e-05 |" in body and "| `lambda_kd` | 0.5 |" in body


def test_a_run_by_steps_shows_its_steps_not_the_ignored_epochs(tmp_path):
    from movekd_hf.hub_cards.card import collect_hyperparameters

    root = make_run_dir(tmp_path / "run")
    write_json(root / "training_args.json", {**TRAINING_ARGS, "num_train_epochs": 3.0, "max_steps": 4})
    rows = dict(collect_hyperparameters(read_run_dir(root)))
    assert rows["max_steps"] == "4" and "num_train_epochs" not in rows


@pytest.mark.parametrize(
    ("stage", "says"), [("stage1", "ends stage 1"), ("stage2", "ends stage 2"), ("finetune", None)]
)
def test_the_card_says_which_stage_the_checkpoint_ends(tmp_path, stage, says):
    from _hub_fixtures import TRAIN_CONFIG

    root = make_run_dir(tmp_path / "run")
    write_json(root / "train_config.json", {**TRAIN_CONFIG, "stage": stage})
    body = str(build_model_card(read_run_dir(root)))
    assert ("This checkpoint ends" in body) == (says is not None) and (says is None or says in body)
