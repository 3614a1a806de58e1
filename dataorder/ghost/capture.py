"""GhostGrads: capture each layer's input and output gradient during an ordinary backward."""

from __future__ import annotations

import functools
import numbers
import warnings
import weakref

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dataorder.ghost.batch import GhostBatch
from dataorder.ghost.errors import RepeatedBackwardError, UnsupportedLayerError, check_no_batch_statistics
from dataorder.ghost.factors import DenseFactors, EmbeddingFactors, LinearFactors
from dataorder.ghost.rules import check_rule_output, fallback_rule, linear_rule, rule_for, saved_statistics
from dataorder.ghost.sketch import EXACT_SIDE, SketchRows, Sketcher
from dataorder.ghost.tied import TiedFactors
from dataorder.grads import select_parameters

__all__ = ["GhostGrads"]


class GhostGrads:
    """Capture per-example gradient factors of ``model`` during ordinary backward passes.

    Every forward of a module that owns trainable parameters records its input, and a hook
    on its output records the output gradient during ``loss.backward()``. :meth:`collect`
    turns the records into one :class:`GhostBatch` per forward of ``model`` that was
    followed by a backward (one per micro-batch under gradient accumulation), in order,
    and clears them. A ``model`` that is never called itself (an ``nn.ModuleDict``, or a loop
    calling ``model.enc`` and ``model.head``) has its forwards told apart by the backwards: a
    forward starts at the first hooked call after an output gradient arrived, and that call's
    input stands in for the model's (its batch size, its dim 1 for positions). With
    ``sketch=k``, :meth:`collect_sketch` gives instead each batch's per-example Kronecker
    sketches (at most ``k × k`` values per weight, :mod:`dataorder.ghost.sketch`) as a dense
    ``(B, D)`` tensor, built during the backward (no factors are kept; :meth:`collect` is
    then unavailable). ``dense=True`` builds the same rows with nothing projected: the exact
    per-example gradients, ``(B, d)``, from :meth:`collect_sketch`. For a model with few
    parameters this is much cheaper than :meth:`collect`'s products (a step's cost there is
    its calls, not its arithmetic); each call's inputs are kept with its graph, so a second
    backward through one forward (``retain_graph=True``) adds its gradients, as on the
    factored path.

    The loss is assumed mean-reduced over the batch: captured output gradients are
    multiplied by the batch size to give per-example gradients. Any other constant factor
    (e.g. ``1/accumulation_steps``) scales every per-example gradient alike.

    ``params`` selects parameters like :class:`~dataorder.grads.PerExampleGrads` (the same
    check): ``None`` (all trainable), a list of names, or a predicate ``(name, param) -> bool``.

    A forward that is never backpropagated (evaluation without ``torch.no_grad()``) costs no
    memory past its graph's life: a call's record is held by the hook on its output's graph
    until its gradient arrives, so dropping the graph drops the record and its inputs.
    ``keep_outputs=True`` also keeps each call's output, for :meth:`pending_outputs` (and
    keeps every recorded forward's graph until :meth:`collect`).

    Tied weights (one parameter used by several modules, e.g. GPT-2's token embedding and
    output head) get the sum of their uses' gradients: exact on :meth:`collect` (which then
    holds ``B × |param|`` values for that parameter), a sum of sketches on
    :meth:`collect_sketch`. A module whose input is shared by the whole batch (positions of
    shape ``(1, T)``, or ``arange(T)`` made inside ``forward``) has no per-example gradient
    at its hooks: its parameters are left out, with a one-time warning naming it; this is
    decided before the first collect, and no module is newly left out after it. BatchNorm
    using batch statistics, and a module with selected parameters that returns a tuple
    (``nn.LSTM``), are refused (:class:`~dataorder.ghost.UnsupportedLayerError`).

    Example::

        >>> model = nn.Linear(3, 2)
        >>> ghost = GhostGrads(model)
        >>> model(torch.randn(4, 3)).pow(2).mean().backward()
        >>> [batch] = ghost.collect(); batch.gram().shape
        torch.Size([4, 4])
        >>> ghost.remove()
        >>> sketched = GhostGrads(nn.Linear(100, 50), sketch=8)
        >>> sketched.model(torch.randn(4, 100)).pow(2).mean().backward()
        >>> [rows] = sketched.collect_sketch(); rows.shape    # 8 × 8 weight values + 50 bias values
        torch.Size([4, 114])
        >>> dense = GhostGrads(nn.Linear(3, 2), dense=True)  # the exact rows, built in the backward
        >>> dense.model(torch.randn(4, 3)).pow(2).mean().backward()
        >>> [rows] = dense.collect_sketch(); rows.shape      # 2 × 3 weight values + 2 bias values
        torch.Size([4, 8])
    """

    def __init__(self, model: nn.Module, *, params=None, sketch: int | None = None, seed: int = 0,
                 keep_outputs: bool = False, dense: bool = False) -> None:
        self.sketch = _check_sketch(sketch)
        for flag, value in (("keep_outputs", keep_outputs), ("dense", dense)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
        if dense and (self.sketch is not None or keep_outputs):
            raise ValueError("dense=True builds the exact rows during the backward: it takes neither sketch=k "
                             "nor keep_outputs=True")
        self.keep_outputs, self.dense = keep_outputs, dense
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {seed!r}")
        check_no_batch_statistics(model)
        selected = set(select_parameters(model, params))
        self.model, self.seed = model, int(seed)
        named = dict(model.named_parameters())  # one name per tensor: the first module that owns it
        self.names = [name for name in named if name in selected]
        self.shapes = {name: named[name].shape for name in self.names}
        side = EXACT_SIDE if dense else self.sketch
        self._sketcher = Sketcher(side, self.seed) if side is not None else None
        owners = _direct_owners(model, {id(p): name for name, p in named.items() if name in selected})
        self._forward_count = 0
        self._forward_input: tuple[int | None, int | None] = (None, None)  # this forward's (batch size, dim-1 length)
        self._root_called = False  # until then a forward starts at the first hooked call after a backward
        self._grad_arrived = False  # an output gradient arrived since this forward started
        self._collected = False  # a forward was collected: no module is newly left out from then on
        self._records: list[weakref.ref] = []  # exact-path calls in forward order; their graph's hook holds them
        self._held: list[_Record] = []  # the records with a gradient (with keep_outputs: all of them)
        self._warned: set[str] = set()
        self._excluded: set[str] = set()  # modules left out: their input is shared by the batch
        self._left_out: set[str] = set()  # the parameters of those modules
        self._sketch_rows: dict[int, tuple[int, SketchRows]] = {}  # forward -> (batch size, rows), filled in backward
        self._batch_norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self._handles = [model.register_forward_pre_hook(self._count_forward, with_kwargs=True)]
        self.hooked: list[nn.Module] = []  # the modules whose calls are captured
        self._owned = owners  # module name -> {local name: full name} of the selected parameters it uses
        for module_name, module in model.named_modules():
            names = owners.get(module_name, {})
            if names:
                self._handles.append(module.register_forward_hook(self._make_hook(module_name, names)))
                self.hooked.append(module)
        uses = [full for names in owners.values() for full in names.values()]
        self.tied = {name for name in uses if uses.count(name) > 1}  # used by several modules

    def _count_forward(self, module, args, kwargs) -> None:
        self._refuse_batch_statistics()
        if not torch.is_grad_enabled():
            return  # nothing is recorded under torch.no_grad()
        self._root_called = True
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        self._start_forward(*_input_shape(first))

    def _start_forward(self, size: int | None, length: int | None) -> None:
        """Number a new forward, whose input has ``size`` examples and dim-1 ``length`` (None: unknown)."""
        self._forward_count += 1
        self._forward_input, self._grad_arrived = (size, length), False
        if len(self._records) > 4 * len(self._held) + 256:  # forwards with no backward: forget their dead records
            self._records = [ref for ref in self._records if ref() is not None]

    def _refuse_batch_statistics(self) -> None:
        if any(m.training for m in self._batch_norms):
            check_no_batch_statistics(self.model)  # switched to train mode after construction

    def _make_hook(self, module_name: str, names: dict[str, str]):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor):
                _refuse_non_tensor_output(module_name, module, output)
                return
            if not output.requires_grad or _inside_functorch(output):
                return  # nothing to capture, or a torch.func transform (e.g. PerExampleGrads) runs the model
            tensors = tuple(t.detach() for t in inputs if isinstance(t, Tensor))
            if not tensors:
                raise UnsupportedLayerError(f"{type(module).__name__} '{module_name}' was called without a "
                                            "positional tensor input: the ghost hooks cannot see its input; "
                                            "pass it positionally or leave its parameters out with params=")
            if not self._root_called and (self._forward_count == 0 or self._grad_arrived):
                # the model itself is never called: a backward ended the last forward, this call starts one
                self._refuse_batch_statistics()
                self._start_forward(*_input_shape(tensors[0]))  # its input stands in for the model's
            size, length = self._forward_input
            batch_size = _input_shape(tensors[0])[0] if size is None else size
            tensors += saved_statistics(module, output)
            if rule_for(module) is None and module_name not in self._warned:
                self._warned.add(module_name)
                warnings.warn(f"ghost balancing has no exact rule for {type(module).__name__} "
                              f"('{module_name}'): using torch.func per-example gradients for this module only "
                              "(dataorder.register_ghost_rule adds one)", stacklevel=2)
            if self._sketcher is None:
                record = _Record(self._forward_count, batch_size, length, module_name, module, names, tensors,
                                 output if self.keep_outputs else None)
                self._records.append(weakref.ref(record))
                if self.keep_outputs:
                    self._held.append(record)
                output.register_hook(functools.partial(self._add_grad, record))  # the graph holds the record
                return
            # sketched: the call is reduced to its sketch as soon as its output gradient arrives
            record = _Record(self._forward_count, batch_size, length, module_name, module, names, tensors, None)
            if not self._left_out_if_shared(record):
                output.register_hook(functools.partial(self._sketch_call, record))
        return hook

    def _sketch_call(self, record: _Record, grad: Tensor) -> None:
        """Add one module call's sketched per-example gradients to its forward's rows (in the backward).

        The call's inputs are let go of here, when autograd lets go of its own saved copy: held
        until the end of the backward, they would raise the step's peak memory (and on the CPU,
        with glibc's default malloc, have those pages faulted in afresh at every step).
        """
        self._grad_arrived = True
        if record.inputs is None:
            self._sketch_rows.pop(record.forward, None)
            raise RepeatedBackwardError(
                f"the output gradient of {type(record.module).__name__} '{record.module_name}' arrived twice for one "
                "forward (a second backward with retain_graph=True?): sketch=k sketches each forward once, so this "
                "forward's rows were dropped; run the forward and a single backward again, then step() "
                "(or use the exact path, sketch=None)")
        try:
            if torch.is_grad_enabled():  # a backward with create_graph=True
                with torch.no_grad():
                    self._add_sketch(record, grad)
            else:
                self._add_sketch(record, grad)
        finally:
            if not self.dense:  # dense rows keep them with the graph: a second backward adds to the rows
                record.inputs = None

    def _add_sketch(self, record: _Record, grad: Tensor) -> None:
        """Add one call's sketch to its forward's rows (run with grad mode off)."""
        if record.forward not in self._sketch_rows:
            rows = self._sketcher.new_rows(self.names, self.shapes, grad.shape[0], grad.device)
            self._sketch_rows[record.forward] = (record.batch_size, rows)
        rows = self._sketch_rows[record.forward][1]
        rule = rule_for(record.module)
        if rule is linear_rule:  # the common case, without building factor objects
            # bf16 under autocast stays bf16 here: add_linear converts what it uses, as it uses it
            self._sketcher.add_linear(rows, record.names.get("weight"), record.names.get("bias"),
                                      record.inputs[0], grad.detach(), record.module.weight.shape)
            return
        delta = grad.detach().float()
        for factors in _apply_rule(record, record.names, delta, self.shapes):
            self._sketcher.add(rows, factors, self.shapes)

    def _add_grad(self, record: _Record, grad: Tensor) -> None:
        self._grad_arrived = True
        if record.grad is None and not self.keep_outputs:
            self._held.append(record)  # kept past its graph from here on, until collect()
        record.add_grad(grad)

    def pending_outputs(self) -> list[Tensor]:
        """Outputs of the recorded module calls still waiting for their gradient (needs ``keep_outputs=True``).

        ``torch.autograd.grad(loss, ghost.pending_outputs())`` fills the records without
        computing any parameter gradient (cheaper than a full backward when only the
        products are wanted, as for gradient norms).

        >>> model = nn.Linear(3, 2)
        >>> ghost = GhostGrads(model, keep_outputs=True)
        >>> loss = model(torch.randn(4, 3)).square().mean()
        >>> _ = torch.autograd.grad(loss, ghost.pending_outputs())
        >>> [batch] = ghost.collect(); batch.sq_norms().shape, model.weight.grad is None
        (torch.Size([4]), True)
        """
        if self._sketcher is None and not self.keep_outputs:
            raise ValueError("pending_outputs() needs GhostGrads(model, keep_outputs=True): without it the records "
                             "keep no outputs, so that a forward with no backward frees its graph")
        return [record.output for record in self._live_records() if record.grad is None]

    def _live_records(self) -> list[_Record]:
        return [record for record in (ref() for ref in self._records) if record is not None]

    def collect(self) -> list[GhostBatch]:
        """One :class:`GhostBatch` per model forward followed by a backward; clears the records."""
        if self._sketcher is not None:
            raise ValueError("GhostGrads(model, sketch=k) and GhostGrads(model, dense=True) build rows during the "
                             "backward and keep no factors: use collect_sketch(), or construct GhostGrads(model) for "
                             "collect()")
        out = []
        for batch_size, factors, names in self._groups():
            shapes = {name: self.shapes[name] for name in names}
            out.append(GhostBatch(factors, names, batch_size, shapes, scale=batch_size))
        self._collected = self._collected or bool(out)
        return out

    def collect_sketch(self) -> list[Tensor]:
        """Per-example sketch rows: one float32 ``(B_i, D)`` tensor per batch :meth:`collect` would give.

        ``D`` is the sum over the balanced parameters, in ``names`` order, of at most
        ``k × k`` values each (:func:`~dataorder.ghost.sketch.sketch_width`); with ``k`` at
        least every side of every weight the rows are the exact per-example gradients.
        Clears the records.

        The sketch is linear in the gradient, so each layer call is added to its batch's rows
        as soon as its output gradient arrives: nothing but the rows is kept until this call.

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> sketched, exact = GhostGrads(model, sketch=4), GhostGrads(model)
        >>> model(torch.randn(5, 3)).square().mean().backward()
        >>> [rows], [batch] = sketched.collect_sketch(), exact.collect()
        >>> torch.allclose(rows, batch.materialize())    # k = 4 covers every side: nothing is projected
        True
        """
        if self._sketcher is None:
            raise ValueError("collect_sketch() needs rows built in the backward: construct GhostGrads(model, "
                             "sketch=k), or GhostGrads(model, dense=True) for exact rows")
        pending, self._sketch_rows = self._sketch_rows, {}
        names = [name for name in self.names if name not in self._left_out]
        out = []
        for forward, (batch_size, rows) in sorted(pending.items()):
            _check_not_empty(batch_size)
            self._check_covered(names, rows.written)
            out.append(rows.columns(names).mul_(batch_size))  # the loss is a mean over the batch
        self._collected = self._collected or bool(out)
        return out

    def _groups(self):
        """``(batch size, factors, balanced names)`` per captured forward with a backward; clears the records."""
        records, self._records, self._held = self._live_records(), [], []
        groups: dict[int, list[_Record]] = {}
        for record in records:
            record.output = None
            if record.grad is not None:  # a forward with no backward (e.g. evaluation) is skipped
                groups.setdefault(record.forward, []).append(record)
        return [self._factors(group) for _, group in sorted(groups.items())]

    def _left_out_if_shared(self, record: _Record) -> bool:
        """Whether the module is left out because its input is shared by the batch (warned once per module).

        Decided by the forwards before the first collect: from then on a module's input is
        taken as per-example (a class-label embedding fed ``[0, 1]`` is no position table).
        """
        if record.module_name in self._excluded:
            return True
        if self._collected or not _shares_input(record):
            return False
        self._excluded.add(record.module_name)
        self._left_out.update(record.names.values())
        warnings.warn(
            f"{type(record.module).__name__} '{record.module_name}' got an input of shape "
            f"{tuple(record.inputs[0].shape)} shared by the whole batch (of {record.batch_size}), e.g. positions: "
            "it has no per-example gradient, so its parameters are left out of the balance", stacklevel=4)
        return True

    def _check_covered(self, names: list[str], covered: set[str]) -> None:
        """Every balanced parameter got a gradient in this forward, and one is left to balance."""
        missing = [name for name in names if name not in covered]
        if missing:
            raise RuntimeError(f"no gradient was captured for {missing} in this forward: every selected parameter "
                               "must be used through its own module in every forward (not skipped by a branch, "
                               "not used by a functional call); leave such parameters out with params=")
        if not names:
            raise ValueError("every selected parameter belongs to a module whose input is shared by the batch: "
                             "nothing is left to balance; select other parameters with params=")

    def _factors(self, group: list[_Record]):
        batch_size = group[0].batch_size
        _check_not_empty(batch_size)
        for record in group:
            self._left_out_if_shared(record)
        left_out = {name for record in group if record.module_name in self._excluded
                    for name in record.names.values()}
        by_call: dict[tuple, list] = {}  # (module, parameters, part of the rule's output) -> one per call
        for record in group:
            if record.module_name in self._excluded:
                continue
            names = {local: full for local, full in record.names.items() if full not in left_out}
            for subset in _split_tied(names, self.tied):
                for part, made in enumerate(_apply_rule(record, subset, record.grad.float(), self.shapes)):
                    key = (id(record.module), tuple(sorted(subset.values())), part)
                    by_call.setdefault(key, []).append(made)
        factors, tied_uses = [], {}
        for (_, key_names, _), calls in by_call.items():
            merged = _merge_calls(calls)
            if len(key_names) == 1 and key_names[0] in self.tied:
                tied_uses.setdefault(key_names[0], []).append(merged)
            else:
                factors.append(merged)
        factors += [uses[0] if len(uses) == 1 else TiedFactors(name, uses) for name, uses in tied_uses.items()]
        names = [name for name in self.names if name not in left_out]
        self._check_covered(names, {name for record in group for name in record.names.values()})
        return batch_size, factors, names

    @property
    def left_out(self) -> list[str]:
        """The selected parameters left out of the balance so far (their module's input was shared by the batch)."""
        return [name for name in self.names if name in self._left_out]

    def settle(self, left_out: list[str]) -> None:
        """Leave out exactly the parameters ``left_out`` (a resumed run's), and no other module from now on.

        A run resumed on a batch whose shape cannot tell positions from examples (``B = 1``)
        then balances the parameters the saved run balanced.

        >>> model = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
        >>> ghost = GhostGrads(model)
        >>> ghost.settle(["b.weight", "b.bias"]); ghost.left_out
        ['b.weight', 'b.bias']
        """
        wanted = set(left_out)
        unknown = sorted(wanted - set(self.names))
        if unknown:
            raise ValueError(f"left_out names {unknown}, which are not parameters this GhostGrads balances")
        modules = {module for module, names in self._owned.items() if wanted & set(names.values())}
        self._excluded = modules
        self._left_out = {name for module in modules for name in self._owned[module].values()}
        self._collected = True

    def discard(self) -> None:
        """Forget what the backwards since the last collect captured (the hooks stay).

        >>> model = nn.Linear(3, 2)
        >>> ghost = GhostGrads(model)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> ghost.discard(); ghost.collect()
        []
        """
        self._records, self._held, self._sketch_rows = [], [], {}

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._records, self._held, self._sketch_rows = [], [], [], {}


