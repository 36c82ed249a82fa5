"""The KD loss options of issue 17.3, each on a case with a known answer: PHI-S standardisation (RADIO), cosine +
smooth-L1 tokens (AM-RADIO / Theia / UNIC), UNIC's lowest-loss teacher dropping, the summary loss, token weights
and anchor summaries for towers without CLS, and `kd_options` on the command line and in YAML. None changes the
faithful preset. One run through MoVEKDTrainer turns them all on and checks the PHI-S calibration pass."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from movekd_hf.distill.distiller import MoVEKDDistiller, TeacherShape
from movekd_hf.distill.losses import (
    KD_LOSS_PRESETS,
    KDLossConfig,
    cls_similarity_teacher_weights,
    lowest_loss_keep_mask,
    per_token_cosine_smooth_l1,
    summary_cosine_loss,
    teacher_token_loss,
)
from movekd_hf.distill.phi_s import PhiSStandardizer, hadamard_matrix, phi_s_transform
from movekd_hf.distill.teachers import TeacherOutput
from movekd_hf.errors import SettingsError
from movekd_hf.training.arguments import MoVEKDTrainingArguments, parse_args
from movekd_hf.training.checkpoint import DISTILLER_FILE
from movekd_hf.training.distillation import load_adapters

SHAPES = {"clip": TeacherShape(4, 4, has_summary=True), "convnext": TeacherShape(4, 4, has_summary=False)}


def _outputs(seed: int = 0, batch: int = 2) -> dict[str, TeacherOutput]:
    g = torch.Generator().manual_seed(seed)
    clip = TeacherOutput(
        torch.randn(batch, 4, 4, generator=g), (2, 2), cls=torch.randn(batch, 4, generator=g),
        cls_attention=torch.rand(batch, 4, generator=g) / 4, pooled=torch.randn(batch, 4, generator=g),
        pool_attention=torch.rand(batch, 4, generator=g).softmax(-1),
    )  # fmt: skip
    return {"clip": clip, "convnext": TeacherOutput(torch.randn(batch, 4, 4, generator=g) * 5 + 2, (2, 2))}


def _distiller(shapes=SHAPES, **options) -> MoVEKDDistiller:
    torch.manual_seed(0)
    return MoVEKDDistiller(shapes, 4, 4, KDLossConfig.from_preset("faithful", **options))


# ------------------------------------------------------------------------------------------------------ PHI-S


def test_phi_s_two_channels_by_hand():
    """Tokens +-3 u1 and +-u2 with u1 = (0.8, 0.6), u2 = (-0.6, 0.8): mean 0, eigenvalues 0.5 (u2) and 4.5 (u1),
    alpha^2 = 2.5, H = [[1, 1], [1, -1]] / sqrt 2, so T = H U^T / alpha = [[0.2, 1.4], [-1.4, 0.2]] / sqrt 5 and the
    standardised covariance is H diag(0.5, 4.5) H^T / 2.5 = [[1, -0.8], [-0.8, 1]]: unit variance per channel."""
    u1, u2 = torch.tensor([0.8, 0.6]), torch.tensor([-0.6, 0.8])
    tokens = torch.stack([3 * u1, -3 * u1, u2, -u2]).double().reshape(1, 4, 2)
    phi = PhiSStandardizer(2)
    phi.observe(tokens[:, :2])  # two batches: the sums add up
    phi.observe(tokens[:, 2:])
    phi.finish()
    assert phi.calibrated and int(phi.num_tokens) == 4
    assert float(phi.alpha) == pytest.approx(math.sqrt(2.5))
    expected = torch.tensor([[0.2, 1.4], [-1.4, 0.2]]) / math.sqrt(5)
    torch.testing.assert_close(phi.transform, expected, atol=1e-6, rtol=0)
    out = phi(tokens)[0]
    torch.testing.assert_close(out[0], torch.tensor([3.0, -3.0], dtype=torch.float64) / math.sqrt(5))
    torch.testing.assert_close(out.T @ out / 4, torch.tensor([[1.0, -0.8], [-0.8, 1.0]], dtype=torch.float64))


def test_hadamard_matrices_of_every_teacher_width():
    """Sylvester x Paley constructions for the widths of the teacher presets (as RADIO builds them); none for a
    width > 2 not divisible by 4 (no Hadamard matrix exists there)."""
    for n in (1152, 1536, 1280, 256, 44, 48, 24, 40, 20, 12, 2, 1):  # and 1024 = 4 x 256, Sylvester
        h = hadamard_matrix(n)
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), msg=f"n={n}")
        assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5)), n
    assert hadamard_matrix(37) is None and hadamard_matrix(6) is None


@settings(max_examples=25, deadline=None)
@given(
    width=st.sampled_from([2, 3, 4, 5, 6, 8, 12, 20, 24]),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 100.0),
)
def test_phi_s_gives_every_channel_unit_variance_on_its_calibration_data(width, seed, scale):
    """Property: on the calibration tokens the output has mean 0 and every channel variance 1 (the covariance is
    H diag(lambda) H^T / alpha^2, not the identity: PHI-S balances channels, it does not whiten), for widths with a
    Hadamard matrix and for the Givens fallback (3, 5, 6) alike."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g, dtype=torch.float64) * torch.rand(width, generator=g).double()
    tokens = scale * (torch.randn(64, width, generator=g, dtype=torch.float64) @ mixing) + 3.0
    mean = tokens.mean(0)
    phi = phi_s_transform(mean, (tokens - mean).T @ (tokens - mean) / 64)
    out = (tokens - mean) @ phi["transform"].T
    torch.testing.assert_close(out.mean(0), torch.zeros(width, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(width, dtype=torch.float64), atol=1e-8, rtol=0)
    assert bool(phi["hadamard"]) == (width in (2, 4, 8, 12, 20, 24))


def test_phi_s_distiller_calibrates_non_anchor_teachers_and_refuses_to_run_before():
    distiller = _distiller(feature_standardization="phi_s")
    assert set(distiller.standardizers) == {"convnext"} and distiller.needs_calibration()
    student = torch.randn(2, 4, 4)
    with pytest.raises(RuntimeError, match="calibration"):
        distiller(student, (2, 2), _outputs())
    batches = [_outputs(seed) for seed in range(3)]
    assert distiller.calibrate(batches) == 3 and not distiller.needs_calibration()
    assert distiller.calibrate(batches) == 0  # nothing left to calibrate: the pass is skipped
    tokens = torch.cat([b["convnext"].tokens.reshape(-1, 4) for b in batches]).double()
    torch.testing.assert_close(distiller.standardizers["convnext"].mean, tokens.mean(0).float())
    standardized = distiller.standardizers["convnext"](tokens.float())
    torch.testing.assert_close(standardized.var(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- cosine + smooth-L1


def test_cosine_smooth_l1_by_hand():
    """Token 1: S = (1, 0), T = (0, 1): cos 0 -> 1; |d| = 1 in both channels -> smoothL1 1 - 0.5 = 0.5 each.
    Token 2: S = (2, 0), T = (1, 0): cos 1 -> 0; d = (1, 0) -> (0.5 + 0) / 2 = 0.25. Token 3: S = (0.5, 0),
    T = (0, 0): zero target -> cos counts as 0 -> 1; d = (0.5, 0) -> (0.125 + 0) / 2 = 0.0625."""
    student = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.5, 0.0]]])
    target = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    l_radio = per_token_cosine_smooth_l1(student, target)  # 0.9 cosine + 0.1 smooth-L1
    torch.testing.assert_close(l_radio, torch.tensor([[0.9 + 0.05, 0.025, 0.9 + 0.00625]]))
    l_unic = per_token_cosine_smooth_l1(student, target, 0.5, 0.5)
    torch.testing.assert_close(l_unic, torch.tensor([[0.75, 0.125, 0.53125]]))
    # Token weights apply as to MSE: L = mean_j l + sum_j w_j l_j.
    w = torch.tensor([[0.5, 0.25, 0.25]])
    out = teacher_token_loss(student, target, w, per_token_cosine_smooth_l1)
    expected = l_radio.mean() + (w * l_radio).sum()
    torch.testing.assert_close(out["loss"], expected.reshape(1))


