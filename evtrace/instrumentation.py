"""Model instrumentation: ``instrument(model)``, each module's forward and backward as regions.

Owns the module wrappers (``select``, ``Instrumentation``, ``instrument``) and the backward spans
(pre-hooks on autograd nodes). The CLI's global patches are ``autohooks``; NVTX is ``nvtx``.

Modules are wrapped by replacing ``forward`` on the *instance* with a small callable, not by
``register_forward_hook``: any hook sends every call through ``nn.Module``'s slow path, which
alone costs 3–4 µs a call (measured on an H100 here), as much as the kernel launch itself.
The wrapper pickles back to the plain method, so a model saved while instrumented loads as
an ordinary one; ``remove()`` restores the instance exactly.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import _core, private
from . import recorder as _rec

if TYPE_CHECKING:
    import torch

_MISSING = object()
# torch's, bound once instrument() runs
_is_compiling: Callable[[], bool] = lambda: False  # noqa: E731
_Tensor: Any = None
_queue_callback: Callable[[Callable[[], None]], None] | None = None
_graph_task_id: Callable[[], int] = threading.get_ident  # which backward pass runs: torch's, where it has it
_sequential_forward: Any = None
_global_hooks: tuple[dict[Any, Any], ...] = ()  # torch's global module hooks, any kind


def compiling() -> bool:
    """Whether torch.compile is tracing right now (False until ``bind_torch`` ran)."""
    return _is_compiling()


def bind_torch() -> None:
    """Import torch only when instrumenting, so that `evtrace summary` starts fast."""
    global _is_compiling, _Tensor, _queue_callback, _graph_task_id, _sequential_forward, _global_hooks
    import torch

    _is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _is_compiling)
    _Tensor = torch.Tensor
    _queue_callback = private.queue_callback(torch)
    _graph_task_id = private.graph_task_id(torch)
    _sequential_forward = torch.nn.Sequential.forward
    _global_hooks = private.global_hooks(torch)
    _core.bind(  # the core's torch parts: `import evtrace` never imports torch, so bound here
        **private.compiler_parts(torch),
        grad_enabled=torch.is_grad_enabled,
        watch=_watched,
        forward_type=_Forward,
        global_hooks=_global_hooks,
        frame=_frame,
    )
    if private.DYNAMO in sys.modules:
        _polyfill()
    elif not any(isinstance(f, _OnDynamoImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnDynamoImport())  # importing dynamo costs ~1 s: only once it is in use


_polyfilled = False


def _polyfill() -> None:
    """Tell dynamo to trace the Python twins of ``_core.forward`` and ``_core.sequential`` (C, which
    it cannot trace). A torch without ``substitute_in_graph`` (before 2.5) splits the graph at each
    instrumented module instead: still correct, slower."""
    global _polyfilled
    substitute = getattr(getattr(sys.modules["torch"], "compiler", None), "substitute_in_graph", None)
    if _polyfilled or substitute is None:
        return
    pairs = (
        (_core.forward, _traced_forward),
        (_core.forward_here, _traced_forward),
        (_core.sequential, _traced_sequential),
    )
    for c_fn, twin in pairs:
        try:
            substitute(c_fn, skip_signature_check=True)(twin)
        except TypeError:  # no skip_signature_check: a builtin has no signature to check anyway
            substitute(c_fn)(twin)
    _polyfilled = True


class _OnDynamoImport(importlib.abc.MetaPathFinder):
    """Registers the twins as soon as ``torch._dynamo`` is imported (``torch.compile`` does), before
    dynamo can trace anything: the import itself is left to torch's own finder."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != private.DYNAMO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader if spec else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_polyfill(module: types.ModuleType) -> None:
            exec_module(module)
            try:
                _polyfill()
            except Exception as e:  # never break the user's torch.compile
                print(f"evtrace: compiled graphs split at instrumented modules ({e})", file=sys.stderr)

        loader.exec_module = exec_then_polyfill  # type: ignore[method-assign]
        return spec


