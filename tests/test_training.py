"""The shared training loop and its time-to-quality numbers."""

import math

import pytest
import torch

from dataorder.data import TensorSplit, load_digits_split, load_patterns32_split, load_stdlib_lm_split
from dataorder.models import SmallResNet, build_model
from dataorder.orderings import make_ordering
from dataorder.training import (RunResult, Reach, _evaluation_steps, evaluate, first_reach, initial_state,
                                mean_cross_entropy, state_digest, summarize, train_run)



def curve(name, seed, losses, seconds_per_epoch, evals_per_epoch=1):
    epochs = [i / evals_per_epoch for i in range(len(losses))]
    return RunResult(name, seed, list(losses), epochs, [e * seconds_per_epoch for e in epochs])


# -- time to target on hand-made curves -----------------------------------------------------

def test_first_reach_is_the_first_evaluation_at_or_below_the_target():
    run = curve("grab", 0, [2.0, 1.0, 0.7, 0.8, 0.5], seconds_per_epoch=2.0, evals_per_epoch=2)
    assert first_reach(run, 0.7) == Reach(epochs=1.0, seconds=2.0)  # equal counts as reached
    assert first_reach(run, 0.75) == Reach(epochs=1.0, seconds=2.0)  # no interpolation towards 0.75
    assert first_reach(run, 2.0) == Reach(epochs=0.0, seconds=0.0)
    assert first_reach(run, 0.49) is None


def test_summarize_exact_ratios_against_rr():
    rr = [curve("rr", s, losses, 2.0) for s, losses in enumerate(([3, 2, 1.0], [3, 2, 1.2], [3, 2, 0.9]))]
    # grab: 3 s per epoch; seed 0 reaches 1.0 at epoch 1 (3 s vs rr's 4 s), seed 1 reaches 1.2 at
    # epoch 2 (6 s vs 4 s), seed 2 never reaches 0.9
    grab = [curve("grab", 0, [3, 1.0, 0.8], 3.0), curve("grab", 1, [3, 1.5, 1.2], 3.0),
            curve("grab", 2, [3, 1.5, 1.0], 3.0)]
    s = summarize(grab, rr)
    assert (s.seeds, s.reached, s.wins) == (3, 2, 1)
    assert s.time_ratio == 1.5  # median of 0.75, 1.5, inf
    assert s.epochs == 2 and s.baseline_epochs == 2
    assert s.cost_ratio == 1.5
    assert summarize(rr, rr).time_ratio == 1.0 and summarize(rr, rr).wins == 0


def test_summarize_reports_not_reached_when_the_median_seed_never_gets_there():
    rr = [curve("rr", s, [3, 1.0], 1.0) for s in range(3)]
    so = [curve("so", 0, [3, 0.9], 1.0), curve("so", 1, [3, 1.1], 1.0), curve("so", 2, [3, 1.2], 1.0)]
    s = summarize(so, rr)
    assert s.time_ratio is None and s.epochs is None and s.reached == 1 and s.wins == 0
    assert s.cost_ratio == 1.0


def test_rr_that_dips_below_its_final_loss_early_is_timed_at_the_dip():
    rr = curve("rr", 0, [3, 0.9, 1.0], 2.0)
    other = curve("so", 0, [3, 1.5, 1.0], 2.0)
    s = summarize([other], [rr])
    assert s.baseline_epochs == 1 and s.time_ratio == 2.0


def test_summarize_needs_the_same_seeds():
    with pytest.raises(ValueError, match="seeds \\[1\\]"):
        summarize([curve("grab", 1, [1, 0.5], 1.0)], [curve("rr", 0, [1, 0.5], 1.0)])


def test_evaluation_steps_are_even_and_end_the_epoch():
    assert _evaluation_steps(10, 1) == {10}
    assert _evaluation_steps(10, 4) == {2, 5, 8, 10}
    assert _evaluation_steps(3, 8) == {1, 2, 3}


# -- the loop ---------------------------------------------------------------------------------

def small_digits(n=128):
    full = load_digits_split()
    return TensorSplit(full.x_train[:n], full.y_train[:n], full.x_test[:64], full.y_test[:64], 10, "small")