def test_token_loss_option_in_the_distiller_keeps_weights_and_scales():
    student = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1))
    mse = _distiller()(student, (2, 2), _outputs())
    cos = _distiller(token_loss="cosine_smooth_l1")(student, (2, 2), _outputs())
    torch.testing.assert_close(cos["token_weights"], mse["token_weights"])
    # The anchor's row, recomputed: same token weights, the per-token loss swapped.
    anchor = _outputs()["clip"]
    expected = teacher_token_loss(student, anchor.tokens, mse["token_weights"], per_token_cosine_smooth_l1)["loss"]
    torch.testing.assert_close(cos["per_teacher_loss"][:, 0], expected)
    with pytest.raises(ValueError, match="token_loss"):
        KDLossConfig(token_loss="huber")
    with pytest.raises(ValueError, match="movekd"):
        KDLossConfig.from_preset("mse_baseline", token_loss="cosine_smooth_l1")


# ----------------------------------------------------------------------------------- UNIC teacher dropping


def test_lowest_loss_drop_keeps_the_highest_loss_teacher_and_the_anchor():
    losses = torch.tensor([[1.0, 3.0, 2.0, 0.5], [1.0, 2.0, 5.0, 0.5]])  # column 0: the anchor
    keep = lowest_loss_keep_mask(losses, 0.999999, protected=[0])  # every other teacher dropped
    assert keep.tolist() == [[True, True, False, False], [True, False, True, False]]
    # With a fixed generator: the draws of `torch.rand` decide the rest, the highest-loss teacher stays anyway.
    draws = torch.rand(2, 4, generator=torch.Generator().manual_seed(7))
    keep = lowest_loss_keep_mask(losses, 0.5, protected=[0], generator=torch.Generator().manual_seed(7))
    expected = draws >= 0.5
    expected[:, 0] = True
    expected[0, 1] = expected[1, 2] = True
    assert keep.tolist() == expected.tolist()


