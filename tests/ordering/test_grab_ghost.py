"""GraB's ghost path (attach + step()) equals the materialised path (step(grads))."""

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from dataorder.ordering import GraBSampler
from dataorder.samplers import StateError
from reference_grads import per_example_grads
from state_checks import same_state

# every test runs on both sources of the exact path (conftest.exact_source)
pytestmark = pytest.mark.usefixtures("exact_source")


class Block(nn.Module):
    """A small transformer block of supported layers, on token sequences."""

    def __init__(self, vocab=13, dim=8, classes=3):
        super().__init__()
        self.embed, self.norm = nn.Embedding(vocab, dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=-1) @ v
        return self.out(h.mean(dim=1))


MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)), lambda g, n: torch.randn(n, 6, generator=g)),
    "linear3d": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)),
                 lambda g, n: torch.randn(n, 3, 4, generator=g)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)),
               lambda g, n: torch.randn(n, 1, 6, 6, generator=g)),
    "transformer": (Block, lambda g, n: torch.randint(0, 13, (n, 5), generator=g)),
}


def run_both(model_name, balance, n=23, batch=5, epochs=3, accumulate=1):
    make_model, make_x = MODELS[model_name]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = make_model()
    x, y = make_x(generator, n), torch.randint(0, 3, (n,), generator=generator)
    ghost = GraBSampler(n, balance=balance, seed=3).attach(model)
    materialised = GraBSampler(n, balance=balance, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(epochs):
        ghost.set_epoch(epoch), materialised.set_epoch(epoch)
        order = list(ghost)
        assert order == list(materialised)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            materialised.step(per_example_grads(model, x[idx], y[idx]))
            optimizer.zero_grad()
            micro = len(idx) // accumulate
            for m in range(0, len(idx), micro):
                part = idx[m:m + micro]
                (nn.functional.cross_entropy(model(x[part]), y[part]) / accumulate).backward()
            ghost.step()
            optimizer.step()
    return ghost, materialised


def assert_same_state(ghost, materialised):
    a, b = ghost.state_dict(), materialised.state_dict()
    assert torch.equal(a["order"], b["order"])
    assert torch.equal(a["buckets"], b["buckets"])
    for name, value in b["tensors"].items():
        assert torch.allclose(a["tensors"][name].double(), value.double(), rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("balance", ["mean", "pair", "recursive"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_ghost_equals_materialised(model_name, balance, ghost_form):
    ghost, materialised = run_both(model_name, balance)
    assert_same_state(ghost, materialised)
    ghost.set_epoch(3), materialised.set_epoch(3)
    assert list(ghost) == list(materialised)  # the next order, decided by the last epoch


def test_gradient_accumulation_balances_micro_batches_in_order():
    # two equal micro-batches per step, each loss divided by 2 as accumulation does: every
    # per-example gradient is read at half scale, which changes no sign and no order
    ghost, materialised = run_both("linear", "mean", n=24, batch=6, accumulate=2)
    ghost_state, reference = ghost.state_dict(), materialised.state_dict()
    assert torch.equal(ghost_state["order"], reference["order"])
    assert torch.equal(ghost_state["buckets"], reference["buckets"])
    assert torch.allclose(ghost_state["tensors"]["mean"], reference["tensors"]["mean"] / 2, atol=1e-6)
    ghost.set_epoch(3), materialised.set_epoch(3)
    assert list(ghost) == list(materialised)


def test_unsupported_layer_falls_back_with_a_warning_and_stays_exact():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(6))

        def forward(self, z):
            return z * self.weight

    MODELS["scaled"] = (lambda: nn.Sequential(Scale(), nn.Linear(6, 3)), MODELS["linear"][1])
    try:
        with pytest.warns(UserWarning, match="Scale"):
            ghost, materialised = run_both("scaled", "mean", epochs=2)
        assert_same_state(ghost, materialised)
    finally:
        del MODELS["scaled"]


def test_bf16_autocast_stays_close_and_state_is_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    ghost = GraBSampler(40, seed=1).attach(model)
    materialised = GraBSampler(40, seed=1)
    for epoch in range(2):
        ghost.set_epoch(epoch), materialised.set_epoch(epoch)
        order = list(ghost)
        for start in range(0, 40, 8):
            idx = order[start:start + 8]
            materialised.step(per_example_grads(model, x[idx], y[idx]))
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            ghost.step()
    state, reference = ghost.state_dict()["tensors"], materialised.state_dict()["tensors"]
    assert all(t.dtype == torch.float32 for t in state.values())
    for name in ("mean", "next_sum"):
        relative = (state[name] - reference[name]).norm() / reference[name].norm()
        assert relative < 0.05, (name, float(relative))


def test_state_is_o_of_d_not_n():
    sizes = []
    for n in (20, 200):
        model = nn.Linear(5, 2)
        sampler = GraBSampler(n, balance="recursive").attach(model)
        sampler.set_epoch(0)
        x, y = torch.randn(10, 5), torch.randint(0, 2, (10,))
        nn.functional.cross_entropy(model(x), y).backward()
        sampler.step()
        tensors = sampler.state_dict()["tensors"]
        sizes.append(sum(t.numel() for t in tensors.values()))
    assert sizes[0] == sizes[1] == (7 + 1 + 1) * (5 * 2 + 2)  # 7 tree sums, mean, next sum; d = 12


def test_ghost_errors_are_clear_and_leave_state_alone():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="attach"):
        GraBSampler(10).step()
    with pytest.raises(ValueError, match="sketch"):
        GraBSampler(10, sketch_dim=4).attach(model)
    sampler = GraBSampler(10).attach(model)
    sampler.set_epoch(0)
    with pytest.raises(ValueError, match="backward"):
        sampler.step()
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="only 10 positions"):
        sampler.step()
    assert sampler.steps_position == 0
    nn.functional.cross_entropy(model(x[:4]), y[:4]).backward()
    bad = torch.full((4, 3), float("nan"))
    nn.functional.cross_entropy(model(bad), y[:4]).backward()
    with pytest.raises(ValueError, match="NaN"):
        sampler.step()  # two micro-batches, the second bad: neither is applied
    assert sampler.steps_position == 0
    sampler.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn.functional.cross_entropy(model(x), y).backward()  # no hooks left


def _has_sketch():
    from dataorder.ghost import GhostGrads

    return hasattr(GhostGrads, "collect_sketch")


@pytest.mark.skipif(not _has_sketch(), reason="GhostGrads(sketch=...) is not merged yet (branch sketch)")
@pytest.mark.parametrize("balance", ["mean", "pair"])
def test_a_sketch_wider_than_every_layer_balances_like_the_exact_path(balance):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    orders = []
    for sketch in (None, 64):
        net = copy.deepcopy(model)
        sampler = GraBSampler(12, balance=balance, seed=3).attach(net, sketch=sketch)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            order = sampler.global_order()
            for start in range(0, 12, 4):
                batch = order[start:start + 4]
                nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
                sampler.step()
                net.zero_grad()
        sampler.set_epoch(2)
        orders.append(sampler.global_order().tolist())
    assert orders[0] == orders[1]


def test_attach_checks_the_sketch_argument():
    with pytest.raises(ValueError, match="sketch must be None"):
        GraBSampler(4).attach(nn.Linear(2, 2), sketch=0)
    if not _has_sketch():
        with pytest.raises(NotImplementedError, match="collect_sketch"):
            GraBSampler(4).attach(nn.Linear(2, 2), sketch=4)


def _forward_hooks(model):
    return sum(len(module._forward_hooks) for module in model.modules())


def _train_steps(model, sampler, steps=2, batch=4):
    sampler.set_epoch(0)
    indices = iter(sampler)
    for _ in range(steps):
        idx = torch.tensor([next(indices) for _ in range(batch)])
        x, y = torch.randn(batch, 6, generator=torch.Generator().manual_seed(int(idx[0]))), idx % 3
        nn.functional.cross_entropy(model(x), y).backward()
        sampler.step()
        model.zero_grad()


@pytest.mark.parametrize("sketch", [None, 4])
def test_a_second_sampler_on_one_model_takes_it_over_and_the_first_one_says_so(sketch):
    """A cell run again: the old sampler's hooks must not keep capturing (and holding) every batch."""
    model = MODELS["linear"][0]()                          # two Linear layers: two forward hooks per sampler
    old = GraBSampler(16, seed=1).attach(model, sketch=sketch)
    with pytest.warns(UserWarning, match="attached to another GraBSampler, whose hooks are now removed"):
        new = GraBSampler(16, seed=1).attach(model, sketch=sketch)
    assert _forward_hooks(model) == 2 and len(model._forward_pre_hooks) == 1
    _train_steps(model, new)
    assert old._source.ghost._records == [] and old._source.ghost._sketch_rows == {}   # nothing captured
    with pytest.raises(ValueError, match=r"^this sampler's hooks were removed when another GraBSampler attached"):
        old.step()
    old.detach()                                           # a no-op now, without error
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # attaching the same sampler again is no takeover
        new.attach(model, sketch=sketch)
    assert _forward_hooks(model) == 2
    _train_steps(model, new)


def test_a_wrapper_and_its_inner_module_are_one_model():
    """DDP-style aliasing: a sampler on the wrapper and one on the wrapped module hook the same layers."""
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    inner = MODELS["linear"][0]()
    first = GraBSampler(16).attach(Wrapper(inner))
    with pytest.warns(UserWarning, match="attached to another GraBSampler"):
        GraBSampler(16).attach(inner)
    assert first._source.displaced


def test_samplers_on_disjoint_parameters_do_not_displace_each_other():
    model = MODELS["linear"][0]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = GraBSampler(16).attach(model, params=["0.weight", "0.bias"])
        second = GraBSampler(16).attach(model, params=["2.weight", "2.bias"])
    assert not first._source.displaced and not second._source.displaced


def test_a_collected_sampler_takes_its_hooks_with_it():
    model = MODELS["linear"][0]()
    GraBSampler(16).attach(model, sketch=4)                # never kept: collected at once
    gc.collect()
    assert _forward_hooks(model) == 0 and not model._forward_pre_hooks
    kept = GraBSampler(16).attach(model)
    gc.collect()
    assert _forward_hooks(model) > 0
    kept.detach()
    assert _forward_hooks(model) == 0


def _stepped(sketch, steps=2):
    model = MODELS["linear"][0]()
    sampler = GraBSampler(16, seed=1).attach(model, sketch=sketch)
    _train_steps(model, sampler, steps)
    return model, sampler


@pytest.mark.parametrize("saved, attached", [(4, None), (4, 2), (None, 4)])
def test_a_state_is_refused_by_a_sampler_attached_for_other_rows_and_changes_nothing(saved, attached):
    """Sums of sketch=4 rows and of exact rows live in different spaces: resuming one with the other is wrong."""
    state = _stepped(saved)[1].state_dict()
    model, sampler = _stepped(attached, steps=1)
    before = sampler.state_dict()
    with pytest.raises(StateError, match=r"^state's running sums were balanced on (sketch=4|exact) rows .* but this "
                                         r"sampler is attached for (sketch=\d|exact) rows"):
        sampler.load_state_dict(state)
    assert same_state(sampler.state_dict(), before)


def test_attach_refuses_rows_of_another_space_than_the_sums_and_keeps_the_old_hooks():
    model, sampler = _stepped(4)
    for other in (None, 2):
        with pytest.raises(ValueError, match=r"^this sampler's running sums were balanced on sketch=4 rows "
                                             r"\(attach\(model, sketch=4\)\), so it cannot balance"):
            sampler.attach(model, sketch=other)
    assert _forward_hooks(model) == 2 and sampler._source.sketch == 4
    _train_steps(model, sampler, 1)                        # still balancing sketch=4 rows
    with pytest.raises(ValueError, match="cannot balance exact rows"):
        sampler.step(torch.randn(4, sampler.state_dict()["dim"]))   # exact rows of the same width


def test_a_state_loaded_before_attach_needs_the_saved_sketch_and_then_resumes_exactly():
    model, original = _stepped(4)
    state, weights = original.state_dict(), copy.deepcopy(model.state_dict())
    _train_steps(model, original, 1)
    resumed_model = MODELS["linear"][0]()
    resumed_model.load_state_dict(weights)
    resumed = GraBSampler(16, seed=1)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="balanced on sketch=4 rows"):
        resumed.attach(resumed_model)
    assert _forward_hooks(resumed_model) == 0              # refused before any hook went on
    resumed.attach(resumed_model, sketch=4)
    _train_steps(resumed_model, resumed, 1)
    assert same_state(resumed.state_dict(), original.state_dict())


