"""MoVEKDDistiller: the faithful preset against a plain re-computation of METHOD.md section 4, gradient
routing, and every improvement option."""

from __future__ import annotations

import math

import pytest
import torch
from _distill_fixtures import NUM_STUDENT_TOKENS, STUDENT_DIM, STUDENT_GRID, images, tiny_spec

from movekd_hf.distill.distiller import FeatureStandardizer, MoVEKDDistiller, TeacherShape
from movekd_hf.distill.losses import KDLossConfig, mse_baseline_loss
from movekd_hf.distill.teachers import TeacherOutput, build_teacher

SHAPES = {"clip": TeacherShape(32, 16), "eva": TeacherShape(24, 64), "convnext": TeacherShape(40, 4)}
GRIDS = {"clip": (4, 4), "eva": (8, 8), "convnext": (2, 2)}


def random_outputs(batch: int = 3, seed: int = 0, scale: dict | None = None) -> dict[str, TeacherOutput]:
    g = torch.Generator().manual_seed(seed)
    outs = {}
    for name, shape in SHAPES.items():
        tokens = torch.randn(batch, shape.num_tokens, shape.dim, generator=g) * (scale or {}).get(name, 1.0)
        outs[name] = TeacherOutput(tokens=tokens, grid=GRIDS[name])
    outs["clip"].cls = torch.randn(batch, 32, generator=g)
    outs["clip"].cls_attention = torch.rand(batch, 16, generator=g) / 16
    return outs


def make_distiller(preset: str = "faithful", seed: int = 0, **overrides) -> MoVEKDDistiller:
    torch.manual_seed(seed)
    return MoVEKDDistiller(SHAPES, STUDENT_DIM, NUM_STUDENT_TOKENS, KDLossConfig.from_preset(preset, **overrides))


def reference_faithful_loss(distiller, student, outs) -> float:
    """METHOD.md sections 3, 4 and 6 written out with loops in float64, sharing only the adapter weights."""
    student = student.double()
    batch, n, d = student.shape
    adapted = {"clip": outs["clip"].tokens.double()}
    for name in ("eva", "convnext"):
        a = distiller.adapters[name]
        w1, b1 = a.channel_proj.weight.double(), a.channel_proj.bias.double()
        w2, b2 = a.token_proj.weight.double(), a.token_proj.bias.double()
        hidden = outs[name].tokens.double() @ w1.T + b1
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
        adapted[name] = (hidden.transpose(1, 2) @ w2.T + b2).transpose(1, 2)
    shares = []
    per_sample_losses = []
    for b in range(batch):
        row = outs["clip"].cls_attention[b].double()
        w = [math.exp(v) for v in row.tolist()]
        w = [v / sum(w) for v in w]
        losses = {}
        for name, tokens in adapted.items():
            per_token = [float(((student[b, j] - tokens[b, j]) ** 2).sum().detach()) / d for j in range(n)]
            losses[name] = sum(per_token) / n + sum(wj * lj for wj, lj in zip(w, per_token))
        cls = outs["clip"].cls[b].double()
        z = [float(sum(cls @ adapted[t][b, j] for j in range(n)).detach()) / n for t in ("eva", "convnext")]
        e = [math.exp(v - max(z)) for v in z]
        shares.append([v / sum(e) for v in e])
        per_sample_losses.append(losses)
    mean_share = [sum(s[i] for s in shares) / batch for i in range(2)]
    if max(mean_share) > 0.8:
        shares = [[math.exp(v) / sum(math.exp(u) for u in s) for v in s] for s in shares]
    total = 0.0
    for b in range(batch):
        losses = per_sample_losses[b]
        total += 0.8 * losses["clip"] + 0.2 * (shares[b][0] * losses["eva"] + shares[b][1] * losses["convnext"])
    return total / batch


