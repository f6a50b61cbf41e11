"""The recipe's stages on tiny models built from configs: a 2-layer BERT and a 2-layer Qwen2 decoder.

Each stage must change what it should and nothing else: the linear probe leaves the backbone
bit-identical, fine-tuning moves it (full or LoRA, merged back), interpolation reproduces both ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if TYPE_CHECKING:
    from torch import Tensor
pytest.importorskip("transformers")

# --------------------------------------------------------------------------------------------------
# Tiny models, tokenizers and data (the approach of tests/test_distill.py)
from tiny_models import (  # noqa: E402
    bert_tokenizer,
    decoder_tokenizer,
    tiny_bert,
    tiny_qwen,
    toy_pairs,
)
from transformers import (  # noqa: E402
    Qwen2ForSequenceClassification,
)

from darl_lite.distill.graded_loss import graded_distillation_loss  # noqa: E402
from darl_lite.distill.stages import (  # noqa: E402
    LoraSettings,
    choose_interpolation,
    extract_features,
    finetune,
    head_of,
    interpolate_weights,
    linear_probe,
    load_weights,
    snapshot,
)
from darl_lite.distill.trainer import predict_logits  # noqa: E402
from darl_lite.errors import InputError  # noqa: E402
from darl_lite.types import Pair  # noqa: E402

BUILDERS = {"bert": (tiny_bert, bert_tokenizer), "qwen": (tiny_qwen, decoder_tokenizer)}


def targets(pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
    grades = np.array([p.grade for p in pairs], dtype=np.int64)
    return np.eye(3, dtype=np.float32)[grades] * 0.8 + 0.2 / 3, grades


def loss_fn(logits, probs, grades):
    return graded_distillation_loss(logits, probs, grades, alpha=0.5, temperature=1.0)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and a busy shared machine makes torch's thread pool
    spin; restore the caller's setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def backbone_state(model) -> dict[str, Tensor]:
    head_name, _ = head_of(model)
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(head_name + ".")}


def head_state(model) -> dict[str, Tensor]:
    _, head = head_of(model)
    return {k: v.clone() for k, v in head.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Stage 1


@pytest.mark.parametrize("arch", ["bert", "qwen"])
def test_head_applied_to_features_reproduces_the_logits(arch):
    build, tok = BUILDERS[arch]
    model, tokenizer = build(), tok()
    pairs = toy_pairs(12)
    features, logits = extract_features(model, tokenizer, pairs, batch_size=5, max_length=16)
    assert features.shape == (12, 32) and logits.shape == (12, 3)
    _, head = head_of(model)
    with torch.no_grad():
        again = head(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(again, logits, atol=1e-5)
    np.testing.assert_allclose(logits, predict_logits(model, tokenizer, pairs, max_length=16), atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "qwen"])
def test_linear_probe_leaves_the_backbone_bit_identical_and_trains_the_head(arch):
    build, tok = BUILDERS[arch]
    model, tokenizer = build(), tok()
    pairs = toy_pairs()
    probs, grades = targets(pairs)
    features, _ = extract_features(model, tokenizer, pairs, max_length=16)
    before_backbone, before_head = backbone_state(model), head_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = linear_probe(model, features, probs, grades, loss_fn, epochs=30, lr=0.05, batch_size=16)
    after_backbone = backbone_state(model)
    assert after_backbone.keys() == before_backbone.keys()
    assert all(torch.equal(before_backbone[k], after_backbone[k]) for k in before_backbone)
    assert any(not torch.equal(before_head[k], v) for k, v in head_state(model).items())
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    # the probed head is the model's head: a fresh forward agrees with head(features)
    _, head = head_of(model)
    with torch.no_grad():
        expected = head(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(predict_logits(model, tokenizer, pairs, max_length=16), expected, atol=1e-5)


def test_linear_probe_refuses_mismatched_targets():
    model = tiny_bert()
    with pytest.raises(InputError, match="target_probs"):
        linear_probe(model, np.zeros((4, 32)), np.zeros((3, 3)), np.zeros(4, dtype=int), loss_fn)
    with pytest.raises(InputError, match="grades"):
        linear_probe(model, np.zeros((4, 32)), np.full((4, 3), 1 / 3), np.full(4, 5), loss_fn)


# --------------------------------------------------------------------------------------------------
# Stage 2


@pytest.mark.parametrize("arch", ["bert", "qwen"])
def test_finetune_moves_the_backbone_and_lowers_the_loss(arch):
    build, tok = BUILDERS[arch]
    model, tokenizer = build(), tok()
    pairs = toy_pairs()
    probs, grades = targets(pairs)
    before = backbone_state(model)
    trained, result = finetune(
        model, tokenizer, pairs, probs, grades, loss_fn, epochs=8, batch_size=16, lr=3e-3, max_length=16
    )
    assert trained is model and not trained.training
    assert result.steps == 8 * 3
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    after = backbone_state(trained)
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_finetune_max_steps_caps_the_budget():
    model, tokenizer = tiny_bert(), bert_tokenizer()
    pairs = toy_pairs(24)
    probs, grades = targets(pairs)
    _, result = finetune(model, tokenizer, pairs, probs, grades, loss_fn, epochs=5, batch_size=8, max_steps=4)
    assert result.steps == 4


@pytest.mark.parametrize("arch", ["bert", "qwen"])
def test_lora_finetune_trains_adapters_and_merges_back(arch):
    build, tok = BUILDERS[arch]
    model, tokenizer = build(), tok()
    pairs = toy_pairs(24)
    probs, grades = targets(pairs)
    names = set(model.state_dict())
    before_backbone, before_head = backbone_state(model), head_state(model)
    trained, result = finetune(
        model,
        tokenizer,
        pairs,
        probs,
        grades,
        loss_fn,
        epochs=3,
        batch_size=8,
        lr=1e-2,
        max_length=16,
        lora=LoraSettings(r=4, alpha=8),
    )
    assert type(trained) is type(model)  # a plain transformers model again
    assert set(trained.state_dict()) == names  # no lora_ or modules_to_save leftovers
    after = backbone_state(trained)
    changed = [k for k in before_backbone if not torch.equal(before_backbone[k], after[k])]
    assert changed and all(("query" in k or "value" in k or "q_proj" in k or "v_proj" in k) for k in changed)
    assert any(not torch.equal(before_head[k], v) for k, v in head_state(trained).items())
    assert result.steps == 9


# --------------------------------------------------------------------------------------------------
# Stage 3


def test_interpolation_reproduces_both_ends_and_picks_the_grid_argmax():
    model, tokenizer = tiny_bert(), bert_tokenizer()
    pairs = toy_pairs(24)
    probs, grades = targets(pairs)
    features, _ = extract_features(model, tokenizer, pairs, max_length=16)
    linear_probe(model, features, probs, grades, loss_fn, epochs=10, lr=0.05)
    probe_state = snapshot(model)
    probe_logits = predict_logits(model, tokenizer, pairs, max_length=16)
    finetune(model, tokenizer, pairs, probs, grades, loss_fn, epochs=4, batch_size=8, lr=3e-3, max_length=16)
    ft_state = snapshot(model)
    ft_logits = predict_logits(model, tokenizer, pairs, max_length=16)
    assert not np.allclose(probe_logits, ft_logits, atol=1e-3)

    load_weights(model, interpolate_weights(probe_state, ft_state, 0.0))
    np.testing.assert_allclose(
        predict_logits(model, tokenizer, pairs, max_length=16), probe_logits, atol=1e-6
    )
    load_weights(model, interpolate_weights(probe_state, ft_state, 1.0))
    np.testing.assert_allclose(predict_logits(model, tokenizer, pairs, max_length=16), ft_logits, atol=1e-6)
    half = interpolate_weights(probe_state, ft_state, 0.5)
    name = "classifier.weight"
    torch.testing.assert_close(half[name], (probe_state[name] + ft_state[name]) / 2)

    dev = {"id": pairs[:12], "ood": pairs[12:]}
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    result = choose_interpolation(model, tokenizer, probe_state, ft_state, dev, grid=grid, max_length=16)
    objectives = [obj for _, obj, _ in result.curve]
    assert [a for a, _, _ in result.curve] == list(grid)
    assert result.alpha == grid[int(np.argmax(objectives))] and result.objective == max(objectives)
    for _alpha, obj, reports in result.curve:
        assert obj == pytest.approx(np.mean([reports["id"]["macro_f1"], reports["ood"]["macro_f1"]]))
    # the model holds θ(α*) afterwards
    load_weights(model, interpolate_weights(probe_state, ft_state, result.alpha))
    chosen_logits = predict_logits(model, tokenizer, pairs, max_length=16)
    choose_interpolation(model, tokenizer, probe_state, ft_state, dev, grid=grid, max_length=16)
    np.testing.assert_allclose(
        predict_logits(model, tokenizer, pairs, max_length=16), chosen_logits, atol=1e-6
    )

    # a custom objective: the chosen alpha is the argmax of whatever it returns, ties to the first
    values = iter([0.1, 0.5, 0.9, 0.3, 0.9])
    custom = choose_interpolation(
        model,
        tokenizer,
        probe_state,
        ft_state,
        {"id": pairs[:6]},
        grid=grid,
        objective=lambda _: next(values),
    )
    assert custom.alpha == 0.5 and custom.objective == 0.9


def test_interpolation_refuses_mismatched_models():
    a = snapshot(tiny_bert())
    with pytest.raises(InputError, match="alpha"):
        interpolate_weights(a, a, 1.5)
    b = dict(a)
    b.pop("classifier.bias")
    with pytest.raises(InputError, match="names"):
        interpolate_weights(a, b, 0.5)


# --------------------------------------------------------------------------------------------------
# The whole recipe


def test_run_recipe_multi_stage_with_dasa_reports_every_stage():
    from darl_lite.distill.recipe import RecipeConfig, run_recipe

    model, tokenizer = tiny_bert(), bert_tokenizer()
    train, dev_id, pool = toy_pairs(36, seed=0), toy_pairs(12, seed=1), toy_pairs(30, seed=2)
    probs, _ = targets(train)
    seen: list[int] = []

    def labeler(chosen):  # records how many pool pairs were labelled
        seen.append(len(chosen))
        return np.eye(3, dtype=np.float32)[[p.grade for p in chosen]]

    config = RecipeConfig(
        probe_epochs=5,
        epochs=2,
        batch_size=8,
        lr=3e-3,
        max_length=16,
        alpha_grid=(0.0, 0.5, 1.0),
        augment_budget=6,
        per_query_cap=2,
    )
    before = backbone_state(model)
    result = run_recipe(
        model,
        tokenizer,
        train,
        {"dev": dev_id, "ood_dev": pool[:9]},
        config=config,
        teacher_probs=probs,
        augmentation="dasa",
        pool=pool,
        labeler=labeler,
    )
    assert set(result.metrics) == {"probe", "finetune", "interpolate"}
    for stage in result.metrics.values():
        assert set(stage) == {"dev", "ood_dev"}
        assert set(stage["dev"]) == {"macro_f1", "accuracy", "ndcg@10", "ece"}
    assert result.selection is not None and len(result.selection) == 6 and seen == [6]
    per_query: dict[str, int] = {}
    for i in result.selection.indices:
        per_query[str(pool[i].query_id)] = per_query.get(str(pool[i].query_id), 0) + 1
    assert max(per_query.values()) <= 2
    # stage 2 saw the 36 training pairs + 6 augmented ones: 2 epochs of ceil(42 / 8) = 6 batches
    assert result.stage_results["finetune"].steps == 12
    assert result.interpolation is not None and result.interpolation.alpha in (0.0, 0.5, 1.0)
    assert result.metrics["interpolate"] == next(
        r for a, _, r in result.interpolation.curve if a == result.interpolation.alpha
    )
    summary = result.summary()
    assert summary["augmentation"] == {"method": "dasa", "size": 6}
    import json

    json.dumps(summary)  # plain values
    if result.interpolation.alpha > 0:
        after = backbone_state(result.model)
        assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_run_recipe_multi_stage_with_random_augmentation_on_a_decoder_with_lora():
    from darl_lite.distill.recipe import RecipeConfig, run_recipe

    model, tokenizer = tiny_qwen(), decoder_tokenizer()
    names = set(model.state_dict())
    train, dev, pool = toy_pairs(24, seed=0), toy_pairs(9, seed=1), toy_pairs(20, seed=2)
    config = RecipeConfig(
        loss="ce",
        probe_epochs=3,
        epochs=1,
        batch_size=8,
        lr=1e-2,
        max_length=16,
        lora=LoraSettings(r=4, alpha=8),
        alpha_grid=(0.0, 1.0),
        augment_budget=5,
        augment_in="finetune",
        finetune_max_steps=3,
    )
    result = run_recipe(
        model, tokenizer, train, {"dev": dev}, config=config, augmentation="random", pool=pool
    )
    assert set(result.metrics) == {"probe", "finetune", "interpolate"}
    assert result.selection is not None and result.selection.method == "random" and len(result.selection) == 5
    assert result.stage_results["finetune"].steps == 3  # the budget holds whatever the data size
    assert type(result.model) is Qwen2ForSequenceClassification and set(result.model.state_dict()) == names


def test_recipe_config_and_inputs_are_checked():
    from darl_lite.distill.recipe import RecipeConfig, run_recipe

    with pytest.raises(InputError, match="stages"):
        RecipeConfig(stages=("finetune", "probe"))
    with pytest.raises(InputError, match="interpolate"):
        RecipeConfig(stages=("probe", "interpolate"))
    with pytest.raises(InputError, match="loss"):
        RecipeConfig(loss="mse")
    model, tokenizer = tiny_bert(), bert_tokenizer()
    with pytest.raises(InputError, match="pool"):
        run_recipe(model, tokenizer, toy_pairs(6), {"dev": toy_pairs(3)}, augmentation="dasa")
    with pytest.raises(InputError, match="human grade"):
        run_recipe(model, tokenizer, [Pair("a", "b")], {"dev": toy_pairs(3)})
