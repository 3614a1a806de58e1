"""A step completes with finite state or raises and changes nothing; a load refuses any state
``state_dict()`` could not have produced, names the field, and changes nothing (issue 13)."""

import numpy as np
import pytest
import torch
from torch import nn

from dataorder.ordering import GraBSampler, HerdingSampler
from dataorder.ordering.rules import NonFiniteError, update_bound
from dataorder.ordering.sources import UnsupportedDeviceError
from dataorder.samplers import StateError, StateTypeError
from state_checks import same_state

# every test runs on both sources of the exact path (conftest.exact_source)
pytestmark = pytest.mark.usefixtures("exact_source")


def stepped(balance="mean", fused=True, n=12, steps=1, batch=3, width=4):
    sampler = GraBSampler(n, balance=balance, seed=1) if balance != "herding" else HerdingSampler(n, seed=1)
    sampler.fused_cpu = fused
    grads = torch.randn(n, width, generator=torch.Generator().manual_seed(0))
    order = sampler.global_order()
    for i in range(steps):
        sampler.step(grads[order[i * batch:(i + 1) * batch]])
    return sampler


def assert_step_refused(sampler, grads, error=ValueError, match=None):
    before = sampler.state_dict()
    with pytest.raises(error, match=match):
        sampler.step(grads)
    assert same_state(sampler.state_dict(), before)


# -- steps ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_pair_balance_refuses_a_non_finite_unpaired_last_row(fused, bad):
    sampler = stepped("pair", fused)  # 3 rows stepped: one pending
    grads = torch.randn(4, 4)
    grads[-1, 1] = bad  # [pending; 4 rows]: pairs (pending, 0), (1, 2); row 3 is left unpaired
    assert_step_refused(sampler, grads, NonFiniteError)
    fresh = stepped("pair", fused, steps=0)
    odd = torch.randn(3, 4)
    odd[-1, 0] = bad  # rows 0, 1 paired; row 2 (the unpaired last) is not finite
    assert_step_refused(fresh, odd, NonFiniteError)
    fresh.step(torch.randn(3, 4))  # and the sampler still works
    assert torch.isfinite(fresh.state_dict()["tensors"]["pending"]).all()


@pytest.mark.parametrize("balance", ["mean", "recursive"])
@pytest.mark.parametrize("fused", [True, False])
def test_gradients_that_would_overflow_the_running_sums_are_refused(balance, fused):
    sampler = stepped(balance, fused)
    huge = torch.full((6, 4), 1e38)  # finite float32, but six of them sum past float32's max
    assert_step_refused(sampler, huge, NonFiniteError, match="overflow")
    sampler.step(torch.randn(6, 4))
    state = sampler.state_dict()["tensors"]
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize("fused", [True, False])
def test_pair_differences_that_overflow_are_refused(fused):
    sampler = stepped("pair", fused, steps=2)  # 6 rows stepped: nothing pending
    rows = torch.tensor([[3e38, 0.0, 0.0, 0.0], [-3e38, 0.0, 0.0, 0.0]])  # the difference is inf in float32
    assert_step_refused(sampler, rows, NonFiniteError)


def test_the_update_bound_is_never_below_an_entry_of_the_update_or_its_partial_sums():
    rng = np.random.default_rng(0)
    for trial in range(200):
        batch, width, count = rng.integers(1, 9), rng.integers(1, 6), rng.integers(1, 4)
        scale = 10.0 ** rng.integers(-3, 30)
        rows = rng.standard_normal((batch, width)) * scale
        targets = rng.standard_normal((count, width)) * scale
        weights = rng.choice([-1.0, 0.0, 1.0], size=(count, batch))
        bound = update_bound(np.abs(targets).max(axis=1), weights, rows @ rows.T)
        partial = targets.copy()
        for j in rng.permutation(batch):  # any order of accumulation passes through such partial sums
            partial += weights[:, j:j + 1] * rows[j]
            assert (np.abs(partial).max(axis=1) <= bound * (1 + 1e-12)).all(), trial