def _direct_owners(model: nn.Module, selected: dict[int, str]) -> dict[str, dict[str, str]]:
    """``module name -> {local name: full name}`` of the selected parameters each module uses itself.

    A parameter registered on a module and on one of its descendants (HF's
    ``BertLMPredictionHead.bias``, also ``decoder.bias``) is used by the descendant: the
    ancestor's registration is not a second use.
    """
    registered: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) in selected:
                registered.setdefault(id(p), []).append((module_name, local))
    owners: dict[str, dict[str, str]] = {}
    for key, places in registered.items():
        modules = [name for name, _ in places]
        for module_name, local in places:
            prefix = f"{module_name}." if module_name else ""
            if not any(other != module_name and other.startswith(prefix) for other in modules):
                owners.setdefault(module_name, {})[local] = selected[key]
    return owners


def _check_sketch(sketch) -> int | None:
    if sketch is None:
        return None
    if isinstance(sketch, bool) or not isinstance(sketch, numbers.Integral):
        raise TypeError(f"sketch must be None (exact) or a positive int k (values per side), got {sketch!r}")
    if sketch < 1:
        raise ValueError(f"sketch must be a positive int k (values per side), got {sketch}")
    return int(sketch)


def _shares_input(record: _Record) -> bool:
    """Whether the module's input is one tensor for the whole batch rather than one slice per example.

    Detected: a leading dim other than the batch size (``(1, T)`` positions, ``arange(T)``
    with ``T != B``), and an embedding indexed by ``arange(T)``, ``T`` being the length of the
    model input's dim 1 (the case ``T == B``). Not detectable from shapes: a shared tensor of
    exactly the batch's shape, e.g. ``arange(B)`` fed to a ``Linear``.
    """
    x, batch_size = record.inputs[0], record.batch_size
    if x.dim() == 0 or x.shape[0] != batch_size:
        return True
    if isinstance(record.module, nn.Embedding) and x.dim() == 1 and len(x) == record.length and batch_size > 1:
        return bool(torch.equal(x, torch.arange(len(x), device=x.device, dtype=x.dtype)))
    return False