@pytest.mark.parametrize("bad, match", [(0, "ghost_sketch"), ("4", "ghost_sketch"), (True, "ghost_sketch"),
                                        (None, "exact rows")])
def test_a_tampered_ghost_sketch_is_refused(bad, match):
    state = _stepped(4)[1].state_dict()
    sampler = _stepped(4, steps=1)[1]
    with pytest.raises(StateError, match=match):
        sampler.load_state_dict({**state, "ghost_sketch": bad})
    fresh = GraBSampler(16, seed=1).state_dict()
    with pytest.raises(StateError, match="ghost_sketch but no balanced steps"):
        GraBSampler(16, seed=1).load_state_dict({**fresh, "ghost_sketch": 4})


def test_forwards_without_a_backward_keep_no_graph_alive():
    """Evaluation without torch.no_grad() between steps: each batch's graph goes when the loop drops it."""
    model = MODELS["linear"][0]()
    sampler = GraBSampler(16).attach(model)
    sampler.set_epoch(0)
    outputs = []
    for _ in range(300):                                   # a validation loop that forgot no_grad
        out = model(torch.randn(8, 6))
        outputs.append(weakref.ref(out))
    del out
    gc.collect()
    assert not any(ref() is not None for ref in outputs)   # no graph (nor its inputs) kept by the hooks
    assert len(sampler._source.ghost._records) <= 256 + 2  # dead records forgotten as forwards go on
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    gc.collect()                                           # the graph is gone; the gradients it gave stay
    sampler.step()
    assert sampler.state_dict()["visited"] == 4