@pytest.mark.parametrize("balance", ["mean", "pair"])
def test_the_gram_path_refuses_sums_within_half_of_float32s_range_and_accepts_below(balance):
    """The device path proves an update finite from host scalars (no second transfer): it keeps
    a factor of two of headroom, so sums beyond half of float32's largest value are refused."""
    for peak, refused in ((3e38, True), (1e38, False)):
        sampler = stepped(balance, fused=False)
        state = sampler.state_dict()
        state["tensors"]["sums"][0, 0] = peak
        sampler.load_state_dict(state)
        rows = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
        if refused:
            assert_step_refused(sampler, rows, NonFiniteError, match="overflow")
        else:
            sampler.step(rows)
            assert torch.isfinite(sampler.state_dict()["tensors"]["sums"]).all()


@pytest.mark.parametrize("balance", ["mean", "pair", "recursive", "herding"])
def test_gradients_on_the_meta_device_leave_the_state_where_it_was(balance):
    sampler = stepped(balance)
    assert_step_refused(sampler, torch.zeros(3, 4, device="meta"), UnsupportedDeviceError, match="meta")
    sampler.step(torch.randn(3, 4))


def test_ghost_rows_on_the_meta_device_are_refused_before_any_change():
    model = nn.Linear(3, 2).to("meta")
    sampler = GraBSampler(8).attach(model)
    model(torch.zeros(4, 3, device="meta")).sum().backward()
    before = sampler.state_dict()
    with pytest.raises(UnsupportedDeviceError):
        sampler.step()
    assert same_state(sampler.state_dict(), before)


def test_a_gradient_dict_holding_a_list_is_a_type_error_naming_the_key():
    sampler = stepped("mean", steps=0)
    with pytest.raises(TypeError, match=r"grads\['w'\] must be a \(B, \*shape\) tensor"):
        sampler.step({"w": [[1.0, 2.0]], "b": torch.zeros(1, 2)})


def test_a_failed_micro_batch_undoes_the_whole_accumulated_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    sampler = GraBSampler(12, balance="pair").attach(model)
    x = torch.randn(12, 3)
    nn.functional.cross_entropy(model(x[:3]), torch.zeros(3, dtype=torch.long)).backward()
    sampler.step()
    before = sampler.state_dict()
    nn.functional.cross_entropy(model(x[3:6]), torch.zeros(3, dtype=torch.long)).backward()
    bad = x[6:9].clone()
    bad[0, 0] = float("nan")
    nn.functional.cross_entropy(model(bad), torch.zeros(3, dtype=torch.long)).backward()
    with pytest.raises(NonFiniteError):
        sampler.step()  # the first micro-batch was balanced, the second is not finite: neither stays
    assert same_state(sampler.state_dict(), before)


# -- loads ---------------------------------------------------------------------------------
def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