@pytest.mark.parametrize("seed", [0, 1])
def test_faithful_preset_matches_an_independent_recomputation(seed):
    distiller = make_distiller("faithful", seed=seed)
    outs = random_outputs(seed=seed)
    student = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(seed + 10))
    out = distiller(student, STUDENT_GRID, outs)
    assert out["teacher_weights"].shape == (3, 3)
    torch.testing.assert_close(out["teacher_weights"][:, 0], torch.full((3,), 0.8))
    torch.testing.assert_close(out["teacher_weights"].sum(-1), torch.ones(3))
    expected = reference_faithful_loss(distiller, student, outs)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_faithful_preset_resoftmax_branch_matches_the_recomputation():
    distiller = make_distiller("faithful")
    outs = random_outputs()
    outs["clip"].cls = outs["clip"].cls[:1].expand(3, 32).clone()
    # Make eva's adapted tokens all equal GELU(5 * sign(cls)): its score is large for every sample, its share
    # is ~1 on the batch mean, so the shares [~1, ~0] are re-softmaxed once to [e / (e + 1), 1 / (e + 1)].
    with torch.no_grad():
        eva = distiller.adapters["eva"]
        eva.channel_proj.weight.zero_()
        eva.channel_proj.bias.copy_(5.0 * outs["clip"].cls[0].sign())
        eva.token_proj.weight.fill_(1.0 / 64)
        eva.token_proj.bias.zero_()
    student = torch.randn(3, 16, 32)
    out = distiller(student, STUDENT_GRID, outs)
    torch.testing.assert_close(out["teacher_weights"][:, 1], torch.full((3,), 0.2 * math.e / (math.e + 1)))
    assert out["loss"].item() == pytest.approx(reference_faithful_loss(distiller, student, outs), rel=1e-5)


def test_identical_student_and_teacher_tokens_give_zero_kd_loss():
    distiller = MoVEKDDistiller({"clip": SHAPES["clip"]}, STUDENT_DIM, NUM_STUDENT_TOKENS, KDLossConfig())
    outs = random_outputs()
    out = distiller(outs["clip"].tokens.clone(), STUDENT_GRID, {"clip": outs["clip"]})
    assert out["loss"] == 0


def test_a_teacher_with_zero_weight_sends_no_gradient_to_its_adapter():
    # anchor_weight 1 leaves the others weight 0; non-detached, so the weight path is open too.
    distiller = make_distiller("faithful", anchor_weight=1.0)
    student = torch.randn(3, 16, 32, requires_grad=True)
    distiller(student, STUDENT_GRID, random_outputs())["loss"].backward()
    for name in ("eva", "convnext"):
        for p in distiller.adapters[name].parameters():
            assert p.grad is None or p.grad.abs().max() == 0
    assert student.grad.abs().sum() > 0


def test_every_adapter_gets_gradient_when_weighted():
    distiller = make_distiller("faithful")
    distiller(torch.randn(3, 16, 32), STUDENT_GRID, random_outputs())["loss"].backward()
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_detached_teacher_weights_change_the_adapter_gradient_only():
    grads = {}
    for detach in (False, True):
        distiller = make_distiller("faithful", detach_teacher_weights=detach)
        out = distiller(
            torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(3)), STUDENT_GRID, random_outputs()
        )
        out["loss"].backward()
        grads[detach] = (out["loss"].detach(), distiller.adapters["eva"].channel_proj.weight.grad.clone())
    torch.testing.assert_close(grads[False][0], grads[True][0])  # same loss value
    assert not torch.allclose(grads[False][1], grads[True][1])  # different gradient


def test_teacher_dropout_drops_teachers_in_training_only():
    distiller = make_distiller("default", teacher_dropout=0.99)
    student, outs = torch.randn(3, 16, 32, requires_grad=True), random_outputs()
    out = distiller.train()(student, STUDENT_GRID, outs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["teacher_weights"], torch.tensor([[1.0, 0.0, 0.0]]).expand(3, 3))
    torch.testing.assert_close(out["loss"], out["per_teacher_loss"][:, 0].mean())
    out["loss"].backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in distiller.adapters["eva"].parameters())
    evaluated = distiller.eval()(student, STUDENT_GRID, outs)
    assert (evaluated["teacher_weights"][:, 1:] > 0).all()