def _input_shape(tensor: Tensor | None) -> tuple[int | None, int | None]:
    """``(batch size, dim-1 length)`` of a forward's input tensor, None where it has no such dim."""
    if tensor is None:
        return None, None
    return (tensor.shape[0] if tensor.dim() else None), (tensor.shape[1] if tensor.dim() >= 2 else None)


def _check_not_empty(batch_size: int) -> None:
    if batch_size == 0:
        raise ValueError("an empty batch (0 examples) was backpropagated: it has no per-example gradient to "
                         "balance; skip it (no forward and backward on an empty batch)")


def _refuse_non_tensor_output(module_name: str, module: nn.Module, output) -> None:
    """Raise for a hooked module returning a tuple (or list): no single output gradient to capture."""
    leaves = _tensors_in(output)
    if not any(t.requires_grad for t in leaves) or any(_inside_functorch(t) for t in leaves):
        return
    raise UnsupportedLayerError(
        f"{type(module).__name__} '{module_name}' returns a {type(output).__name__}, not one tensor: the ghost "
        "hooks cannot capture its output gradient; leave its parameters out with params=, or balance from "
        "materialised rows with step(PerExampleGrads(...).grads)")


def _tensors_in(output) -> list:
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors_in(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors_in(item)]
    return [output] if isinstance(output, Tensor) else []