def test_lowest_loss_drop_in_the_distiller_renormalises_in_training_only():
    shapes = {"clip": TeacherShape(4, 4), "convnext": TeacherShape(4, 4), "sam": TeacherShape(4, 4)}
    outputs = {**_outputs(), "sam": TeacherOutput(torch.zeros(2, 4, 4), (2, 2))}
    distiller = _distiller(shapes, teacher_dropout=0.999999, teacher_dropout_mode="lowest_loss")
    student = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(2))
    evaluated = distiller.eval()(student, (2, 2), outputs)
    trained = distiller.train()(student, (2, 2), outputs)
    a, loss = evaluated["teacher_weights"], trained["per_teacher_loss"]
    kept = torch.zeros_like(a, dtype=torch.bool)
    kept[:, 0] = True  # the anchor
    kept[torch.arange(2), loss.argmax(1)] = True  # the highest-loss teacher (maybe the anchor itself)
    expected = a * kept / (a * kept).sum(1, keepdim=True)
    torch.testing.assert_close(trained["teacher_weights"], expected)
    assert (evaluated["teacher_weights"] > 0).all()  # no dropping outside training


# ------------------------------------------------------------------------------------------ summary loss


def test_summary_cosine_loss_by_hand():
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert summary_cosine_loss([x], [y])["loss"].item() == pytest.approx(1.0)  # orthogonal
    assert summary_cosine_loss([x], [3 * x])["loss"].item() == pytest.approx(0.0)  # parallel
    both = summary_cosine_loss([x, x], [-x, y])  # antiparallel 2, orthogonal 1: mean 1.5
    assert both["per_teacher"].tolist() == [[2.0, 1.0]] and both["loss"].item() == pytest.approx(1.5)


def test_summary_loss_in_the_distiller():
    """Summary adapter set to the identity: the prediction is the mean student token; the anchor's summary is its
    pooled output (preferred over cls). convnext has none (has_summary=False): no adapter for it."""
    distiller = _distiller(summary_loss_weight=0.5)
    assert set(distiller.summary_adapters) == {"clip"}
    with torch.no_grad():
        distiller.summary_adapters["clip"].weight.copy_(torch.eye(4))
        distiller.summary_adapters["clip"].bias.zero_()
    outputs = _outputs()
    pooled = outputs["clip"].pooled
    plain = _distiller()
    for direction, expected in ((pooled, 0.0), (-pooled, 2.0)):
        student = direction[:, None, :].expand(2, 4, 4).clone()  # mean token = +-pooled
        out = distiller(student, (2, 2), outputs)
        assert out["summary_loss"].item() == pytest.approx(expected, abs=1e-6)
        base = plain(student, (2, 2), outputs)
        torch.testing.assert_close(out["loss"], base["loss"] + 0.5 * expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="none of the teachers"):
        _distiller({n: replace(s, has_summary=False) for n, s in SHAPES.items()}, summary_loss_weight=1.0)
    unknown = _distiller({n: replace(s, has_summary=None) for n, s in SHAPES.items()}, summary_loss_weight=1.0)
    assert set(unknown.summary_adapters) == {"clip", "convnext"}  # not known: built, skipped at run time
    out = unknown(torch.randn(2, 4, 4), (2, 2), outputs)
    assert out["summary_teachers"] == ["clip"]
    out["loss"].backward()
    assert unknown.summary_adapters["convnext"].weight.grad is not None  # a zero gradient, as DDP needs
    no_summary = {"clip": replace(outputs["clip"], cls=None, pooled=None), "convnext": outputs["convnext"]}
    with pytest.raises(ValueError, match="no teacher output"):
        _distiller(summary_loss_weight=1.0, teacher_weighting="equal", token_weighting="none")(
            torch.randn(2, 4, 4), (2, 2), no_summary
        )