def test_every_ordering_of_a_seed_starts_from_the_same_weights():
    split = small_digits()
    expected = state_digest(initial_state(split, "mlp", seed=3))
    runs = [train_run(split, "mlp", make_ordering(name), seed=3, epochs=1, batch_size=32)
            for name in ("rr", "so", "flipflop")]
    runs.append(train_run(split, "mlp", make_ordering("herding", grads="vmap"), seed=3, epochs=0))
    assert {r.init_digest for r in runs} == {expected}
    assert len({r.train_loss[0] for r in runs}) == 1  # evaluated before any step: same weights, same loss
    assert state_digest(initial_state(split, "mlp", seed=4)) != expected
    init = initial_state(split, "mlp", seed=4)
    assert train_run(split, "mlp", make_ordering("rr"), seed=3, epochs=1, init=init).init_digest == state_digest(init)


def test_run_records_evaluations_times_and_held_out_numbers():
    split = small_digits()
    ticks = []
    run = train_run(split, "logreg", make_ordering("rr"), seed=0, epochs=2, batch_size=32, evals_per_epoch=2,
                    on_epoch=lambda: ticks.append(1))
    assert run.epochs == [0, 0.5, 1.0, 1.5, 2.0] and len(run.train_loss) == 5 and len(ticks) == 2
    assert run.train_seconds[0] == 0.0 and all(b > a for a, b in zip(run.train_seconds, run.train_seconds[1:]))
    assert run.eval_seconds > 0 and run.seconds_per_epoch == run.train_seconds[-1] / 2
    assert run.final_train_loss < run.train_loss[0]
    assert 0.0 <= run.test_accuracy <= 1.0 and math.isfinite(run.test_loss)
    with pytest.raises(ValueError, match="evals_per_epoch"):
        train_run(split, "logreg", make_ordering("rr"), seed=0, epochs=1, evals_per_epoch=0)