TAMPERED = [  # (balance, tamper, the typed error, a pattern naming the field)
    ("mean", lambda s: s["tensors"].update(mean=_nan(s["tensors"]["mean"])), StateError, r"\['mean'\].*NaN"),
    ("mean", lambda s: s["tensors"].update(sums=_inf(s["tensors"]["sums"])), StateError, r"\['sums'\].*inf"),
    ("mean", lambda s: s["tensors"].update(sums=s["tensors"]["sums"].to(torch.complex64)), StateTypeError,
     r"\['sums'\].*complex"),
    ("mean", lambda s: s["tensors"].update(next_sum=s["tensors"]["next_sum"].to("meta")), StateError,
     r"\['next_sum'\].*meta"),
    ("mean", lambda s: s["tensors"].update(sums=torch.zeros(2, 4)), StateError, r"tensors\['sums'\] has shape"),
    ("pair", lambda s: s["tensors"].update(pending=_nan(s["tensors"]["pending"])), StateError,
     r"\['pending'\].*NaN"),
    ("pair", lambda s: s["tensors"].update(pending=torch.zeros(0, 4)), StateError, r"pending'\] holds 0 rows"),
    ("herding", lambda s: s.update(stored=_nan(s["stored"])), StateError, r"stored.*NaN"),
    ("herding", lambda s: s.update(stored=s["stored"].to(torch.complex128)), StateTypeError, r"stored.*complex"),
    ("mean", lambda s: s.update(position=99), StateError, r"position=99 is past the end of the epoch \(12 items"),
    ("mean", lambda s: s.update(position=-1), StateError, r"position"),
    ("mean", lambda s: s.update(visited=13), StateError, r"visited=13"),
    ("mean", lambda s: s.update(visited="3"), StateTypeError, r"visited must be an int"),
    ("mean", lambda s: s.update(world_size=0), StateError, r"world_size=0 is not in \[1,"),
    ("mean", lambda s: s.update(world_size=-2), StateError, r"world_size=-2 is not in \[1,"),
    ("mean", lambda s: s.update(world_size="2"), StateTypeError, r"world_size must be an int"),
    ("mean", lambda s: s.update(world_size=1.0), StateTypeError, r"world_size must be an int"),
    ("mean", lambda s: s.update(epoch="0"), StateTypeError, r"epoch must be an int"),
    ("mean", lambda s: s.update(seed="1"), StateTypeError, r"seed must have the types of 1"),
    ("mean", lambda s: s.update(drop_last="no"), StateTypeError, r"drop_last must have the types of False"),
    ("mean", lambda s: s.update(dim="4"), StateTypeError, r"dim must be an int"),
    ("mean", lambda s: s.update(dim=-1), StateError, r"dim=-1 is not in \[1,"),
    ("mean", lambda s: s.update(dtype=5), StateTypeError, r"dtype must be a str"),
    ("mean", lambda s: s.update(dtype="float16"), StateError, r"dtype='float16'"),
    ("mean", lambda s: s.update(buckets=s["buckets"].float()), StateTypeError, r"buckets must be a torch.int16"),
    ("mean", lambda s: s.update(buckets=s["buckets"] + 7), StateError, r"buckets hold values outside"),
    ("mean", lambda s: s.update(order=torch.zeros(12, dtype=torch.int64)), StateError, r"order is not a permutation"),
    ("mean", lambda s: s.update(order=s["order"].float()), StateTypeError, r"order must be a torch.int64"),
    ("mean", lambda s: s.update(balance="pair"), StateError, r"balance='pair'"),
    ("mean", lambda s: s.update(depth=5), StateError, r"depth=5"),  # depth is a setting for every balance
    ("mean", lambda s: s.pop("sketch_auto"), StateError, r"missing 'sketch_auto'"),
    ("mean", lambda s: s.update(sketch_auto=1), StateTypeError, r"sketch_auto must be True or False"),
    ("mean", lambda s: s.update(sketch_auto=True), StateError, r"sketch_auto=True needs a sketch_dim"),
    ("mean", lambda s: s.update(tensors=None), StateError, r"balanced steps \(dim\) but no balancing sums"),
    ("pair", lambda s: s.update(tensors=None), StateError, r"balanced steps \(dim\) but no balancing sums"),
    ("mean", lambda s: s.update(dtype=None), StateError, r"dtype and dim are set together"),
    ("mean", lambda s: s["tensors"].update({k: v.double() for k, v in s["tensors"].items()}), StateTypeError,
     r"tensors are \['float64'\] but its dtype is 'float32'"),
    ("herding", lambda s: s.update(stored=s["stored"].double()), StateTypeError, r"stored must be float32"),
    ("herding", lambda s: s.update(stored=s["stored"].requires_grad_(True)), StateError, r"stored'\] requires grad"),
    ("mean", lambda s: s["tensors"]["sums"].requires_grad_(True), StateError, r"sums'\] requires grad"),
    ("mean", lambda s: s.update(positon=3), StateError, r"field \['positon'\] that GraBSampler.state_dict\(\)"),
]


@pytest.mark.parametrize("balance, tamper, error, match", TAMPERED)
def test_load_refuses_a_state_state_dict_could_not_produce_and_changes_nothing(balance, tamper, error, match):
    saved = stepped(balance, steps=3).state_dict()
    tamper(saved)
    target = stepped(balance, steps=1, batch=5)  # a sampler with a state of its own
    before = target.state_dict()
    with pytest.raises(error, match=match):
        target.load_state_dict(saved)
    assert same_state(target.state_dict(), before)


