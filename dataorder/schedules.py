"""Mixture weights over training progress, their per-batch allocation, and curriculum pacing.

A :class:`Schedule` gives the weight of each data source at every point ``p`` of a run
(``p`` = samples seen / samples in the run, from 0 to 1). It starts from base weights and
changes at *segments*: at progress ``at`` the weights move to new values, either at once
(``transition: step``) or over a span ``over`` (``linear`` or ``cosine``). Weights are
relative: every set is divided by its sum, and the division is reported in
:attr:`Schedule.notes`.

The YAML form (``Schedule.load`` / ``Schedule.save``; read with ``yaml.safe_load``)::

    sources: {web: 0.70, code: 0.15, math: 0.10, books: 0.05}   # starting weights
    schedule:                                                    # optional
      - {at: 0.85, weights: {web: 0.35, code: 0.30, math: 0.25, books: 0.10},
         transition: linear, over: 0.05}
    run: {num_samples: 1000000, batch_size: 1024, tokens_per_sample: 2048}   # optional

:func:`~dataorder.samplers.allocation.largest_remainder` and :class:`BatchCounts` turn weights into exact per-batch counts
(what :class:`~dataorder.samplers.mixture.MixtureSampler` draws); :func:`pacing_function`
gives the curriculum pacing functions of :class:`~dataorder.samplers.curriculum.CurriculumSampler`.
"""

from __future__ import annotations

import math
import numbers
import os
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataorder.samplers.allocation import largest_remainder

__all__ = [
    "MAX_SAMPLES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "PACINGS",
    "TRANSITIONS",
    "BatchCounts",
    "Schedule",
    "Segment",
    "check_run_value",
    "pacing_function",
]

TRANSITIONS = ("step", "linear", "cosine")
PACINGS = ("linear", "root", "geometric", "step")
_RUN_KEYS = ("num_samples", "batch_size", "tokens_per_sample")
#: Largest ``num_samples`` (batch offsets ``b * batch_size`` stay exact in int64).
MAX_SAMPLES = 2**62
#: Largest ``batch_size``: a batch's quotas ``batch_size * w`` are split in float64, exact well below 2**53.
MAX_BATCH = 2**40
#: Largest sum of one set of weights: far from float64 overflow, so normalising is exact enough.
MAX_WEIGHT_SUM = 1e300
_SEGMENT_KEYS = ("at", "weights", "transition", "over")