def test_cosine_schedule_matches_a_hand_written_loop_with_the_closed_form_lr():
    split, seed, epochs, batch_size, lr = small_digits(), 1, 2, 32, 0.5
    run = train_run(split, "logreg", make_ordering("rr"), seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                    momentum=0.9, lr_schedule="cosine")
    model = build_model("logreg", tuple(split.x_train.shape[1:]), split.num_classes)
    model.load_state_dict(initial_state(split, "logreg", seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sampler = make_ordering("rr").make_sampler(len(split.y_train), seed)
    steps_per_epoch = math.ceil(len(split.y_train) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 + math.cos(math.pi * step / total)) / 2
            index = torch.tensor(order[start:start + batch_size])
            optimizer.zero_grad()
            mean_cross_entropy(model(split.x_train[index]), split.y_train[index]).backward()
            optimizer.step()
            step += 1
    assert run.final_train_loss == pytest.approx(evaluate(model, split.x_train, split.y_train)[0], rel=1e-5)
    constant = train_run(split, "logreg", make_ordering("rr"), seed=seed, epochs=epochs, batch_size=batch_size,
                         lr=lr, momentum=0.9)
    assert constant.final_train_loss != pytest.approx(run.final_train_loss, rel=1e-3)


def test_unknown_lr_schedule_is_refused_before_training():
    with pytest.raises(ValueError, match="^lr_schedule must be one of 'constant', 'cosine', got 'linear'$"):
        train_run(small_digits(), "logreg", make_ordering("rr"), seed=0, epochs=1, lr_schedule="linear")


def test_mean_cross_entropy_is_the_batch_mean_of_per_example_token_means():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    per_example = [torch.nn.functional.cross_entropy(logits[i], target[i]) for i in range(3)]
    assert torch.allclose(mean_cross_entropy(logits, target), torch.stack(per_example).mean())
    flat = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    assert torch.equal(mean_cross_entropy(*flat), torch.nn.functional.cross_entropy(*flat))


def test_lm_workload_end_to_end_at_tiny_size():
    full = load_stdlib_lm_split(context=32, max_bytes=60_000, max_windows_per_document=2, validation_fraction=0.5)
    assert full.x_train.dtype == torch.int64 and torch.equal(full.x_train[:, 1:], full.y_train[:, :-1])
    assert "stdlib corpus " in full.info and "context 32" in full.info
    split = TensorSplit(full.x_train[:48], full.y_train[:48], full.x_test[:16], full.y_test[:16], 256, "lm")
    runs = {name: train_run(split, "lm-tiny", make_ordering(name), seed=0, epochs=2, batch_size=16, lr=0.3,
                            momentum=0.9) for name in ("rr", "grab")}
    for run in runs.values():
        assert run.final_train_loss < run.train_loss[0] < 6.0  # below uniform over bytes, log 256 = 5.55, + init
        assert 0.0 <= run.test_accuracy <= 1.0 and math.isfinite(run.test_loss)
    assert runs["rr"].train_loss[0] == runs["grab"].train_loss[0]
    assert runs["rr"].train_loss[1] == pytest.approx(runs["grab"].train_loss[1])  # epoch 0: the same random order
    assert summarize([runs["grab"]], [runs["rr"]]).seeds == 1


def test_patterns32_is_fixed_balanced_and_seeded():
    a, b = load_patterns32_split(n_train=40, n_test=20), load_patterns32_split(n_train=40, n_test=20)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.bincount(torch.cat([a.y_train, a.y_test])).tolist() == [6] * 10
    assert not torch.equal(a.x_train, load_patterns32_split(n_train=40, n_test=20, seed=1).x_train)
    noiseless = load_patterns32_split(n_train=40, n_test=20, noise=0.0)
    assert not torch.equal(noiseless.x_train, a.x_train)
    with pytest.raises(ValueError, match="n_train"):
        load_patterns32_split(n_train=0)
    with pytest.raises(ValueError, match="noise"):
        load_patterns32_split(noise=-1.0)


def test_small_resnet_has_wide_convolutions_and_group_norm():
    model = build_model("resnet", (3, 32, 32), 10)
    assert isinstance(model, SmallResNet)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.out_channels >= 64 for c in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    with pytest.raises(ValueError, match="resnet needs"):
        build_model("resnet", (64,), 10)


# -- orderings --------------------------------------------------------------------------------

def test_sketched_grab_runs_and_large_k_matches_exact_grab():
    split = small_digits()
    exact = train_run(split, "mlp", make_ordering("grab"), seed=0, epochs=3, batch_size=32)
    sketched = train_run(split, "mlp", make_ordering("grab-sketch:4096"), seed=0, epochs=3, batch_size=32)
    assert sketched.ordering == "grab-sketch:4096"
    assert sketched.train_loss == pytest.approx(exact.train_loss, rel=1e-4)


@pytest.mark.parametrize("name, match", [("grab-sketch:0", "positive integer"), ("rr:4", "take a size"),
                                         ("nope", "unknown ordering")])
def test_bad_ordering_names(name, match):
    with pytest.raises(ValueError, match=match):
        make_ordering(name)


def test_a_baseline_that_ends_above_its_start_is_reached_at_zero_seconds():
    rr = curve("rr", 0, [1.0, 1.5, 2.0], 2.0)  # diverged: its final loss is reached before training
    s = summarize([curve("so", 0, [1.0, 0.5, 0.4], 2.0)], [rr])
    assert s.time_ratio == 1.0 and s.epochs == 0 and s.baseline_epochs == 0
    assert summarize([rr], [rr]).time_ratio == 1.0


def test_summarize_survives_a_baseline_that_never_reaches_its_own_final_loss():
    rr = [curve("rr", 0, [3, 2, float("nan")], 2.0), curve("rr", 1, [3, 2, 1.0], 2.0)]
    so = [curve("so", 0, [3, 1.5, 1.0], 2.0), curve("so", 1, [3, 1.5, 1.0], 2.0)]
    s = summarize(so, rr)  # seed 0 has no target (NaN): not reached, never a crash
    assert (s.seeds, s.reached, s.wins) == (2, 1, 0)
    assert s.time_ratio is None and s.epochs is None and s.baseline_epochs == math.inf


def test_a_diverging_run_raises_naming_the_ordering_and_seed():
    from dataorder.training import DivergedError

    with pytest.raises(DivergedError, match="^rr seed 1 diverged \\(full-train loss nan at epoch 1\\); lower the "
                                            "learning rate") as error:
        train_run(load_digits_split(), "logreg", make_ordering("rr"), seed=1, epochs=1, lr=1e30, weight_decay=1e-3)
    assert (error.value.ordering, error.value.seed, error.value.epoch) == ("rr", 1, 1.0)