# ------------------------------------------------------------------- token weights, anchor summary without CLS


def test_uniform_and_pool_attention_token_weights():
    student = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3))
    outputs = _outputs()
    none = _distiller(token_weighting="none")(student, (2, 2), outputs)
    uniform = _distiller(token_weighting="uniform")(student, (2, 2), outputs)
    torch.testing.assert_close(uniform["token_weights"], torch.full((2, 4), 0.25))
    torch.testing.assert_close(uniform["per_teacher_loss"], 2 * none["per_teacher_loss"])  # L_t = 2 mean_j l_j
    pooled = _distiller(token_weighting="pool_attention")(student, (2, 2), outputs)
    swapped = {**outputs, "clip": replace(outputs["clip"], cls_attention=outputs["clip"].pool_attention)}
    cls = _distiller()(student, (2, 2), swapped)  # the same row read as CLS attention: the same loss
    torch.testing.assert_close(pooled["token_weights"], outputs["clip"].pool_attention.softmax(-1))
    torch.testing.assert_close(pooled["loss"], cls["loss"])
    bare = {**outputs, "clip": replace(outputs["clip"], pool_attention=None)}
    with pytest.raises(ValueError, match=r"token_weighting='pool_attention'.*\['cls_attention', 'uniform', 'none'\]"):
        _distiller(token_weighting="pool_attention")(student, (2, 2), bare)


def test_anchor_summary_options_for_teacher_weights():
    student = torch.randn(2, 4, 4)
    outputs = _outputs()
    anchor = outputs["clip"]
    for kind, vector in (("cls", anchor.cls), ("pooled", anchor.pooled), ("mean_token", anchor.tokens.mean(1))):
        distiller = _distiller(anchor_summary=kind)
        out = distiller(student, (2, 2), outputs)
        adapted = {"clip": anchor.tokens, "convnext": distiller.adapters["convnext"](outputs["convnext"].tokens)}
        expected = cls_similarity_teacher_weights(vector, adapted, "clip", 0.8, 0.8)["weights"]
        torch.testing.assert_close(out["teacher_weights"], expected)
    bare = {**outputs, "clip": replace(anchor, pooled=None)}
    with pytest.raises(ValueError, match=r"anchor_summary='pooled'.*\['cls', 'mean_token'\]"):
        _distiller(anchor_summary="pooled")(student, (2, 2), bare)


# -------------------------------------------------------------------------------- faithful, saved configs


def test_faithful_preset_is_unchanged_and_old_configs_load():
    faithful = KDLossConfig.from_preset("faithful")
    assert (faithful.standardization, faithful.token_loss, faithful.teacher_dropout, faithful.summary_loss_weight,
            faithful.token_weighting, faithful.anchor_summary) == ("none", "mse", 0.0, 0.0, "cls_attention", "cls")  # fmt: skip
    old = {k: v for k, v in KD_LOSS_PRESETS["improved"].to_dict().items() if k in (
        "token_weighting", "teacher_weighting", "anchor_teacher", "anchor_weight", "resoftmax_threshold",
        "detach_teacher_weights", "standardize_features", "standardize_momentum", "teacher_dropout", "objective",
        "adapter", "teacher_loss_scale")}  # fmt: skip
    loaded = KDLossConfig(**old)  # a train_config.json written before these options existed
    assert loaded.standardization == "running" and loaded == KD_LOSS_PRESETS["improved"]
    phi = KDLossConfig.from_preset("improved", feature_standardization="phi_s")  # the named option replaces the flag
    assert phi.standardization == "phi_s" and not phi.standardize_features
    with pytest.raises(ValueError, match="contradicts"):
        KDLossConfig(standardize_features=True, feature_standardization="phi_s")
    with pytest.raises(ValueError, match="unknown KDLossConfig option"):
        KDLossConfig.from_preset("faithful", tokens_loss="mse")