# -- validation helpers ---------------------------------------------------------------------
def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {what} must be a number, got {_short(value)}{_text_hint(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: {what} must be finite, got {value}")
    return value


def _text_hint(value: Any) -> str:
    return " (YAML reads 1e9 as text: write 1.0e+9 or 1_000_000_000)" if _looks_numeric(value) else ""


def _looks_numeric(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _weights(weights: Any, names: Sequence[str] | None, where: str) -> dict[str, float]:
    """Check one set of weights; ``names=None`` means it defines the sources."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{where}: weights must be a non-empty mapping source -> weight, got {_short(weights)}")
    bad_names = [key for key in weights if not isinstance(key, str) or not key]
    if bad_names:
        raise ValueError(f"{where}: source names must be non-empty strings, got {_short(bad_names)}")
    if names is not None:
        unknown = [key for key in weights if key not in names]
        if unknown:
            raise ValueError(f"{where}: unknown source {', '.join(map(_short, unknown[:5]))}; sources are "
                             f"{_short(', '.join(names))}")
        missing = [name for name in names if name not in weights]
        if missing:
            raise ValueError(f"{where}: no weight for {', '.join(missing)}; give every source a weight (0 turns it off)")
    checked = {}
    for key, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
            raise ValueError(f"{where}: weight of {_short(key)} must be a number, got {_short(value)}{_text_hint(value)}")
        if value < 0 or math.isinf(float(value)):
            raise ValueError(f"{where}: weight of {_short(key)} must be finite and >= 0, got {value}")
        checked[key] = float(value)
    total = sum(checked.values())
    if total <= 0:
        raise ValueError(f"{where}: all weights are zero; give at least one source a positive weight")
    if not math.isfinite(total) or total > MAX_WEIGHT_SUM:
        raise ValueError(f"{where}: the weights sum to {total:g}, too large to normalise exactly; scale them down "
                         "(only their ratios matter)")
    return checked if names is None else {name: checked[name] for name in names}


@dataclass(frozen=True)
class Segment:
    """A change of the weights at progress ``at``: at once (``step``) or over ``over`` (``linear``/``cosine``).

    >>> Segment(at=0.9, weights={"web": 1.0, "code": 1.0}, transition="linear", over=0.05).over
    0.05
    """

    at: float
    weights: Mapping[str, float]
    transition: str = "step"
    over: float = 0.0


# -- the schedule ---------------------------------------------------------------------------
class Schedule:
    """Mixture weights as a function of training progress ``p`` in [0, 1].

    ``sources`` maps each source name to its starting weight (the dict order is the
    sources' order everywhere); ``segments`` is a sequence of :class:`Segment` or dicts with
    keys ``at``, ``weights``, ``transition`` (``step`` | ``linear`` | ``cosine``, default
    ``step``) and ``over`` (span of a linear/cosine transition). ``run`` optionally records
    ``num_samples``, ``batch_size`` and ``tokens_per_sample`` of the run.

    Example (upsample code and math over the last 15% of a run)::

        >>> s = Schedule.anneal(base={"web": 0.8, "code": 0.1, "math": 0.1},
        ...                     final={"web": 0.4, "code": 0.3, "math": 0.3}, last=0.15)
        >>> s.weights_at(0.5)
        {'web': 0.8, 'code': 0.1, 'math': 0.1}
        >>> s.weights_at(0.9)
        {'web': 0.4, 'code': 0.3, 'math': 0.3}
        >>> ramp = Schedule({"a": 1, "b": 1}, [{"at": 0.5, "weights": {"a": 1, "b": 0},
        ...                                     "transition": "linear", "over": 0.2}])
        >>> ramp.weights_at(0.6)
        {'a': 0.75, 'b': 0.25}
    """

    def __init__(
        self,
        sources: Mapping[str, float],
        segments: Sequence[Segment | Mapping[str, Any]] = (),
        *,
        run: Mapping[str, Any] | None = None,
    ) -> None:
        self._build(sources, segments, run, lambda label: label)

    def _build(self, sources: Any, segments: Any, run: Any, where: Callable[[str], str]) -> None:
        base = _weights(sources, None, where("sources"))
        names = tuple(base)
        if isinstance(segments, (str, bytes, Mapping)) or not isinstance(segments, Sequence):
            raise ValueError(f"{where('schedule')}: must be a list of segments, got {type(segments).__name__}")
        checked: list[Segment] = []
        free_from = 0.0  # progress from which the next segment may start
        for i, raw in enumerate(segments):
            segment = _segment(raw, names, where(f"schedule[{i}]"), free_from)
            checked.append(segment)
            free_from = segment.at + segment.over
        self.names: tuple[str, ...] = names
        self.base: dict[str, float] = base
        self.segments: tuple[Segment, ...] = tuple(checked)
        self.run: dict[str, Any] = _run(run, where("run"))
        self.notes: tuple[str, ...] = tuple(
            _normalisation_note(weights, where(label))
            for label, weights in [("sources", base)] + [(f"schedule[{i}]", s.weights) for i, s in enumerate(checked)]
            if abs(sum(weights.values()) - 1.0) > 1e-9
        )
        self._phases = _phases(self)

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def constant(cls, weights: Mapping[str, float]) -> Schedule:
        """The same weights for the whole run.

        >>> Schedule.constant({"a": 3, "b": 1}).weights_at(0.7)
        {'a': 0.75, 'b': 0.25}
        """
        return cls(weights)

    @classmethod
    def anneal(
        cls,
        base: Mapping[str, float],
        final: Mapping[str, float],
        last: float = 0.15,
        *,
        transition: str = "step",
        over: float = 0.0,
    ) -> Schedule:
        """``base`` weights, then ``final`` weights over the ``last`` fraction of the run.

        The preset for end-of-training domain upsampling (Blakeney et al. 2024: upsampling
        domain data over the last 10-20% of pretraining). ``transition="linear"`` with
        ``over=...`` ramps into ``final`` instead of switching at once.

        >>> Schedule.anneal({"web": 1, "math": 0}, {"web": 1, "math": 1}, last=0.2).segments[0].at
        0.8
        """
        last = _number(last, "anneal", "last")
        if not 0.0 < last <= 1.0:
            raise ValueError(f"anneal: last must be a fraction of the run in (0, 1], got {last}")
        at = round(1.0 - last, 12)
        return cls(base, [Segment(at=at, weights=final, transition=transition, over=over)])

    @classmethod
    def from_yaml(cls, text: str, *, name: str = "<yaml>") -> Schedule:
        """Parse the YAML form (see the module docstring); errors name ``name`` and the line.

        Errors are one line. Documents whose alias expansion or nesting is unreasonable for a
        schedule (more than :data:`MAX_YAML_NODES` nodes once aliases are expanded, deeper
        than :data:`MAX_YAML_DEPTH`) and mappings with a duplicate key are refused before
        anything is built.

        >>> Schedule.from_yaml("sources: {a: 1, b: 3}").weights_at(0.0)
        {'a': 0.25, 'b': 0.75}
        >>> Schedule.from_yaml("sources: {a: 1, a: 3}")
        Traceback (most recent call last):
        ...
        ValueError: <yaml> line 1: duplicate key 'a'; each key may appear once
        """
        root = _compose(text, name)
        _check_yaml_graph(root, name)
        data = _construct(root, text, name) if root is not None else None
        lines = _yaml_lines(root)

        def where(label: str) -> str:
            line = lines.get(label.split("[")[0] if label not in lines else label)
            return f"{name} line {line} ({label})" if line else f"{name} ({label})"

        if not isinstance(data, Mapping):
            raise ValueError(f"{name}: expected a mapping with keys sources, schedule, run; got {type(data).__name__}")
        unknown = [key for key in data if key not in ("sources", "schedule", "run")]
        if unknown:
            raise ValueError(f"{where(str(unknown[0]))}: unknown key {_short(unknown[0])}; allowed keys are sources, "
                             "schedule, run")
        if "sources" not in data:
            raise ValueError(f"{name}: missing 'sources' (the starting weight of every source)")
        schedule = cls.__new__(cls)
        schedule._build(data["sources"], data.get("schedule") or [], data.get("run"), where)
        return schedule

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read a YAML schedule file.

        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "mix.yaml"
        >>> Schedule.constant({"a": 1.0}).save(path)
        >>> Schedule.load(path) == Schedule.constant({"a": 1.0})
        True
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no schedule file at {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not a text file (byte {error.start} is not UTF-8); a schedule is YAML "
                             "text") from None
        except OSError as error:
            raise type(error)(f"cannot read the schedule file {path}: {error.strerror or error}") from None
        return cls.from_yaml(text, name=str(path))

    # -- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The YAML structure as plain Python types (weights as given, not normalised)."""
        data: dict[str, Any] = {"sources": dict(self.base)}
        if self.segments:
            data["schedule"] = [
                {"at": s.at, "weights": dict(s.weights), "transition": s.transition}
                | ({"over": s.over} if s.over else {})
                for s in self.segments
            ]
        if self.run:
            data["run"] = dict(self.run)
        return data

    def to_yaml(self) -> str:
        """The YAML form; ``Schedule.from_yaml(s.to_yaml()) == s``.

        >>> print(Schedule.constant({"a": 1.0, "b": 2.0}).to_yaml().strip())
        sources: {a: 1.0, b: 2.0}
        """
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_yaml` to ``path``."""
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    # -- evaluation ------------------------------------------------------------------------
    def weights(self, progress: float | np.ndarray) -> np.ndarray:
        """Normalised weights at ``progress``: shape ``(S,)`` for a float, ``(m, S)`` for ``m`` values.

        >>> Schedule.constant({"a": 1, "b": 3}).weights(np.array([0.0, 1.0])).tolist()
        [[0.25, 0.75], [0.25, 0.75]]
        """
        p = np.asarray(progress, dtype=np.float64)
        if np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
            raise ValueError(f"progress must be in [0, 1], got {progress!r}; progress = samples seen / samples in the run")
        return _evaluate(self._phases, p)

    def weights_at(self, progress: float) -> dict[str, float]:
        """The weights at ``progress`` as a dict (rounded to 12 digits, for display and logs)."""
        return {name: round(float(w), 12) for name, w in zip(self.names, self.weights(float(progress)))}

    def at_step(self, step: int, total_steps: int) -> dict[str, float]:
        """The weights at optimizer step ``step`` of ``total_steps`` (progress ``step / total_steps``).

        >>> Schedule.anneal({"a": 1, "b": 0}, {"a": 0, "b": 1}, last=0.5).at_step(60, 100)
        {'a': 0.0, 'b': 1.0}
        """
        return self.weights_at(_fraction(step, total_steps, "step", "total_steps"))

    def at_tokens(self, tokens: int, total_tokens: int) -> dict[str, float]:
        """The weights after ``tokens`` of ``total_tokens`` training tokens."""
        return self.weights_at(_fraction(tokens, total_tokens, "tokens", "total_tokens"))

    @property
    def breakpoints(self) -> tuple[float, ...]:
        """Progress values where the weights start or stop changing, with 0 and 1.

        >>> Schedule.anneal({"a": 1}, {"a": 1}, last=0.2, transition="linear", over=0.1).breakpoints
        (0.0, 0.8, 0.9, 1.0)
        """
        points = {0.0, 1.0} | {s.at for s in self.segments} | {s.at + s.over for s in self.segments}
        return tuple(sorted(round(p, 12) for p in points))

    def mean_weights(self) -> dict[str, float]:
        """The average mixture over the run (the integral of the weights over ``p``).

        >>> Schedule.anneal({"a": 1, "b": 0}, {"a": 0, "b": 1}, last=0.25).mean_weights()
        {'a': 0.75, 'b': 0.25}
        """
        ph = self._phases
        mean = ((ph.ends - ph.starts)[:, None] * (ph.anchors[ph.src] + ph.anchors[ph.dst]) / 2).sum(axis=0)
        return {name: round(float(w), 12) for name, w in zip(self.names, mean)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self.names == other.names and self.to_dict() == other.to_dict()  # the sources' order matters too

    def __repr__(self) -> str:
        return f"Schedule(sources={self.base!r}, segments={len(self.segments)}, run={self.run!r})"


def _segment(raw: Any, names: tuple[str, ...], where: str, free_from: float) -> Segment:
    if isinstance(raw, Segment):
        raw = {"at": raw.at, "weights": raw.weights, "transition": raw.transition, "over": raw.over}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a segment must be a mapping with keys at, weights[, transition, over], got "
                         f"{_short(raw)}")
    unknown = [key for key in raw if key not in _SEGMENT_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {_short(unknown[0])}; a segment has keys {', '.join(_SEGMENT_KEYS)}")
    for key in ("at", "weights"):
        if key not in raw:
            raise ValueError(f"{where}: missing {key!r}")
    at = _number(raw["at"], where, "at")
    if not 0.0 <= at <= 1.0:
        raise ValueError(f"{where}: at={at} is outside [0, 1]; at is the fraction of the run where the change starts")
    if at < free_from - 1e-12:
        raise ValueError(
            f"{where}: at={at} is out of order: the previous segment runs until {round(free_from, 12)}; "
            "list segments by increasing at, without overlapping transitions"
        )
    transition = raw.get("transition", "step")
    if transition not in TRANSITIONS:
        raise ValueError(f"{where}: transition must be one of {', '.join(TRANSITIONS)}, got {_short(transition)}")
    over = _number(raw.get("over", 0.0), where, "over")
    if transition == "step" and over != 0.0:
        raise ValueError(f"{where}: a step transition happens at once; drop over={over} or use transition: linear")
    if transition != "step" and over <= 0.0:
        raise ValueError(f"{where}: a {transition} transition needs over > 0 (its span as a fraction of the run)")
    if at + over > 1.0 + 1e-12:
        raise ValueError(f"{where}: the transition ends at {at + over:g} > 1; start it earlier or shorten over")
    return Segment(at=at, weights=_weights(raw["weights"], names, where), transition=transition, over=over)


def _run(run: Any, where: str) -> dict[str, Any]:
    if run is None:
        return {}
    if not isinstance(run, Mapping):
        raise ValueError(f"{where}: must be a mapping with keys {', '.join(_RUN_KEYS)}")
    checked: dict[str, Any] = {}
    for key, value in run.items():
        if key not in _RUN_KEYS:
            raise ValueError(f"{where}: unknown key {_short(key)}; allowed keys are {', '.join(_RUN_KEYS)}")
        checked[key] = check_run_value(key, value, where)
    return checked


def check_run_value(key: str, value: Any, where: str) -> int | float:
    """A ``run:`` value checked: ``num_samples`` an int in ``[1, 2**62]``, ``batch_size`` in ``[1, 2**40]``,
    ``tokens_per_sample`` a number in ``(0, 2**62]``.

    >>> check_run_value("num_samples", 1.0e+12, "run")
    1000000000000
    >>> check_run_value("num_samples", 2**70, "run")
    Traceback (most recent call last):
    ...
    ValueError: run: num_samples must be a positive int <= 2**62, got 1180591620717411303424
    """
    if key == "tokens_per_sample":
        number = _number(value, where, key)
        if not 0 < number <= MAX_SAMPLES:  # (bounded like the counts: samples x tokens stays finite)
            raise ValueError(f"{where}: tokens_per_sample must be a positive number <= 2**62, got {_short(value)}")
        return int(number) if number == int(number) else number
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _number(value, where, key)  # the error, with its hint for 1e9 written as text
    if isinstance(value, numbers.Integral):
        integer = int(value)
    else:
        number = _number(value, where, key)
        if number != int(number):
            raise ValueError(f"{where}: {key} must be a positive int, got {_short(value)}")
        integer = int(number)
    top, words = (MAX_BATCH, "2**40") if key == "batch_size" else (MAX_SAMPLES, "2**62")
    if not 1 <= integer <= top:
        raise ValueError(f"{where}: {key} must be a positive int <= {words}, got {_short(integer)}")
    return integer


def _normalisation_note(weights: Mapping[str, float], where: str) -> str:
    total = sum(weights.values())
    shares = ", ".join(f"{name} {w / total:.4g}" for name, w in weights.items())
    return f"{where}: weights sum to {total:.6g}; normalised to {shares}"


def _fraction(value: Any, total: Any, name: str, total_name: str) -> float:
    total = _number(total, total_name, total_name)
    value = _number(value, name, name)
    if total <= 0:
        raise ValueError(f"{total_name} must be > 0, got {total}")
    if not 0 <= value <= total:
        raise ValueError(f"{name} must be in [0, {total_name}={total:g}], got {value:g}")
    return value / total


#: Most nodes a schedule document may hold once its aliases are expanded (a schedule with
#: a thousand segments of ten sources has about 30,000).
MAX_YAML_NODES = 200_000
#: Deepest nesting a schedule document may have (a schedule needs 5 levels).
MAX_YAML_DEPTH = 64


def _compose(text: str, name: str) -> Any:
    """The document's node graph; malformed YAML is one line naming the line."""
    import yaml

    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise _yaml_error(error, name) from None
    except RecursionError:
        raise ValueError(f"{name}: nested too deeply for a schedule (at most {MAX_YAML_DEPTH} levels)") from None


def _construct(root: Any, text: str, name: str) -> Any:
    """Python values of the checked node graph (safe tags only)."""
    import yaml

    try:
        return yaml.SafeLoader(text).construct_document(root)
    except yaml.YAMLError as error:
        raise _yaml_error(error, name) from None


def _yaml_error(error: Exception, name: str) -> ValueError:
    import yaml

    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(error.problem or error.context or "malformed").split())
        return ValueError(f"{name}{line}: not valid YAML: {problem[:200]}")
    return ValueError(f"{name}: not valid YAML: {' '.join(str(error).split())[:200]}")


def _check_yaml_graph(root: Any, name: str) -> None:
    """Refuse cycles, alias bombs, deep nesting and duplicate keys, walking each node once."""
    import yaml

    if root is None:
        return
    size: dict[int, int] = {}  # node id -> nodes it expands to (aliases counted each time they are used)
    depth: dict[int, int] = {id(root): 1}
    stack: list[tuple[Any, bool]] = [(root, False)]
    active: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            active.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in children)
            if size[key] > MAX_YAML_NODES:
                raise ValueError(f"{name}: the document expands to more than {MAX_YAML_NODES:,} nodes (aliases "
                                 "repeat their anchor's content); a schedule needs far fewer")
            continue
        if key in size:
            continue
        if depth[key] > MAX_YAML_DEPTH:
            raise ValueError(f"{name} line {node.start_mark.line + 1}: nested too deeply for a schedule (at most "
                             f"{MAX_YAML_DEPTH} levels)")
        if isinstance(node, yaml.MappingNode):
            _check_duplicate_keys(node, name)
        active.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in active:
                raise ValueError(f"{name} line {child.start_mark.line + 1}: a recursive alias (a node that contains "
                                 "itself); write the values out")
            if id(child) not in size:
                depth[id(child)] = max(depth.get(id(child), 0), depth[key] + 1)
                stack.append((child, False))


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_duplicate_keys(node: Any, name: str) -> None:
    import yaml

    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            identity = (key.tag, key.value)
            if identity in seen:
                raise ValueError(f"{name} line {key.start_mark.line + 1}: duplicate key {_short(key.value)}; each "
                                 "key may appear once")
            seen.add(identity)


def _yaml_lines(root: Any) -> dict[str, int]:
    """1-based line of each top-level key and of each ``schedule`` item."""
    import yaml

    lines: dict[str, int] = {}
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            lines[str(key.value)] = key.start_mark.line + 1
            if key.value == "schedule" and isinstance(value, yaml.SequenceNode):
                for i, item in enumerate(value.value):
                    lines[f"schedule[{i}]"] = item.start_mark.line + 1
    return lines


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = 6
_REPR.maxlevel = 3


def _short(value: Any) -> str:
    """``repr(value)`` capped at a few dozen characters, without walking a huge value.

    >>> _short(list(range(1000)))
    '[0, 1, 2, 3, 4, 5, ...]'
    """
    return _REPR.repr(value)


# -- phases: the schedule as constant and transition pieces -----------------------------------
_KIND = {"const": 0, "linear": 1, "cosine": 2}


@dataclass(frozen=True)
class _Phases:
    """Pieces of [0, 1]: ``[starts, ends)`` moving from anchor row ``src`` to ``dst`` (``kind``)."""

    starts: np.ndarray
    ends: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    kind: np.ndarray
    anchors: np.ndarray  # normalised weights: the base row, then one row per segment


def _phases(schedule: Schedule) -> _Phases:
    """Split [0, 1] into constant pieces and transitions between anchor weight rows."""
    rows = [schedule.base] + [s.weights for s in schedule.segments]
    anchors = np.array([[w[name] for name in schedule.names] for w in rows], dtype=np.float64)
    anchors /= anchors.sum(axis=1, keepdims=True)
    pieces: list[tuple[float, float, int, int, int]] = []
    start, current = 0.0, 0
    for k, segment in enumerate(schedule.segments, start=1):
        pieces.append((start, segment.at, current, current, _KIND["const"]))
        if segment.transition != "step":
            pieces.append((segment.at, segment.at + segment.over, current, k, _KIND[segment.transition]))
        start, current = segment.at + segment.over, k
    pieces.append((start, 1.0, current, current, _KIND["const"]))
    pieces = [piece for piece in pieces if piece[1] > piece[0]] or [(0.0, 1.0, current, current, 0)]
    starts, ends, src, dst, kind = (np.array(column) for column in zip(*pieces))
    return _Phases(starts.astype(np.float64), ends.astype(np.float64), src.astype(np.int64),
                   dst.astype(np.int64), kind.astype(np.int64), anchors)


def _evaluate(phases: _Phases, p: np.ndarray) -> np.ndarray:
    """Weights at progress ``p`` (any shape) -> ``p.shape + (S,)``."""
    k = np.clip(np.searchsorted(phases.starts, p, side="right") - 1, 0, len(phases.starts) - 1)
    if k.size and k.min() == k.max():  # one phase: index it once (same arithmetic, less indexing)
        k = k.ravel()[0]
    kind = phases.kind[k]
    t = np.clip((p - phases.starts[k]) / (phases.ends[k] - phases.starts[k]), 0.0, 1.0)
    if np.any(kind == _KIND["cosine"]):
        t = np.where(kind == _KIND["cosine"], (1.0 - np.cos(np.pi * t)) / 2.0, t)
    t = np.where(kind == _KIND["const"], 0.0, t)[..., None]
    a, b = phases.anchors[phases.src[k]], phases.anchors[phases.dst[k]]
    return np.where(t == 0.0, a, (1.0 - t) * a + t * b)


# -- allocation: weights -> integer counts per batch ------------------------------------------
class RunCounts:
    """What every table of per-batch counts shares: a run of ``num_samples`` in global batches of
    ``batch_size`` (the last one partial if they do not divide), the partial batch, and the
    bounds of :meth:`cumulative`.

    A table says only :meth:`weights` (in force at each batch), :meth:`full_batch_counts`
    (the counts of a *full* batch there) and :meth:`cumulative_full` (counts before a batch
    ``b <= full_batches``); :class:`BatchCounts` and the adaptive mixture's weight history are two.

    >>> counts = BatchCounts(Schedule.constant({"a": 1, "b": 1}), num_samples=10, batch_size=4)
    >>> counts.num_batches, counts.batch(2).tolist(), counts.cumulative(3).tolist()
    (3, [1, 1], [5, 5])
    """

    def _set_run(self, num_samples: int, batch_size: int) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.full_batches = num_samples // batch_size
        self.last_size = num_samples % batch_size
        self.num_batches = self.full_batches + (self.last_size > 0)

    def batch(self, b: np.ndarray | int) -> np.ndarray:
        """Counts of batch(es) ``b``: ``(S,)`` or ``(m, S)``."""
        b = np.asarray(b, dtype=np.int64)
        counts = self.full_batch_counts(b)
        if self.last_size and np.any(b == self.full_batches):
            last = largest_remainder(self.last_size * self.weights(self.full_batches), self.last_size)
            counts = np.where((b == self.full_batches)[..., None], last, counts)
        return counts

    def cumulative(self, b: int) -> np.ndarray:
        """Counts of all batches before batch ``b`` (``0 <= b <= num_batches``)."""
        if not 0 <= b <= self.num_batches:
            raise ValueError(f"batch index must be in [0, {self.num_batches}], got {b}")
        if b > self.full_batches:
            return self.cumulative(self.full_batches) + self.batch(self.full_batches)
        return self.cumulative_full(b)

    def total(self) -> np.ndarray:
        """Counts over the whole run."""
        return self.cumulative(self.num_batches)


class BatchCounts(RunCounts):
    """Exact per-source counts of every global batch of a run following ``schedule``.

    Batch ``b`` holds ``batch_size`` samples (the last one ``num_samples % batch_size`` if
    that is not 0); its counts are :func:`largest_remainder` of ``batch_size`` times the
    weights at its progress ``b * batch_size / num_samples``.

    :meth:`cumulative` (counts of all batches before ``b``) costs O(1) per constant piece:
    its batches all have the same counts. Inside a transition (a linear or cosine ramp) the
    counts change only where a quota ``batch_size * w_s`` crosses an integer or two quotas'
    fractional parts cross (:func:`_ramp_change_points`): at most about ``S² · batch_size``
    places, however many samples the run has. Between them the counts are constant; each
    change is located exactly by bisection on the batch counts themselves, and the batches
    next to it are summed one by one. Short ramps (up to :attr:`BRUTE_FORCE` batches) are
    summed batch by batch, with a checkpoint every 4,096 batches. The table of cumulative
    counts holds one row per phase, and one per run of constant counts inside each ramp
    (built on the ramp's first use); a lookup costs a binary search plus at most 4,096
    batch evaluations.

    >>> counts = BatchCounts(Schedule.constant({"a": 0.75, "b": 0.25}), num_samples=10, batch_size=4)
    >>> counts.batch(0).tolist(), counts.batch(2).tolist(), counts.total().tolist()
    ([3, 1], [2, 0], [8, 2])
    >>> huge = Schedule.anneal({"a": 1, "b": 0}, {"a": 0, "b": 1}, last=0.5, transition="linear", over=0.5)
    >>> total = BatchCounts(huge, num_samples=10**18, batch_size=1024).total()   # milliseconds
    >>> int(total.sum()) == 10**18, abs(int(total[0]) - 75 * 10**16) < 10**6
    (True, True)
    """

    #: Ramps of at most this many batches are summed batch by batch.
    BRUTE_FORCE = 1 << 16
    #: Batches summed one by one on each side of a located change of the counts.
    GUARD = 64

    def __init__(self, schedule: Schedule, num_samples: int, batch_size: int) -> None:
        self.schedule = schedule
        self._set_run(check_run_value("num_samples", num_samples, "BatchCounts"),
                      check_run_value("batch_size", batch_size, "BatchCounts"))
        self._bounds: list[tuple[int, int, int]] | None = None  # (first batch, end batch, phase)
        self._sums: np.ndarray | None = None  # cumulative counts at each phase's first batch
        self._filled = 0  # phases whose cumulative counts are known
        self._ramps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}  # phase -> runs

    def progress(self, b: np.ndarray | int) -> np.ndarray:
        """Progress of batch ``b``: samples before it / samples in the run."""
        return np.asarray(b, dtype=np.int64) * self.batch_size / self.num_samples

    def weights(self, b: np.ndarray | int) -> np.ndarray:
        """The schedule's weights at each batch's progress."""
        return _evaluate(self.schedule._phases, self.progress(b))

    def full_batch_counts(self, b: np.ndarray | int) -> np.ndarray:
        """Counts of a full batch at batch(es) ``b``: the largest remainder of the weights."""
        return largest_remainder(self.batch_size * self.weights(b), self.batch_size)

    def cumulative_full(self, b: int) -> np.ndarray:
        """Counts of all batches before batch ``b <= full_batches`` (see the class doc)."""
        bounds = self._phase_bounds_cached()
        k = max(0, int(np.searchsorted([lo for lo, _, _ in bounds], b, side="right")) - 1) if bounds else 0
        if not bounds:
            return np.zeros(len(self.schedule.names), dtype=np.int64)
        lo, _, phase = bounds[k]
        return self._cumulative_at_knot(k) + self._phase_sum(lo, b, phase)

    # -- internals ---------------------------------------------------------------------------
    def _phase_bounds(self) -> list[tuple[int, int, int]]:
        """``(first batch, end batch, phase)`` of each phase that holds full batches."""
        phases = self.schedule._phases
        bounds = [self._first_batch_at(float(s)) for s in phases.starts] + [self.full_batches]
        return [(lo, hi, k) for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]

    def _first_batch_at(self, p: float) -> int:
        """Smallest full batch whose progress, as computed by :meth:`progress`, is >= ``p``."""
        b = min(self.full_batches, max(0, math.ceil(p * self.num_samples / self.batch_size)))
        while b > 0 and self.progress(b - 1) >= p:
            b -= 1
        while b < self.full_batches and self.progress(b) < p:
            b += 1
        return b

    def _phase_bounds_cached(self) -> list[tuple[int, int, int]]:
        if self._bounds is None:
            self._bounds = self._phase_bounds()
        return self._bounds

    def _cumulative_at_knot(self, k: int) -> np.ndarray:
        """Cumulative counts at the first batch of phase ``k`` (of :meth:`_phase_bounds`), summed on first use."""
        bounds = self._phase_bounds_cached()
        if self._sums is None:
            self._sums = np.zeros((len(bounds), len(self.schedule.names)), dtype=np.int64)
            self._filled = 1
        while self._filled <= k:
            i = self._filled
            lo, hi, phase = bounds[i - 1]
            self._sums[i] = self._sums[i - 1] + self._phase_sum(lo, hi, phase)
            self._filled += 1
        return self._sums[k]

    def _phase_sum(self, lo: int, b: int, phase: int) -> np.ndarray:
        """Counts of full batches ``[lo, b)``, where ``lo`` is the first batch of phase ``phase``."""
        if b <= lo:
            return np.zeros(len(self.schedule.names), dtype=np.int64)
        if self.schedule._phases.kind[phase] == _KIND["const"]:
            return self.batch(lo) * (b - lo)
        starts, rates, banded, prefix = self._ramp_table(phase)
        i = int(np.searchsorted(starts, b, side="right")) - 1
        if banded[i]:
            return prefix[i] + self._brute_sum(int(starts[i]), b)
        return prefix[i] + rates[i] * (b - int(starts[i]))

    def _ramp_table(self, phase: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The ramp as runs: ``(starts, counts per batch, banded, cumulative counts at each start)``.

        A run of constant counts has its counts per batch; a *banded* run (the batches next
        to a change, or a stretch summed batch by batch) is summed one batch at a time and
        is at most :attr:`GUARD` ``* 2`` (or 4,096) batches long. Built once per ramp.
        """
        if phase not in self._ramps:
            lo, hi = next((a, z) for a, z, k in self._phase_bounds_cached() if k == phase)
            points = None if hi - lo <= self.BRUTE_FORCE else self._change_points(phase, lo, hi)
            if points is None or len(points) * (2 * self.GUARD + 2) >= hi - lo:
                runs = [(a, None) for a in range(lo, hi, 4096)]
            else:
                runs = self._piecewise_runs(lo, hi, points)
            self._ramps[phase] = self._tabulate(runs, hi)
        return self._ramps[phase]

    def _tabulate(self, runs: list[tuple[int, np.ndarray | None]], hi: int):
        """Cumulative counts at each run's start (``None`` counts: a banded run)."""
        starts = np.array([a for a, _ in runs] + [hi], dtype=np.int64)
        size = len(self.schedule.names)
        rates = np.zeros((len(runs), size), dtype=np.int64)
        banded = np.array([rate is None for _, rate in runs], dtype=bool)
        sums = np.zeros((len(runs), size), dtype=np.int64)
        for i, (a, rate) in enumerate(runs):
            z = int(starts[i + 1])
            if rate is None:
                sums[i] = self._brute_sum(a, z)
            else:
                rates[i] = rate
                sums[i] = rate * (z - a)
        prefix = np.concatenate([np.zeros((1, size), dtype=np.int64), np.cumsum(sums, axis=0)])[:-1]
        return starts[:-1], rates, banded, prefix

    def _brute_sum(self, lo: int, hi: int) -> np.ndarray:
        """Counts of full batches ``[lo, hi)``, batch by batch (vectorised in chunks)."""
        total = np.zeros(len(self.schedule.names), dtype=np.int64)
        for chunk in range(lo, hi, 1 << 16):
            total += self.batch(np.arange(chunk, min(hi, chunk + (1 << 16)))).sum(axis=0)
        return total

    def _change_points(self, phase: int, lo: int, hi: int) -> np.ndarray | None:
        """Batches (as floats) near which the counts of a ramp may change; None: not worth finding them."""
        ph = self.schedule._phases
        u = _ramp_change_points(ph.anchors[ph.src[phase]], ph.anchors[ph.dst[phase]], self.batch_size,
                                limit=(hi - lo) // (2 * self.GUARD + 2))
        if u is None:
            return None
        t = u if ph.kind[phase] == _KIND["linear"] else np.arccos(np.clip(1.0 - 2.0 * u, -1.0, 1.0)) / np.pi
        p = ph.starts[phase] + t * (ph.ends[phase] - ph.starts[phase])
        b = p * (self.num_samples / self.batch_size)
        return np.unique(b[(b > lo) & (b < hi)])

    def _piecewise_runs(self, lo: int, hi: int, points: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        """Runs of ``[lo, hi)`` where the counts change at most once between consecutive midpoints of ``points``.

        Each piece's change is found by bisection on :meth:`batch` (so it is where the float
        evaluation puts it); ``GUARD`` batches on each side of it form a banded run.
        """
        middles = np.floor((points[:-1] + points[1:]) / 2).astype(np.int64) if len(points) > 1 else np.array([], np.int64)
        edges = np.unique(np.concatenate([[lo], np.clip(middles, lo, hi), [hi]]))
        left, right = edges[:-1], edges[1:]
        first, last = self.batch(left), self.batch(right - 1)
        changes = np.flatnonzero((first != last).any(axis=1))
        a, z = left[changes].copy(), right[changes] - 1  # batch(a) == first, batch(z) != first
        while np.any(z - a > 1):
            middle = (a + z) // 2
            differs = (self.batch(middle) != first[changes]).any(axis=1)
            z, a = np.where(differs, middle, z), np.where(differs, a, middle)
        change_at = dict(zip(changes.tolist(), z.tolist()))
        runs: list[tuple[int, np.ndarray | None]] = []
        for i in range(len(left)):
            piece_lo, piece_hi = int(left[i]), int(right[i])
            if i not in change_at:
                runs.append((piece_lo, first[i]))
                continue
            band_lo = max(piece_lo, change_at[i] - self.GUARD)
            band_hi = min(piece_hi, change_at[i] + self.GUARD)
            runs += [(piece_lo, first[i])] if band_lo > piece_lo else []
            runs.append((band_lo, None))
            runs += [(band_hi, last[i])] if band_hi < piece_hi else []
        return runs


def _ramp_change_points(start: np.ndarray, end: np.ndarray, batch_size: int, limit: int) -> np.ndarray | None:
    """Interpolation values ``u`` in [0, 1] where largest-remainder counts of ``batch_size * ((1-u) start + u end)`` may change.

    The counts depend only on each quota's floor and on the order of the quotas' fractional
    parts: they can change only where a quota ``q_s(u)`` or a difference ``q_i(u) - q_j(u)``
    (linear in ``u``) crosses an integer. Returns None when there are more than ``limit``
    such places, or when a constant difference sits on or next to an integer while its
    sources move (a tie that float rounding could break either way: sum batch by batch).

    >>> _ramp_change_points(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 4, limit=100).tolist()
    [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    """
    size = len(start)
    i, j = np.triu_indices(size, k=1)
    moving = start != end
    alpha = batch_size * np.concatenate([start, start[i] - start[j]])
    beta = batch_size * np.concatenate([end - start, (end[i] - start[i]) - (end[j] - start[j])])
    flat = np.abs(beta) <= 1e-12 * batch_size
    pair_moves = np.concatenate([moving, moving[i] | moving[j]])
    near_integer = np.abs(alpha - np.round(alpha)) <= 1e-6
    if np.any(flat & near_integer & pair_moves & ~np.concatenate([np.zeros(size, bool), (start[i] == start[j]) & (end[i] == end[j])])):
        return None
    alpha, beta = alpha[~flat], beta[~flat]
    low, high = np.minimum(alpha, alpha + beta), np.maximum(alpha, alpha + beta)
    first, last = np.ceil(low - 1e-6).astype(np.int64), np.floor(high + 1e-6).astype(np.int64)
    counts = np.maximum(last - first + 1, 0)
    if counts.sum() > limit:
        return None
    owner = np.repeat(np.arange(len(alpha)), counts)
    integers = first[owner] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    return np.unique(np.clip((integers - alpha[owner]) / beta[owner], 0.0, 1.0)) + 0.0  # no -0.0


# -- curriculum pacing ------------------------------------------------------------------------
def pacing_function(
    pacing: str | Callable[[float], float], *, start: float = 0.2, full_at: float = 0.8
) -> Callable[[float], float]:
    """The fraction ``g(p)`` of the data a curriculum may use at progress ``p``.

    Built-ins rise from ``g(0) = start`` to ``g(full_at) = 1`` and stay at 1 (with
    ``t = min(p / full_at, 1)``):

    * ``linear``: ``start + (1 - start) t``;
    * ``root``: ``sqrt(start² + (1 - start²) t)`` (competence-based, Platanios et al. 2019);
    * ``geometric``: ``start ** (1 - t)`` (exponential pacing, Hacohen & Weinshall 2019);
    * ``step``: ``start`` until ``full_at``, then 1 (single-step pacing).

    A callable is returned as is after a check at 0 and 1; it must map [0, 1] to (0, 1]
    and should be non-decreasing.

    >>> g = pacing_function("linear", start=0.2, full_at=0.8)
    >>> [round(g(p), 3) for p in (0.0, 0.4, 0.8, 1.0)]
    [0.2, 0.6, 1.0, 1.0]
    >>> round(pacing_function("geometric", start=0.25, full_at=1.0)(0.5), 3)
    0.5
    """
    if callable(pacing):
        for p in (0.0, 1.0):
            value = pacing(p)
            if not (isinstance(value, numbers.Real) and 0.0 < float(value) <= 1.0):
                raise ValueError(f"pacing({p}) must be a fraction in (0, 1], got {value!r}")
        return pacing
    if pacing not in PACINGS:
        raise ValueError(f"pacing must be one of {', '.join(PACINGS)} or a callable p -> fraction, got {pacing!r}")
    start = _number(start, "start", "start")
    full_at = _number(full_at, "full_at", "full_at")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start must be the starting fraction of the data in (0, 1], got {start}")
    if not 0.0 < full_at <= 1.0:
        raise ValueError(f"full_at must be the progress in (0, 1] where all data is used, got {full_at}")

    def g(p: float) -> float:
        t = min(max(p, 0.0) / full_at, 1.0)
        if pacing == "linear":
            return start + (1.0 - start) * t
        if pacing == "root":
            return math.sqrt(start * start + (1.0 - start * start) * t)
        if pacing == "geometric":
            return start ** (1.0 - t)
        return 1.0 if t >= 1.0 else start

    g.__name__ = f"{pacing}_pacing"
    return g