# ---- per-module backward spans --------------------------------------------------------------
# A module's backward begins when the gradient of one of its outputs reaches the autograd node
# that made that output, and ends once the gradients of its inputs are complete: when the node
# that made each input is about to run. Both are pre-hooks on nodes, so they run on the thread
# autograd runs them on, with the node's stream current, and die with the graph. A module whose
# inputs carry no gradient (the first layer) ends when the backward pass does.

_META = "evtrace"  # our entry in a node's metadata dict
# per backward pass (torch's graph task id): its spans begun and not yet ended, in the order they
# began. Passes run concurrently (one per thread calling backward): each sweeps only its own.
_passes: dict[int, list[_BackwardSpan]] = {}
_passes_lock = threading.Lock()  # a pass's nodes may run on several threads (CPU and device ones)


class _BackwardSpan:
    """One module call's backward: begun by the first of its outputs' gradients, ended by the
    last of its inputs'. Each backward pass through the graph (``retain_graph``) begins it anew."""

    __slots__ = ("key", "rec", "tok", "inputs", "left", "exit", "open")

    def __init__(self, key: int, rec: _rec.Recorder, inputs: int) -> None:
        self.key, self.rec, self.inputs, self.left = key, rec, inputs, inputs
        self.tok: tuple[Any, ...] | None = None
        self.exit: Any = None
        self.open: list[_BackwardSpan] = []  # its pass's open spans while it is open

    def begin(self) -> None:
        rec = self.rec
        if self.tok is not None or _rec.current is not rec:
            return  # begun already (another output), or its session ended
        self.exit = rec.exit_cross  # it may end on another thread
        self.tok = rec.enter_cross(self.key, None)
        self.left = self.inputs
        task = _graph_task_id()
        with _passes_lock:
            spans = _passes.get(task)
            first = spans is None
            if spans is None:
                spans = _passes[task] = []
            spans.append(self)
        self.open = spans
        if first and _queue_callback is not None:
            try:
                _queue_callback(functools.partial(_sweep, task))  # runs when this pass is over
            except RuntimeError:  # not inside a backward pass after all: the session's end closes it
                with _passes_lock:
                    _passes.pop(task, None)

    def end_one(self) -> None:
        if self.tok is not None:  # else its outputs got no gradient: it never began
            self.left -= 1
            if self.left == 0:
                self.close()

    def close(self) -> None:
        tok, self.tok = self.tok, None
        if tok is not None:
            with _passes_lock:
                if self in self.open:
                    self.open.remove(self)
            if _rec.current is self.rec:
                self.exit(tok)


def _sweep(task: int) -> None:
    """Backward pass ``task`` is over: end what it left open, innermost first."""
    with _passes_lock:
        spans = list(_passes.pop(task, ()))
    for span in reversed(spans):
        span.close()


class _NodeHooks:
    """The one pre-hook evtrace puts on an autograd node. Ends run first, in the order the
    modules returned (inner first); then begins, in reverse (outer first): spans nest."""

    __slots__ = ("ends", "begins")

    def __init__(self) -> None:
        self.ends: list[_BackwardSpan] = []
        self.begins: list[_BackwardSpan] = []

    def __call__(self, grad_outputs: Any) -> None:
        for span in self.ends:
            span.end_one()
        for span in reversed(self.begins):
            span.begin()


def _node_hooks(node: Any) -> _NodeHooks:
    md = node.metadata
    h: _NodeHooks | None = md.get(_META)
    if h is None:
        h = md[_META] = _NodeHooks()
        node.register_prehook(h)
    return h


def _grad_nodes(obj: Any, out: dict[int, Any], depth: int = 0) -> None:
    """The autograd nodes that made the tensors in ``obj`` (a tensor, or a tuple, list or dict
    of them, two levels deep); leaves and tensors without grad have none."""
    if isinstance(obj, _Tensor):
        if obj.requires_grad:
            node = obj.grad_fn
            if node is not None:
                out[id(node)] = node
    elif depth < 2 and isinstance(obj, (tuple, list)):
        for o in obj:
            _grad_nodes(o, out, depth + 1)
    elif depth < 2 and isinstance(obj, dict):
        for o in obj.values():
            _grad_nodes(o, out, depth + 1)