def test_two_forwards_then_one_backward_are_two_micro_batches():
    model = MODELS["linear"][0]()
    sampler = GraBSampler(16, seed=2).attach(model)
    reference = GraBSampler(16, seed=2)
    sampler.set_epoch(0), reference.set_epoch(0)
    order = list(sampler)
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    first, second = order[:4], order[4:8]
    loss = (nn.functional.cross_entropy(model(x[first]), y[first])
            + nn.functional.cross_entropy(model(x[second]), y[second]))
    gc.collect()                                           # both graphs live on in loss only
    loss.backward()
    sampler.step()
    reference.step(torch.cat([per_example_grads(model, x[first], y[first]),
                              per_example_grads(model, x[second], y[second])]))
    assert torch.equal(sampler.state_dict()["buckets"], reference.state_dict()["buckets"])
    assert torch.allclose(sampler.state_dict()["tensors"]["sums"], reference.state_dict()["tensors"]["sums"],
                          atol=1e-5)


def test_pending_outputs_needs_keep_outputs():
    from dataorder.ghost import GhostGrads

    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^pending_outputs\(\) needs GhostGrads\(model, keep_outputs=True\)"):
        GhostGrads(model).pending_outputs()
    with pytest.raises(TypeError, match="keep_outputs must be a bool"):
        GhostGrads(model, keep_outputs="yes")