@pytest.mark.parametrize("balance", ["mean", "pair", "recursive", "herding"])
def test_untampered_states_round_trip_through_torch_save(balance, tmp_path):
    sampler = stepped(balance, steps=3)
    torch.save(sampler.state_dict(), tmp_path / "state.pt")
    other = stepped(balance, steps=0)
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert same_state(other.state_dict(), sampler.state_dict())


@pytest.mark.parametrize("balance", ["mean", "pair", "herding"])
def test_a_state_after_the_epochs_last_index_resumes_at_the_end_then_the_next_epoch(balance):
    straight = stepped(balance, steps=0)
    epoch0 = list(straight)
    grads = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    straight.step(grads[epoch0])
    state = straight.state_dict()  # after the last index, everything stepped
    straight.set_epoch(1)
    revived = stepped(balance, steps=0)
    revived.load_state_dict(state)
    assert list(revived) == []  # nothing of epoch 0 is left (the shared cursor rule) ...
    assert list(revived) == epoch0  # ... and iterating again replays it, as torch's samplers do
    revived.set_epoch(1)
    assert list(revived) == list(straight)  # the next epoch's order is the straight run's


def test_a_load_that_fails_inside_the_rule_leaves_the_live_sampler_untouched(monkeypatch):
    # the candidate loads into its own copy of the rule: a failure half-way through the rule's load changes nothing
    from dataorder.ordering.rules import HerdingRule

    def half_load(rule, state):
        rule.store = None
        raise ValueError("the rule's load failed half-way")

    sampler, untouched = stepped("herding", steps=2), stepped("herding", steps=2)
    state = stepped("herding", steps=3).state_dict()
    monkeypatch.setattr(HerdingRule, "load_state_dict", half_load)
    with pytest.raises(StateError, match="half-way"):
        sampler.load_state_dict(state)
    for s in (sampler, untouched):
        s.step(torch.ones(3, 4))
        s.set_epoch(1)
    assert sampler.global_order().tolist() == untouched.global_order().tolist()


def test_world_size_above_one_without_a_process_group_needs_the_global_batch():
    sampler = GraBSampler(8, rank=1, world_size=2)
    with pytest.raises(ValueError, match="torch.distributed is not initialised.*global_batch=True"):
        sampler.step(torch.randn(2, 3))
    assert sampler.steps_position == 0
    sampler.step(torch.randn(4, 3), global_batch=True)  # the whole global batch, gathered by the caller
    assert sampler.steps_position == 4


def test_sparse_gradients_are_a_type_error_naming_to_dense():
    sampler = GraBSampler(8)
    with pytest.raises(TypeError, match="to_dense"):
        sampler.step(torch.eye(2, 3).to_sparse())
    with pytest.raises(TypeError, match=r"grads\['w'\] must be a dense tensor"):
        sampler.step({"w": torch.eye(2, 3).to_sparse()})
    assert sampler.steps_position == 0


@pytest.mark.parametrize("sketch_dim, error", [(2**63, ValueError), (0, ValueError), (1.5, TypeError)])
def test_sketch_dim_out_of_range_is_refused_at_construction(sketch_dim, error):
    with pytest.raises(error, match="sketch_dim"):
        GraBSampler(8, sketch_dim=sketch_dim)


def test_a_step_inside_autocast_balances_at_the_rows_precision():
    # the exact ghost path's products of an embedding and a norm would meet bf16 and float32 operands
    def run(inside):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 11))
        sampler = GraBSampler(12, seed=2).attach(model)
        tokens = torch.randint(0, 11, (12, 5), generator=torch.Generator().manual_seed(1))
        for start in (0, 6):
            batch = tokens[sampler.global_order()[start:start + 6]]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(batch).float().reshape(-1, 11), batch.reshape(-1))
                loss.backward()
                if inside:
                    sampler.step()
            if not inside:
                sampler.step()
        return sampler.state_dict()

    assert same_state(run(inside=True), run(inside=False))