ALL_ON = dict(
    feature_standardization="phi_s", token_loss="cosine_smooth_l1", teacher_dropout=0.5,
    teacher_dropout_mode="lowest_loss", summary_loss_weight=0.5, token_weighting="uniform", anchor_summary="mean_token",
)  # fmt: skip


def test_options_round_trip_through_distill_adapters_safetensors(tmp_path):
    distiller = _distiller(**ALL_ON)
    distiller.calibrate([_outputs(seed) for seed in range(2)])
    save_file(distiller.state_dict(), str(tmp_path / DISTILLER_FILE))
    loaded = _distiller(**ALL_ON)
    assert loaded.needs_calibration()
    load_adapters(loaded, str(tmp_path))
    assert not loaded.needs_calibration()  # the statistics came with the adapters: no calibration pass
    student = torch.randn(2, 4, 4)
    gen = dict(generator=torch.Generator().manual_seed(0))
    first = distiller.train()(student, (2, 2), _outputs(5), **gen)
    gen = dict(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.train()(student, (2, 2), _outputs(5), **gen)["loss"], first["loss"])


# ---------------------------------------------------------------------------------------------- kd_options


def test_kd_options_from_the_command_line_and_yaml(tmp_path):
    options = {"token_loss": "cosine_smooth_l1", "feature_standardization": "phi_s"}
    args = MoVEKDTrainingArguments(output_dir=str(tmp_path), kd_options=json.dumps(options), report_to="none")
    assert args.kd_option_overrides() == options
    config = KDLossConfig.from_preset(args.kd_preset, **args.kd_option_overrides())
    assert (config.token_loss, config.standardization) == ("cosine_smooth_l1", "phi_s")
    assert MoVEKDTrainingArguments(output_dir=str(tmp_path), report_to="none").kd_option_overrides() == {}
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"preset: tiny\ndata_path: toy:pretrain:2\noutput_dir: {tmp_path}\nkd_options:\n  summary_loss_weight: 0.5\n"
    )
    *_, parsed = parse_args([str(yaml_file)])
    assert parsed.kd_option_overrides() == {"summary_loss_weight": 0.5}
    *_, parsed = parse_args([str(yaml_file), "--kd_options", '{"token_loss": "cosine_smooth_l1"}'])
    assert parsed.kd_option_overrides() == {"token_loss": "cosine_smooth_l1"}  # the command line replaces it


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"token_loss": "huber"}', r"token_loss.*'mse', 'cosine_smooth_l1'"),
        ('{"tokens_loss": "mse"}', r"unknown key 'tokens_loss' \(did you mean 'token_loss'\?\)"),
        ('{"summary_loss_weight": "high"}', r"key 'summary_loss_weight' is 'high'.*a number"),
        ("[1, 2]", "holds a list"),
        ("{token_loss: mse}", "is not JSON"),
    ],
)
def test_bad_kd_options_name_the_field_and_key(tmp_path, value, message):
    with pytest.raises(SettingsError, match=message) as error:
        MoVEKDTrainingArguments(output_dir=str(tmp_path), kd_options=value, report_to="none")
    assert error.value.field == "kd_options"


def test_bad_kd_options_in_yaml_name_the_file(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"preset: tiny\ndata_path: toy:pretrain:2\noutput_dir: {tmp_path}\nkd_options:\n  teacher_dropout_mode: worst\n"
    )
    with pytest.raises(SettingsError, match="teacher_dropout_mode") as error:
        parse_args([str(yaml_file)])
    assert error.value.field == "kd_options" and error.value.file == str(yaml_file)


# ------------------------------------------------------------------------------------------- end to end