class Branchy(nn.Module):
    """A head that some forwards skip (conditional computation)."""

    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x, heads=("a", "b")):
        h = torch.relu(self.body(x))
        return sum(getattr(self, head)(h) for head in heads) / len(heads)


@pytest.mark.parametrize("sketch", [None, 4])
def test_a_parameter_a_forward_skipped_is_named_with_the_fix_and_the_step_can_be_retried(sketch):
    model = Branchy()
    sampler = GraBSampler(16).attach(model, sketch=sketch)
    sampler.set_epoch(0)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    before = sampler.state_dict()
    nn.functional.cross_entropy(model(x, heads=("a",)), y).backward()
    with pytest.raises(RuntimeError, match=r"^no gradient was captured for \['b.weight', 'b.bias'\] in this forward: "
                                           r".*leave such parameters out with params=$"):
        sampler.step()
    assert same_state(sampler.state_dict(), before)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()    # the captured batch was dropped: a clean retry
    sampler.step()
    assert sampler.state_dict()["visited"] == 4
    sampler.detach()
    skipping = GraBSampler(16).attach(model, sketch=sketch, params=lambda name, p: not name.startswith("b."))
    skipping.set_epoch(0)
    nn.functional.cross_entropy(model(x, heads=("a",)), y).backward()
    skipping.step()                                        # the fix the message names
    assert skipping.state_dict()["visited"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sketch", [None, 4])
@pytest.mark.parametrize("balance", ["mean", "pair", "recursive"])
def test_a_cuda_step_synchronises_once_the_products_download(balance, sketch):
    """On CUDA a step waits for the device once (the products come to the host); the signs go
    back without blocking (dataorder._device.upload). Counted by torch's sync debug mode."""
    make_model, make_x = MODELS["transformer"]
    torch.manual_seed(0)
    model = make_model().cuda()
    x, y = make_x(torch.Generator().manual_seed(0), 40).cuda(), torch.randint(0, 3, (40,)).cuda()
    sampler = GraBSampler(40, balance=balance).attach(model, sketch=sketch)
    sampler.set_epoch(0)
    per_step = []
    for step, index in enumerate(torch.from_numpy(sampler.global_order()).split(5)):
        index = index.cuda()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sampler.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        model.zero_grad(set_to_none=True)
        if step:  # the first step moves the sketch's projections to the device once
            per_step.append(sum("synchronizing" in str(w.message) for w in caught))
    assert per_step == [1] * len(per_step)


class _PositionsLM(nn.Module):
    """Token and position embeddings (positions of shape (1, T), as HF GPT-2 makes them) and a head."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions, self.head = nn.Embedding(7, 4), nn.Embedding(6, 4), nn.Linear(4, 7)

    def forward(self, x):
        return self.head(self.tokens(x) + self.positions(torch.arange(x.shape[1])[None]))


def _lm_batches(order, batch=2):
    data = torch.randint(0, 7, (5, 6), generator=torch.Generator().manual_seed(0))
    return [data[order[start:start + batch]] for start in range(0, len(order), batch)]


def _lm_step(model, sampler, x):
    nn.functional.cross_entropy(model(x).reshape(-1, 7), x.reshape(-1)).backward()
    sampler.step()


@pytest.mark.parametrize("sketch", [None, 4])
def test_a_run_resumed_on_a_one_example_batch_balances_the_saved_parameters(sketch):
    # at B = 1 positions of shape (1, T) look per-example: the state says they were left out
    torch.manual_seed(0)
    model = _PositionsLM()
    fresh = copy.deepcopy(model)
    straight = GraBSampler(5, seed=1).attach(model, sketch=sketch)
    with pytest.warns(UserWarning, match="positions"):
        batches = _lm_batches(straight.global_order())
        _lm_step(model, straight, batches[0])
    _lm_step(model, straight, batches[1])
    state = copy.deepcopy(straight.state_dict())
    assert state["left_out"] == ["positions.weight"]
    _lm_step(model, straight, batches[2])  # the epoch's last batch holds one example

    resumed = GraBSampler(5, seed=1).attach(fresh, sketch=sketch)
    resumed.load_state_dict(state)
    _lm_step(fresh, resumed, batches[2])
    for sampler in (straight, resumed):
        sampler.set_epoch(1)
    assert resumed.global_order().tolist() == straight.global_order().tolist()


def test_a_load_forgets_what_the_hooks_captured_before_it():
    model = nn.Linear(3, 2)
    sampler = GraBSampler(12).attach(model)
    x = torch.randn(12, 3)
    model(x[:4]).square().mean().backward()
    sampler.step()
    state = copy.deepcopy(sampler.state_dict())
    model(x[4:8]).square().mean().backward()  # captured, never stepped: the loaded state is from before it
    sampler.load_state_dict(state)
    model(x[4:8]).square().mean().backward()
    sampler.step()
    assert sampler.steps_position == 8


def test_a_state_leaving_out_parameters_the_model_lacks_is_refused():
    model = _PositionsLM()
    sampler = GraBSampler(5).attach(model)
    with pytest.warns(UserWarning, match="positions"):
        _lm_step(model, sampler, _lm_batches(sampler.global_order())[0])
    state = {**sampler.state_dict(), "left_out": ["blocks.0.weight"]}
    other = GraBSampler(5).attach(_PositionsLM())
    with pytest.raises(StateError, match=r"left_out names \['blocks.0.weight'\]"):
        other.load_state_dict(state)
    detached = GraBSampler(5)
    detached.load_state_dict(state)  # not attached: checked when it is
    with pytest.raises(ValueError, match="attach the model"):
        detached.attach(_PositionsLM())
