"""Tests of the training defaults (fyc_convert.train.recipe.choose/plan), of `epochs="auto"` stopping on each reason,
and of keeping the best-validating epoch (auto and fixed counts)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from _ddp_worker import build

from fyc_convert.train.finetune import (
    CHECKPOINT_NAME,
    EpochStats,
    FinetuneConfig,
    Metrics,
    finetune,
    stop_reason,
)
from fyc_convert.train.recipe import (
    AUTO_MAX_EPOCHS,
    FIXED_EPOCHS,
    LARGE_DATA,
    MANY_SHARE,
    SLOW_MAX_EPOCHS,
    Facts,
    choose,
    facts_of,
    plan,
)


def _facts(**kw) -> Facts:
    """A small labelled head (10 classes on 64 features, 2% of the parameters) with 1,000 samples and a val split."""
    return Facts(**{"in_features": 64, "num_classes": 10, "head_share": 0.02, "labelled": True,
                    "train_samples": 1000, "has_val": True, **kw})


# ------------------------------------------------------------------------------------------ the choice rule


def test_small_head_gets_sgd_at_the_plain_lr_with_distillation():
    # distillation for every head: on digits it recovered 5 of 5 seeds against 2 of 5 without (README)
    chosen, reasons = choose(FinetuneConfig(), _facts())
    assert chosen == {"optimizer": "sgd", "batch_size": 64, "lr": pytest.approx(0.01), "distill": True,
                      "epochs": "auto", "max_epochs": AUTO_MAX_EPOCHS, "patience": 2}
    assert reasons == ["optimizer sgd: a small head close to the trained one after the swap",
                       "batch size 64: 1,000 training samples",
                       "lr 0.01: 0.01 per 64 samples, linear in the batch size",
                       "distillation on: the original's outputs guide the new head back to its predictions",
                       "epochs auto: stop once within the target of the original"]


@pytest.mark.parametrize(("n", "c", "budget"), [(128, 4191, SLOW_MAX_EPOCHS), (64, 1024, SLOW_MAX_EPOCHS),
                                                 (64, 1023, AUTO_MAX_EPOCHS), (256, 1200, AUTO_MAX_EPOCHS)])
def test_the_auto_budget_grows_from_sixteen_classes_per_feature(n: int, c: int, budget: int):
    chosen, reasons = choose(FinetuneConfig(), _facts(in_features=n, num_classes=c, head_share=0.7))
    assert chosen["max_epochs"] == budget
    said = [r for r in reasons if r.startswith("budget ")]
    assert said == ([f"budget {budget} epochs: {c:,} classes on {n} features learn slowly (auto still stops once "
                     "within the target)"] if budget > AUTO_MAX_EPOCHS else [])
    assert chosen["patience"] == (5 if budget > AUTO_MAX_EPOCHS else 2)
    given, _ = choose(FinetuneConfig(max_epochs=4, patience=3), _facts(in_features=n, num_classes=c))
    assert "max_epochs" not in given and "patience" not in given  # a given budget and patience are kept


def test_more_classes_than_features_is_many_class():
    chosen, reasons = choose(FinetuneConfig(), _facts(in_features=256, num_classes=1200, head_share=0.01))
    assert chosen["optimizer"] == "adamw" and chosen["distill"] is True
    assert chosen["lr"] == pytest.approx(2e-3 * 64 / 128)  # batch 64: 1,000 samples
    assert reasons[0] == "optimizer adamw: 1200 classes on 256 features, so every class vector moves and the " \
                         "backbone must follow"
    assert "distillation on: 1200 classes on 256 features, the original's outputs guide the new head" in reasons


@pytest.mark.parametrize(("share", "many"), [(MANY_SHARE - 0.01, False), (MANY_SHARE, True), (0.77, True)])
def test_a_classifier_holding_a_quarter_of_the_parameters_is_many_class(share, many):
    chosen, reasons = choose(FinetuneConfig(), _facts(head_share=share))  # C < N: only the share decides
    assert chosen["optimizer"] == ("adamw" if many else "sgd")
    assert chosen["distill"] is True  # distillation is on for every head
    if many:
        assert f"the classifier is {100 * share:.0f}% of the parameters" in reasons[0]


@pytest.mark.parametrize(("samples", "batch"), [(LARGE_DATA - 1, 64), (LARGE_DATA, 128), (10 * LARGE_DATA, 128)])
def test_batch_size_by_data_size(samples, batch):
    chosen, reasons = choose(FinetuneConfig(), _facts(train_samples=samples))
    assert chosen["batch_size"] == batch
    assert f"batch size {batch}: {samples:,} training samples" in reasons


@pytest.mark.parametrize(("optimizer", "batch", "lr"), [
    ("sgd", 32, 0.005), ("sgd", 64, 0.01), ("sgd", 256, 0.04),
    ("adamw", 64, 1e-3), ("adamw", 128, 2e-3), ("adamw", 512, 8e-3),
])
def test_lr_is_linear_in_the_batch_size(optimizer, batch, lr):
    chosen, reasons = choose(FinetuneConfig(optimizer=optimizer, batch_size=batch), _facts())
    assert chosen["lr"] == pytest.approx(lr)
    assert "optimizer" not in chosen and "batch_size" not in chosen  # given: kept
    assert any(r.startswith(f"lr {lr:g}: ") for r in reasons)


def test_lr_follows_the_chosen_batch_size():
    chosen, _ = choose(FinetuneConfig(), _facts(num_classes=100, train_samples=LARGE_DATA))
    assert (chosen["optimizer"], chosen["batch_size"], chosen["lr"]) == ("adamw", 128, pytest.approx(2e-3))


def test_class_lr_keeps_its_own_lr():
    chosen, _ = choose(FinetuneConfig(optimizer="class-lr"), _facts())
    assert "lr" not in chosen  # plan gives class-lr its own base rate
    done, _ = plan(FinetuneConfig(optimizer="class-lr"), _facts())
    assert (done.lr, done.class_lr_eta_mu, done.class_lr_cutoff) == (1e-2, 1e4, 10)


def test_epochs_auto_only_with_a_validation_split():
    chosen, reasons = choose(FinetuneConfig(), _facts(has_val=False))
    assert chosen["epochs"] == FIXED_EPOCHS and "max_epochs" not in chosen
    assert f"{FIXED_EPOCHS} epochs: no validation split to stop on" in reasons
    chosen, _ = choose(FinetuneConfig(), _facts(has_val=True))
    assert chosen["epochs"] == "auto" and chosen["max_epochs"] == AUTO_MAX_EPOCHS


def test_a_given_epoch_count_gets_no_budget_and_a_given_auto_gets_one():
    chosen, _ = choose(FinetuneConfig(epochs=5), _facts())
    assert "epochs" not in chosen and "max_epochs" not in chosen
    chosen, _ = choose(FinetuneConfig(epochs="auto"), _facts(has_val=False))
    assert "epochs" not in chosen and chosen["max_epochs"] == AUTO_MAX_EPOCHS
    chosen, _ = choose(FinetuneConfig(max_epochs=4), _facts())
    assert chosen["epochs"] == "auto" and "max_epochs" not in chosen


@pytest.mark.parametrize("facts", [_facts(), _facts(num_classes=1200, in_features=256, train_samples=50_000),
                                   _facts(labelled=False, has_val=False)])
def test_every_given_value_is_kept(facts):
    given = FinetuneConfig(optimizer="sgd", lr=0.3, batch_size=7, distill=False, epochs=2, max_epochs=9)
    assert choose(given, facts) == ({}, [])
    # one at a time: the given one is never in the choices, the others still are
    for name, value in [("optimizer", "adamw"), ("lr", 0.3), ("batch_size", 7), ("distill", True), ("epochs", 2)]:
        chosen, _ = choose(dataclasses.replace(FinetuneConfig(), **{name: value}), facts)
        assert name not in chosen
        assert {"optimizer", "lr", "batch_size", "distill", "epochs"} - {name} <= set(chosen)


def test_many_class_with_a_given_sgd_gets_the_sgd_lr():
    chosen, _ = choose(FinetuneConfig(optimizer="sgd"), _facts(num_classes=1200, train_samples=LARGE_DATA))
    assert chosen["lr"] == pytest.approx(0.01 * 128 / 64) and chosen["distill"] is True


def test_unlabelled_data_is_distilled_even_for_a_small_head():
    chosen, reasons = choose(FinetuneConfig(), _facts(labelled=False))
    assert chosen["optimizer"] == "sgd" and chosen["distill"] is True
    assert "distillation on: the data has no labels" in reasons
    chosen, reasons = choose(FinetuneConfig(), _facts(labelled=False, num_classes=1000))
    assert chosen["distill"] is True and "distillation on: the data has no labels" in reasons


# ------------------------------------------------------------------------------------------ stop_reason


def _history(values: list[float | None], *, labelled: bool = True) -> list[EpochStats]:
    def metrics(v):
        return None if v is None else Metrics(loss=None, accuracy=v if labelled else None,
                                              agreement=None if labelled else v, samples=10)
    return [EpochStats(epoch=i + 1, loss=1.0, accuracy=None, val=metrics(v), lr=0.1, scale=1.0, seconds=1.0,
                       samples_per_s=1.0) for i, v in enumerate(values)]


@pytest.mark.parametrize(("values", "last", "expected"), [
    ([0.5], False, None),
    ([0.9], False, "recovered"),  # target 0.9 reached exactly
    ([0.5, 0.95], False, "recovered"),
    ([0.5, 0.6, 0.6], False, None),  # epoch 2 is the best, one epoch without a better one
    ([0.5, 0.6, 0.6, 0.55], False, "plateau"),  # two epochs without a better one
    ([0.7, 0.6, 0.65], False, "plateau"),
    ([0.5, 0.6, 0.7], True, "max_epochs"),
    ([0.7, 0.6, 0.65], True, "plateau"),  # the plateau is the reason even on the last epoch
    ([0.5, 0.9], True, "recovered"),
    ([None, None], False, None),  # nothing to stop on
    ([None, None], True, "max_epochs"),
])
def test_stop_reason(values, last, expected):
    assert stop_reason(_history(values), target=0.9, patience=2, labelled=True, last=last) == expected


def test_stop_reason_without_labels_uses_the_agreement_and_without_a_target_never_recovers():
    assert stop_reason(_history([0.99], labelled=False), target=0.99, patience=2, labelled=False,
                       last=False) == "recovered"
    assert stop_reason(_history([1.0, 1.0, 1.0]), target=None, patience=2, labelled=True, last=False) == "plateau"
    assert stop_reason(_history([0.2, 1.0]), target=None, patience=2, labelled=True, last=True) == "max_epochs"


# ------------------------------------------------------------------------------------------ the loop with epochs="auto"


def _auto(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"epochs": "auto", "max_epochs": 6, "batch_size": 8, "lr": 0.05, "optimizer": "sgd",
                             "distill": False, "device": "cpu", **kw})


def test_auto_stops_when_recovered_at_the_first_epoch_that_reaches_the_target(tmp_path):
    # the same seed and budget as a fixed run of max_epochs epochs: the same trajectory (the lr decays over the budget)
    model, head, bundle = build()
    fixed = finetune(model, head, bundle, _auto(epochs=6))
    accs = [h.val.accuracy for h in fixed.history]
    k = next(i for i in range(1, len(accs)) if accs[i] > max(accs[:i]))  # an epoch better than every earlier one
    model, head, bundle = build()
    result = finetune(model, head, bundle, _auto(target_drop=0.5, out_dir=tmp_path),
                      reference_accuracy=accs[k] + 0.005)  # target: exactly accs[k]
    assert result.stop_reason == "recovered"
    assert len(result.history) == k + 1 < 6
    assert [h.val.accuracy for h in result.history] == accs[:k + 1]
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["stop_reason"] == "recovered"


@pytest.mark.parametrize("patience", [1, 2])
def test_auto_stops_on_a_plateau_after_patience_epochs_without_a_better_one(patience):
    model, head, bundle = build()
    # lr so small the accuracy cannot move: epoch 1 stays the best; the target (100%) is never reached
    result = finetune(model, head, bundle, _auto(lr=1e-12, patience=patience, target_drop=0.0),
                      reference_accuracy=1.0)
    assert result.history[0].val.accuracy < 1.0
    assert result.stop_reason == "plateau"
    assert len(result.history) == patience + 1


def test_auto_stops_at_max_epochs_when_neither_recovered_nor_on_a_plateau():
    model, head, bundle = build()
    result = finetune(model, head, bundle, _auto(lr=1e-12, patience=5, max_epochs=3, target_drop=0.0),
                      reference_accuracy=1.0)
    assert result.stop_reason == "max_epochs"
    assert len(result.history) == 3


def test_a_fixed_epoch_count_stops_on_epochs_whatever_the_reference():
    model, head, bundle = build()
    result = finetune(model, head, bundle, _auto(epochs=2), reference_accuracy=0.0)
    assert result.stop_reason == "epochs" and len(result.history) == 2


def test_resuming_a_recovered_auto_run_trains_no_further(tmp_path):
    model, head, bundle = build()
    first = finetune(model, head, bundle, _auto(out_dir=tmp_path), reference_accuracy=0.0)  # recovered at once
    assert (first.stop_reason, len(first.history)) == ("recovered", 1)
    done = copy.deepcopy(model.state_dict())
    again, head, bundle = build()
    result = finetune(again, head, bundle, _auto(out_dir=tmp_path, resume=True), reference_accuracy=0.0)
    assert (result.stop_reason, len(result.history), result.resumed_from_epoch) == ("recovered", 1, 1)
    assert all(torch.equal(done[k], v) for k, v in again.state_dict().items())


def test_auto_keeps_the_best_epoch_when_it_stops_without_recovering(tmp_path):
    # lr 2.0 on the tiny MLP: validation accuracy goes up and down (0.30, 0.53, 0.27, 0.47, 0.60, 0.53); the run
    # ends at the budget and keeps epoch 5's weights, the best, not the last epoch's
    model, head, bundle = build()
    snapshots = []
    result = finetune(model, head, bundle, _auto(lr=2.0, patience=6, target_drop=0.0, out_dir=tmp_path),
                      reference_accuracy=1.0, on_epoch=lambda _: snapshots.append(copy.deepcopy(model.state_dict())))
    accs = [h.val.accuracy for h in result.history]
    best = max(range(len(accs)), key=lambda i: (accs[i], i)) + 1  # the last of the best
    assert result.stop_reason == "max_epochs" and len(accs) == 6
    assert best < 6 and result.kept_epoch == best
    kept = snapshots[best - 1]
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    assert not all(torch.equal(kept[k], v) for k, v in snapshots[4 if best != 5 else 3].items())
    # the checkpoint holds the kept weights: a resumed run trains no further and ends on them
    again, head, bundle = build()
    resumed = finetune(again, head, bundle, _auto(lr=2.0, patience=6, target_drop=0.0, out_dir=tmp_path,
                                                  resume=True), reference_accuracy=1.0)
    assert (resumed.stop_reason, resumed.kept_epoch) == ("max_epochs", best)
    assert all(torch.equal(kept[k], v) for k, v in again.state_dict().items())


def _kill_after_three_epochs_then_resume(make_config, tmp_path, **kwargs):
    """Train uninterrupted, then again killed after 3 epochs and resumed: (whole run, resumed run, final weights of
    the whole run, the resumed model)."""
    model, head, bundle = build()
    whole = finetune(model, head, bundle, make_config(), **kwargs)
    final = copy.deepcopy(model.state_dict())
    model, head, bundle = build()
    seen = []

    def stop_after_three(stats) -> None:
        seen.append(stats)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(model, head, bundle, make_config(out_dir=tmp_path), on_epoch=stop_after_three, **kwargs)
    again, head, bundle = build()
    resumed = finetune(again, head, bundle, make_config(out_dir=tmp_path, resume=True), **kwargs)
    return whole, resumed, final, again


def test_auto_keeps_the_best_epoch_across_a_resume(tmp_path):
    # stopped after 3 of 6 epochs (a kill), resumed: the best weights of epochs 1-3 travel in the checkpoint
    whole, resumed, final, again = _kill_after_three_epochs_then_resume(
        lambda **kw: _auto(lr=2.0, patience=6, target_drop=0.0, **kw), tmp_path, reference_accuracy=1.0)
    assert resumed.resumed_from_epoch == 3 and resumed.kept_epoch == whole.kept_epoch is not None
    assert all(torch.equal(final[k], v) for k, v in again.state_dict().items())


# ------------------------------------------------------------------------------------------ plan: the one owner


def test_plan_leaves_no_training_field_undecided_and_applied_twice_changes_nothing():
    done, reasons = plan(FinetuneConfig(), _facts())
    assert (done.optimizer, done.batch_size, done.lr, done.distill, done.epochs, done.max_epochs) == \
        ("sgd", 64, pytest.approx(0.01), True, "auto", AUTO_MAX_EPOCHS)
    assert reasons == choose(FinetuneConfig(), _facts())[1]
    assert plan(done, _facts()) == (done, [])
    fixed, _ = plan(FinetuneConfig(epochs=3), _facts())
    assert fixed.max_epochs == AUTO_MAX_EPOCHS and fixed.epochs == 3  # the checkpoint records every field


def test_plan_resets_class_lr_fields_unless_class_lr_trains():
    done, _ = plan(FinetuneConfig(optimizer="sgd", class_lr_eta_mu=5.0, class_lr_cutoff=2, class_lr_layers=("a",)),
                   _facts())
    assert (done.class_lr_eta_mu, done.class_lr_cutoff, done.class_lr_layers) == (1e4, 10, None)
    done, _ = plan(FinetuneConfig(optimizer="class-lr", class_lr_eta_mu=5.0, class_lr_layers=("a",)), _facts())
    assert (done.class_lr_eta_mu, done.class_lr_cutoff, done.class_lr_layers) == (5.0, 10, ("a",))


def test_plan_without_a_teacher_does_not_distil_and_unlabelled_data_with_one_always_does():
    done, reasons = plan(FinetuneConfig(), _facts(has_teacher=False))
    assert done.distill is False and "distillation off: no teacher (the original model) was given" in reasons
    done, reasons = plan(FinetuneConfig(distill=False), _facts(labelled=False))
    assert done.distill is True and reasons[-1].startswith("distillation on: the data has no labels")


def test_facts_of_a_swapped_model_count_the_linear_it_replaced():
    model, head, bundle = build()  # Linear(12, 32), Linear(32, 16), HadamardHead(16 -> 4): 944 backbone parameters
    facts = facts_of(model, head, bundle, teacher=None)
    linear = 16 * 4 + 4
    assert facts == Facts(in_features=16, num_classes=4, head_share=pytest.approx(linear / (944 + linear)),
                          labelled=True, train_samples=90, has_val=True, has_teacher=False)


def test_the_library_finetune_takes_the_recipes_defaults(tmp_path):
    # before: the library's own defaults (AdamW 1e-3, no distillation) differed from the CLI's; now both plan
    model, head, bundle = build()
    teacher = copy.deepcopy(model)
    finetune(model, head, bundle, FinetuneConfig(epochs=1, optimizer="adamw", device="cpu", out_dir=tmp_path),
             teacher=teacher)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["config"]
    expected, _ = plan(FinetuneConfig(epochs=1, optimizer="adamw"), facts_of(model, head, bundle, teacher=teacher))
    assert (saved["optimizer"], saved["batch_size"], saved["lr"], saved["distill"]) == \
        ("adamw", 64, pytest.approx(2e-3 * 64 / 128), True)
    assert saved["lr"] == expected.lr and saved["batch_size"] == expected.batch_size


# ------------------------------------------------------------------------------------------ fixed counts keep the best


def _fixed(**kw) -> FinetuneConfig:
    return _auto(**{"epochs": 6, "lr": 2.0, **kw})


def test_a_fixed_epoch_count_keeps_the_best_validating_epoch(tmp_path):
    # the run of test_auto_keeps_the_best_epoch_when_it_stops_without_recovering with a fixed count of 6
    model, head, bundle = build()
    snapshots = []
    result = finetune(model, head, bundle, _fixed(out_dir=tmp_path),
                      on_epoch=lambda _: snapshots.append(copy.deepcopy(model.state_dict())))
    accs = [h.val.accuracy for h in result.history]
    best = max(range(len(accs)), key=lambda i: (accs[i], i)) + 1
    assert result.stop_reason == "epochs" and len(accs) == 6
    assert best < 6 and result.kept_epoch == best and accs[best - 1] > accs[-1]
    assert result.final.accuracy == accs[best - 1]  # what the kept weights validated at
    assert all(torch.equal(snapshots[best - 1][k], v) for k, v in model.state_dict().items())
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["kept_epoch"] == best


def test_a_fixed_epoch_count_ending_on_its_best_epoch_keeps_the_last():
    model, head, bundle = build()
    result = finetune(model, head, bundle, _fixed(epochs=1))
    assert result.kept_epoch is None and result.final == result.history[-1].val


def test_a_fixed_epoch_count_keeps_the_same_best_across_a_kill_and_resume(tmp_path):
    whole, resumed, final, again = _kill_after_three_epochs_then_resume(_fixed, tmp_path)
    assert resumed.resumed_from_epoch == 3 and resumed.kept_epoch == whole.kept_epoch is not None
    assert all(torch.equal(final[k], v) for k, v in again.state_dict().items())