def _split_tied(names: dict[str, str], tied: set[str]) -> list[dict[str, str]]:
    """The module's parameters as the rule is asked for them: each tied one alone, the rest together."""
    rest = {local: full for local, full in names.items() if full not in tied}
    alone = [{local: full} for local, full in names.items() if full in tied]
    return ([rest] if rest else []) + alone


def _apply_rule(record: _Record, names: dict[str, str], delta: Tensor, shapes: dict[str, torch.Size]) -> list:
    """The rule's factors of one call; ``delta`` is its float32 output gradient, unscaled (the
    per-example scale, the batch size, is applied by the consumer)."""
    floats = tuple(t.float() if t.is_floating_point() else t for t in record.inputs)
    rule = rule_for(record.module) or fallback_rule
    made = rule(record.module, names, floats, delta)
    where = f"{type(record.module).__name__} '{record.module_name}'"
    return check_rule_output(rule, where, names, made, delta.shape[0], shapes)


def _inside_functorch(tensor: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check and check(tensor))


class _Record:
    """One forward call of one module: its inputs and (after backward) its output gradient."""

    def __init__(self, forward: int, batch_size: int | None, length: int | None, module_name: str, module: nn.Module,
                 names: dict[str, str], inputs: tuple, output: Tensor) -> None:
        self.forward, self.module_name, self.module, self.names = forward, module_name, module, names
        self.batch_size, self.length = batch_size, length  # the model input's dim 0 and dim 1 in its forward
        self.inputs, self.output = inputs, output
        self.grad: Tensor | None = None

    def add_grad(self, grad: Tensor) -> None:
        self.grad = grad.detach() if self.grad is None else self.grad + grad.detach()


def _merge_calls(calls: list):
    """Factors of one rule output over several calls in one forward: its gradient is the sum."""
    if len(calls) == 1:
        return calls[0]
    first = calls[0]
    if isinstance(first, LinearFactors):  # convolutions too: their patches are rows like any others
        return LinearFactors(first.weight, first.bias, torch.cat([c.a for c in calls], dim=1),
                             torch.cat([c.d for c in calls], dim=1), first.weight_shape)
    if isinstance(first, EmbeddingFactors):
        return EmbeddingFactors(first.weight, torch.cat([c.idx for c in calls], dim=1),
                                torch.cat([c.d for c in calls], dim=1), first.num_embeddings)
    if isinstance(first, DenseFactors):
        return DenseFactors({name: sum(c.grads[name] for c in calls) for name in first.grads})
    return DenseFactors({name: sum(c.materialize()[name] for c in calls) for name in first.materialize()})