def test_feature_standardizer_tracks_running_statistics():
    std = FeatureStandardizer(5, momentum=0.5)
    x = torch.randn(4, 10, 5) * torch.tensor([1.0, 10.0, 100.0, 0.1, 3.0]) + 7.0
    y = std.train()(x)
    torch.testing.assert_close(y.reshape(-1, 5).mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.reshape(-1, 5).std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    before = std.running_mean.clone()
    std(x + 2.0)  # second batch: halfway towards the new mean
    torch.testing.assert_close(std.running_mean, before + 1.0)
    frozen = std.running_mean.clone()
    std.eval()(x * 50)
    torch.testing.assert_close(std.running_mean, frozen)
    assert int(std.num_batches_tracked) == 2


def test_standardized_features_make_the_loss_independent_of_a_teachers_scale():
    student = torch.randn(3, 16, 32)
    scaled = {"eva": 1000.0, "convnext": 0.1}
    results = {}
    for standardize in (False, True):
        per_scale = []
        for scale in (None, scaled):
            distiller = make_distiller("default", standardize_features=standardize).train()
            per_scale.append(distiller(student, STUDENT_GRID, random_outputs(scale=scale)))
        results[standardize] = per_scale
    plain, standardized = results[False], results[True]
    assert not torch.allclose(plain[0]["teacher_weights"], plain[1]["teacher_weights"])
    # Equal up to the variance epsilon (1e-6 against a variance of 0.01 for the 0.1-scaled teacher).
    torch.testing.assert_close(
        standardized[0]["teacher_weights"], standardized[1]["teacher_weights"], rtol=1e-3, atol=1e-5
    )
    torch.testing.assert_close(standardized[0]["loss"], standardized[1]["loss"], rtol=1e-3, atol=1e-5)


def test_mse_baseline_objective_uses_interpolated_tokens_and_equal_weights():
    distiller = make_distiller("mse_baseline")
    student, outs = torch.randn(3, 16, 32), random_outputs()
    out = distiller(student, STUDENT_GRID, outs)
    targets = {n: (distiller.pair(n, student, STUDENT_GRID, outs[n])[1], STUDENT_GRID) for n in SHAPES}
    torch.testing.assert_close(out["loss"], mse_baseline_loss(student, STUDENT_GRID, targets)["loss"])
    assert out["per_teacher"].shape == (3,)


def test_student_head_direction_compares_in_each_teachers_space():
    distiller = make_distiller("default", adapter="student_head", teacher_weighting="equal")
    student = torch.randn(3, 16, 32, requires_grad=True)
    outs = random_outputs()
    pred, target, grid = distiller.pair("eva", student, STUDENT_GRID, outs["eva"])
    assert pred.shape == target.shape == (3, 64, 24) and grid == (8, 8)
    assert torch.equal(target, outs["eva"].tokens)  # the teacher side is untouched
    out = distiller(student, STUDENT_GRID, outs)
    torch.testing.assert_close(out["teacher_weights"], torch.full((3, 3), 1 / 3))
    out["loss"].backward()
    assert all(p.grad is not None for p in distiller.parameters())


def test_distiller_runs_on_real_tiny_teachers_and_names_missing_outputs():
    teachers = {slug: build_teacher(tiny_spec(slug)) for slug in ("clip", "eva", "convnext")}
    batch = images()
    outs = {slug: t(batch) for slug, t in teachers.items()}
    shapes = {slug: TeacherShape(o.tokens.shape[-1], o.tokens.shape[1]) for slug, o in outs.items()}
    distiller = MoVEKDDistiller(shapes, STUDENT_DIM, NUM_STUDENT_TOKENS, KDLossConfig.from_preset("faithful"))
    out = distiller(outs["clip"].tokens + 0.1 * torch.randn(2, 16, 32), STUDENT_GRID, outs)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    with pytest.raises(ValueError, match="missing for \\['convnext'\\]"):
        distiller(outs["clip"].tokens, STUDENT_GRID, {k: outs[k] for k in ("clip", "eva")})
    with pytest.raises(ValueError, match="anchor teacher 'clip' has width 24"):
        MoVEKDDistiller({"clip": TeacherShape(24, 16)}, STUDENT_DIM, NUM_STUDENT_TOKENS)


def test_training_steps_move_adapters_and_student_but_never_teachers():
    torch.manual_seed(0)
    teachers = {slug: build_teacher(tiny_spec(slug)) for slug in ("clip", "eva", "sam")}
    before = {slug: {k: v.clone() for k, v in t.state_dict().items()} for slug, t in teachers.items()}
    shapes = {"clip": TeacherShape(32, 16), "eva": TeacherShape(24, 64), "sam": TeacherShape(20, 64)}
    distiller = MoVEKDDistiller(shapes, STUDENT_DIM, NUM_STUDENT_TOKENS, KDLossConfig.from_preset("improved")).train()
    student = torch.nn.Parameter(torch.randn(2, 16, 32))
    adapters_before = {k: v.clone() for k, v in distiller.state_dict().items()}
    optimizer = torch.optim.SGD([student, *distiller.parameters()], lr=0.1)
    for step in range(3):
        for t in teachers.values():
            t.train()  # a trainer calling model.train() must not unfreeze the teachers
        outs = {slug: t(images(seed=step)) for slug, t in teachers.items()}
        loss = distiller(student, STUDENT_GRID, outs, generator=torch.Generator().manual_seed(step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for slug, t in teachers.items():
        assert not t.model.training
        for key, value in t.state_dict().items():
            assert torch.equal(value, before[slug][key]), f"{slug}.{key} changed"
    moved = [k for k, v in distiller.state_dict().items() if not torch.equal(v, adapters_before[k])]
    assert any(k.startswith("adapters.eva") for k in moved) and any(k.startswith("adapters.sam") for k in moved)
    assert any(k.startswith("standardizers.") for k in moved)  # running statistics are buffers that update


def _cast_outputs(outs: dict[str, TeacherOutput], dtype: torch.dtype) -> dict[str, TeacherOutput]:
    def cast(tensor):
        return None if tensor is None else tensor.to(dtype)

    return {n: TeacherOutput(cast(o.tokens), o.grid, cast(o.cls), cast(o.cls_attention)) for n, o in outs.items()}


@pytest.mark.parametrize("preset", ["faithful", "improved", "mse_baseline"])
@pytest.mark.parametrize(
    ("module_dtype", "teacher_dtype", "autocast"),
    [
        (torch.float32, torch.bfloat16, True),  # Trainer bf16: autocast, teachers cast to bf16
        (torch.float32, torch.float16, False),  # Trainer fp16 on a CPU: fp16 teachers, no autocast
        (torch.bfloat16, torch.bfloat16, False),  # DeepSpeed bf16: bf16 weights, no autocast
    ],
    ids=["autocast", "fp16-teachers", "bf16-weights"],
)
def test_half_precision_runs_and_computes_the_loss_in_float32(preset, module_dtype, teacher_dtype, autocast):
    """Whatever precision the adapters and teachers run in, the loss and the weights come out in float32 (the
    anchor's 0.8 exact), every adapter gets a gradient, and the loss is the float32 one up to half rounding."""
    outs, student = random_outputs(), torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(4))
    expected = make_distiller(preset).eval()(student, STUDENT_GRID, outs)["loss"]
    distiller = make_distiller(preset).to(module_dtype).eval()
    student = student.to(module_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = distiller(student, STUDENT_GRID, _cast_outputs(outs, teacher_dtype))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    if "teacher_weights" in out:
        assert out["teacher_weights"].dtype == torch.float32 and (out["teacher_weights"][:, 0] == 0.8).all()
    torch.testing.assert_close(out["loss"], expected, rtol=2e-2, atol=0)
    out["loss"].backward()
    assert student.grad.dtype == module_dtype
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.parameters())