def test_trainer_calibrates_phi_s_and_trains_with_every_option(tmp_path):
    """A few steps of the tiny model with PHI-S + cosine/smooth-L1 + UNIC dropping + summary loss from kd_options:
    the calibration pass runs before step 1 on the teachers' tokens of the first K = 2 batches (here the whole toy
    set of 8 images), its statistics are saved in the checkpoint's distill_adapters.safetensors, losses are finite."""
    from movekd_hf.models import from_preset
    from movekd_hf.training.data_args import MoVEKDDataArguments, build_train_data
    from movekd_hf.training.teacher_source import run_teacher_specs, teacher_shapes
    from movekd_hf.training.toy_data import make_toy_llava_dataset
    from movekd_hf.training.trainer import MoVEKDTrainer

    model, processor = from_preset("tiny")
    toy = make_toy_llava_dataset(tmp_path / "toy", num_samples=8)
    data = build_train_data(
        MoVEKDDataArguments(data_path=toy.pretrain_json, image_folder=toy.image_folder, template="plain"), processor
    )
    options = {**ALL_ON, "token_weighting": "cls_attention", "anchor_summary": "cls", "phi_s_calibration_batches": 2}
    args = MoVEKDTrainingArguments(
        output_dir=str(tmp_path / "run"), stage="stage1", kd_preset="faithful", kd_options=json.dumps(options),
        max_steps=2, save_steps=2, logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, seed=3,
        report_to="none", disable_tqdm=True,
    )  # fmt: skip
    specs = run_teacher_specs("tiny", pretrained=False, checkpoints={})
    shapes = {slug: replace(shape, has_summary=slug == "clip") for slug, shape in teacher_shapes(model, specs).items()}
    vision = model.config.vision_config
    config = KDLossConfig.from_preset(args.kd_preset, **args.kd_option_overrides())  # the lead's build_distiller line
    distiller = MoVEKDDistiller(shapes, vision.hidden_size, shapes["clip"].num_tokens, config)
    trainer = MoVEKDTrainer(
        model=model, args=args, teachers=specs, distiller=distiller, train_dataset=data.dataset,
        processing_class=processor,
    )  # fmt: skip
    assert distiller.needs_calibration() and set(distiller.standardizers) == {"convnext", "sam"}
    trainer.train()
    assert not distiller.needs_calibration()
    for slug in ("convnext", "sam"):  # 8 images x the teacher's tokens
        assert int(distiller.standardizers[slug].num_tokens) == 8 * shapes[slug].num_tokens
    # The statistics are those of the teachers' tokens over the whole toy set, recomputed here in one batch.
    everything = trainer._prepare_inputs(trainer.data_collator([data.dataset[i] for i in range(8)]))
    with torch.no_grad():
        outputs = trainer.teacher_source(everything)
    for slug in ("convnext", "sam"):
        tokens = outputs[slug].tokens.reshape(-1, shapes[slug].dim).double()
        torch.testing.assert_close(distiller.standardizers[slug].mean.double(), tokens.mean(0), atol=1e-4, rtol=1e-4)
    logs = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["kd_loss"]) for entry in logs)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / DISTILLER_FILE))
    for slug in ("convnext", "sam"):
        for name in ("mean", "transform", "alpha", "num_tokens"):
            torch.testing.assert_close(
                saved[f"standardizers.{slug}.{name}"], getattr(distiller.standardizers[slug], name)
            )
    assert "summary_adapters.clip.weight" in saved
    assert trainer.calibrate_standardizers() == 0  # calibrated: a resumed run skips the pass


def test_kd_options_through_the_command_line_build_summary_adapters_only_where_a_summary_exists(tmp_path):
    """`movekd-hf train ... --kd_options` reaches the distiller: the `tiny` set's clip anchor has a CLS token, its
    ConvNeXt and SAM maps have none, so only clip gets a summary adapter (teacher_source.teacher_shapes reads it
    from the meta pass), and every trainable parameter gets a gradient (what DDP needs)."""
    from _train_fixtures import TINY_STAGE1, build

    options = {"summary_loss_weight": 0.5, "token_loss": "cosine_smooth_l1", "teacher_dropout": 0.3,
               "teacher_dropout_mode": "lowest_loss"}  # fmt: skip
    trainer = build(TINY_STAGE1, tmp_path / "run", "--kd_options", json.dumps(options), "--max_steps", "1",
                    "--save_strategy", "no", "--logging_steps", "1", "--per_device_train_batch_size", "4")  # fmt: skip
    distiller = trainer.model.distiller
    assert set(distiller.summary_adapters) == {"clip"}
    assert (distiller.config.token_loss, distiller.config.teacher_dropout_mode) == ("cosine_smooth_l1", "lowest_loss")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, batch).backward()
    without_grad = [n for n, p in trainer.model.distiller.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad
    trainer.model.zero_grad(set_to_none=True)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    assert logs and math.isfinite(logs[0]["kd_loss"]) and math.isfinite(logs[0]["kd/summary_loss"])