def _watch_backward(rec: Any, key: int, args: Any, kwargs: Any, result: Any) -> None:
    """After a forward with grad enabled: hook the backward span of this call."""
    outs: dict[int, Any] = {}
    _grad_nodes(result, outs)
    if not outs:
        return
    ins: dict[int, Any] = {}
    _grad_nodes(args, ins, 1)
    if kwargs:
        _grad_nodes(kwargs, ins, 1)
    if outs.keys() & ins.keys():
        return  # an output is an input (an identity): no span of its own
    span = _BackwardSpan(key, rec, len(ins))
    for node in ins.values():
        _node_hooks(node).ends.append(span)
    for node in outs.values():
        _node_hooks(node).begins.append(span)


def _plain_forward(module: torch.nn.Module) -> Any:  # noqa: F821
    """What ``module.forward`` is without evtrace: used when an instrumented model is unpickled."""
    return types.MethodType(type(module).forward, module)


class _Forward(functools.partial):  # type: ignore[type-arg]
    """``module.forward`` as a region named ``name`` (see ``select``), and with grad enabled its
    backward as a region named ``<name> (backward)``: ``_core.forward(fn, key, bkey, ...)``, so that
    nn.Module calls straight into C. A no-op without a session. Dynamo traces ``_traced_forward``
    in its place: a compiled graph is not split, and the modules inside it are not traced."""

    module: torch.nn.Module
    name: str

    def __new__(cls, module: torch.nn.Module, fn: Any, name: str, backward: bool = True) -> _Forward:
        bkey = _rec.name_key(f"{name} (backward)") if backward else -1
        self = super().__new__(cls, _core.forward, fn, _rec.name_key(name), bkey)
        self.module, self.name = module, name
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_plain_forward, (self.module,))

    def __repr__(self) -> str:
        return f"<evtrace forward of {self.name}>"


def _traced_forward(fn: Any, key: int, bkey: int, /, *args: Any, **kwargs: Any) -> Any:
    """What dynamo traces in place of ``_core.forward``: the module's own forward, nothing else."""
    return fn(*args, **kwargs)


def _frame(fn: Any, key: int, bkey: int, /, *args: Any, **kwargs: Any) -> Any:
    """``_core.forward`` through a Python frame, for dynamo to compile while a compiled call runs."""
    return _core.forward_here(fn, key, bkey, *args, **kwargs)


def _watched(key: int, args: Any, kwargs: Any, result: Any) -> None:
    rec = _rec.current
    if rec is not None:
        _watch_backward(rec, key, args, kwargs, result)


def _traced_sequential(seq: Any, input: Any, /) -> Any:
    """What dynamo traces in place of ``_core.sequential``: ``nn.Sequential.forward``."""
    for module in seq:
        input = module(input)
    return input


# ---- names -----------------------------------------------------------------------------------
# A module region is named by its model's label and its path in the model: "Net.layers.3.attn".
# The label is the model's class name, "#2", "#3"... added for a second and third model of that
# class (the hooks label models in order of first call), so that two models never share a row and
# the same script gets the same names every run. A label is held while its model is instrumented
# and, if a session recorded meanwhile, until that session ends: one trace never gives one name
# to two models. Then it is free again (the hooks remove theirs at the session's end).

_held: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()  # model: [label, holders]
# labels released while a session recorded: label -> (that session's recorder, the model)
_kept: dict[str, tuple[weakref.ref[Any], weakref.ref[Any]]] = {}
_labels_lock = threading.Lock()  # the hooks adopt a model on whichever thread first calls it


def _take_label(model: torch.nn.Module, name: str | None = None) -> str:
    """``model``'s label, held once more: the one it has or had in this session, else ``name``
    (or its class name) made unique among the labels held."""
    with _labels_lock:
        cur = _rec.current
        for label, (rec, _) in list(_kept.items()):
            if cur is None or rec() is not cur:
                del _kept[label]  # its session has ended
        held = _held.get(model)
        if held is not None:
            held[1] += 1
            return str(held[0])
        mine = [label for label, (_, m) in _kept.items() if m() is model]
        if mine:
            label = mine[0]
            del _kept[label]
        else:
            base = name or type(model).__name__
            taken = {v[0] for v in _held.values()} | _kept.keys()
            label, n = base, 1
            while label in taken:
                n += 1
                label = f"{base}#{n}"
        _held[model] = [label, 1]
        return label


def _release_label(model: torch.nn.Module) -> None:
    with _labels_lock:
        held = _held.get(model)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _held[model]
            if _rec.current is not None:
                _kept[held[0]] = (weakref.ref(_rec.current), weakref.ref(model))


def select(
    model: torch.nn.Module,
    depth: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    label: str | None = None,
) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) pairs to trace: the root is depth 0, its children depth 1, and so on.

    A module's name is its path below the root, after the root's ``label`` (by default its class
    name): ``Net``, ``Net.layers.3.attn``. ``include``/``exclude`` are regexes searched in it.
    """
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    root = label or type(model).__name__
    out = []
    for path, m in model.named_modules():
        d = 0 if path == "" else path.count(".") + 1
        name = f"{root}.{path}" if path else root
        if depth is not None and d > depth:
            continue
        if inc is not None and not inc.search(name):
            continue
        if exc is not None and exc.search(name):
            continue
        out.append((name, m))
    return out


class Instrumentation:
    """What ``instrument`` changed; ``remove()`` (or leaving the ``with`` block) undoes it.

    ``adjacent=False`` runs an ``nn.Sequential`` as any other module: its children's boundaries
    then never share an event (a benchmark's comparison; see ``_core.sequential``).
    """

    def __init__(
        self, modules: Iterable[tuple[str, torch.nn.Module]], backward: bool = True, adjacent: bool = True
    ) -> None:
        bind_torch()
        self._saved: list[tuple[torch.nn.Module, Any]] = []
        self._labelled: torch.nn.Module | None = None  # the model whose label it holds
        for name, m in modules:
            if isinstance(m.__dict__.get("forward"), _Forward):
                continue  # already traced by another instrumentation
            prev = m.__dict__.get("forward", _MISSING)
            fn = prev if prev is not _MISSING else m.forward
            if adjacent and prev is _MISSING and type(m).forward is _sequential_forward:
                fn = functools.partial(_core.sequential, m)  # an nn.Sequential by its forward
            m.__dict__["forward"] = _Forward(m, fn, name, backward)
            self._saved.append((m, prev))

    def __len__(self) -> int:
        return len(self._saved)

    def remove(self) -> None:
        for m, prev in reversed(self._saved):
            if prev is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = prev
        self._saved.clear()
        model, self._labelled = self._labelled, None
        if model is not None:
            _release_label(model)

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def instrument(
    model: torch.nn.Module,
    *,
    depth: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    backward: bool = True,
    name: str | None = None,
) -> Instrumentation:
    """Trace ``model``'s forward, and its submodules' down to ``depth`` (None: all of them).

    Each module call becomes a region named by the model's label and the module's path
    (``Net.encoder.layers.3.attn``), on the host and on the current stream. The label is ``name``,
    by default the model's class name; a second model of that name instrumented at the same time,
    or in the same session, gets ``Net#2``, a third ``Net#3``. With ``backward`` (and grad
    enabled), its backward becomes a region ``Net.encoder.layers.3.attn (backward)`` on the thread
    and stream autograd runs it on. ``include``/``exclude`` are regexes searched in those names.
    Undo with ``.remove()`` or use it as a context manager.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"instrument() takes an nn.Module, not {type(model).__name__}")
    label = _take_label(model, name)
    try:
        ins = Instrumentation(select(model, depth, include, exclude, label), backward)
    except BaseException:
        _release_label(model)
        raise
    ins._labelled = model
    return ins
