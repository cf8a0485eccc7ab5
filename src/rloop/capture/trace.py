"""Capture and edit hook points during a forward pass.

:class:`Trace` is a context manager in the spirit of baukit's ``TraceDict``: it registers
hooks on the modules the adapter names, records (and optionally edits) the canonical tensor
of each requested hook point, optionally stops the forward pass after the last layer that is
needed, and always removes its hooks on exit, even on error.

    points = ["blocks.3.v", "blocks.25.v"]
    with Trace(lm.model, lm.adapter, capture=points, stop_after_layer=25) as tr:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    v_late = tr["blocks.25.v"]  # (B, T, Hkv, D)

Edits are functions ``fn(value) -> value`` on the canonical tensor (see adapters.base); a
captured point that is also edited records the edited value, i.e. what the model consumed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rloop.adapters.base import Adapter, text_config
from rloop.errors import ConfigError

EditFn = Callable[[torch.Tensor], torch.Tensor]

_ADDRESS = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")


@dataclass(frozen=True)
class HookAddress:
    layer: int
    point: str

    def __str__(self) -> str:
        return f"blocks.{self.layer}.{self.point}"


def address(layer: int, point: str) -> str:
    """The string address of ``point`` at ``layer``: ``blocks.{layer}.{point}``."""
    return f"blocks.{layer}.{point}"


def parse_address(text: str | HookAddress) -> HookAddress:
    if isinstance(text, HookAddress):
        return text
    match = _ADDRESS.match(text)
    if match is None:
        raise ConfigError(f"bad hook address {text!r}: write it as blocks.<layer>.<point>")
    return HookAddress(int(match.group(1)), match.group(2))


class StopForward(Exception):
    """Raised by a hook to end the forward pass after the last needed layer."""


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


def _replace_first(output: object, new: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


class Trace:
    """Record and edit hook points for the forward passes run inside the ``with`` block.

    capture: addresses to record; each holds the tensor of the most recent forward.
    edits: address -> function applied to the canonical tensor before the model uses it.
    stop_after_layer: raise StopForward after this block's output (swallowed on exit),
        so no later block, final norm or LM head is computed.
    stop_after_point: raise StopForward right after this hook point has been computed
        (e.g. ``blocks.25.v``: nothing after layer 25's value projection runs).
    detach: detach captured tensors (set False to keep the autograd graph, e.g. saliency).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        capture: Iterable[str | HookAddress] = (),
        edits: Mapping[str | HookAddress, EditFn] | None = None,
        stop_after_layer: int | None = None,
        detach: bool = True,
        stop_after_point: str | HookAddress | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.capture = [parse_address(a) for a in capture]
        self.edits = {parse_address(a): fn for a, fn in (edits or {}).items()}
        self.stop_after_layer = stop_after_layer
        self.stop_after_point = (
            parse_address(stop_after_point) if stop_after_point is not None else None
        )
        self.detach = detach
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for addr in [*self.capture, *self.edits]:
            adapter.check_layer(addr.layer)
            adapter.spec(addr.point)
        if stop_after_layer is not None:
            adapter.check_layer(stop_after_layer)
        if self.stop_after_point is not None:
            adapter.check_layer(self.stop_after_point.layer)
            adapter.spec(self.stop_after_point.point)

    def __getitem__(self, addr: str | HookAddress) -> torch.Tensor:
        key = str(parse_address(addr))
        if key not in self.values:
            raise KeyError(f"{key} was not captured (did the forward pass reach that layer?)")
        return self.values[key]

    def __contains__(self, addr: str | HookAddress) -> bool:
        return str(parse_address(addr)) in self.values

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, addr: HookAddress, record: bool, edit: EditFn | None):
        adapter, point, key = self.adapter, addr.point, str(addr)
        io = adapter.spec(point).io

        def process(raw: torch.Tensor) -> torch.Tensor | None:
            new_raw = None
            if edit is not None:
                value = edit(adapter.read(point, raw))
                new_raw = adapter.write(point, raw, value)
                raw = new_raw
            if record:
                value = adapter.read(point, raw)
                self.values[key] = value.detach() if self.detach else value
            return new_raw

        if io == "output":

            def hook(module, args, output):
                new_raw = process(_first(output))
                return None if new_raw is None else _replace_first(output, new_raw)

            return "forward", hook

        def pre_hook(module, args, kwargs):
            if args:
                new_raw = process(args[0])
                return None if new_raw is None else ((new_raw, *args[1:]), kwargs)
            new_raw = process(kwargs["hidden_states"])
            return None if new_raw is None else (args, {**kwargs, "hidden_states": new_raw})

        return "pre", pre_hook

    def __enter__(self) -> Trace:
        self.values.clear()
        try:
            for addr in dict.fromkeys([*self.capture, *self.edits]):
                module = self.adapter.module_for(self.model, addr.layer, addr.point)
                kind, hook = self._make_hook(addr, addr in self.capture, self.edits.get(addr))
                if kind == "forward":
                    self._handles.append(module.register_forward_hook(hook))
                else:
                    self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if self.stop_after_layer is not None:
                block = self.adapter.blocks(self.model)[self.stop_after_layer]

                def stop(module, args, output):
                    raise StopForward

                self._handles.append(block.register_forward_hook(stop))
            if self.stop_after_point is not None:
                self._handles.append(self._register_stop_at_point(self.stop_after_point))
        except BaseException:
            self._remove()
            raise
        return self

    def _register_stop_at_point(self, addr: HookAddress) -> RemovableHandle:
        module = self.adapter.module_for(self.model, addr.layer, addr.point)

        def stop(*args):
            raise StopForward

        if self.adapter.spec(addr.point).io == "output":
            return module.register_forward_hook(stop)
        # An input point is "computed" when the module is called: stop before it runs.
        return module.register_forward_pre_hook(stop)

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return exc_type is not None and issubclass(exc_type, StopForward)


class LastTokenLogits:
    """Logits at one position per row, without running the LM head over every token.

    A hook on the final norm keeps that norm's output at ``positions`` (B,) (e.g. each row's
    last real token) and ends the forward pass there; :meth:`logits` then applies the model's
    own output embedding (and Gemma's final logit soft-capping where configured), giving what
    ``model(...).logits[rows, positions]`` would hold. Use inside a ``with`` like :class:`Trace`;
    the hook is always removed.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, positions: torch.Tensor) -> None:
        self.model = model
        self.adapter = adapter
        self.positions = positions  # (B,)
        self.hidden: torch.Tensor | None = None  # (B, d_model) final-norm output
        self._handle: RemovableHandle | None = None

    def __enter__(self) -> LastTokenLogits:
        norm = self.model.get_submodule(self.adapter.final_norm_path)

        def hook(module, args, output):
            out = _first(output)  # (B, T, d)
            rows = torch.arange(out.shape[0], device=out.device)  # (B,)
            self.hidden = out[rows, self.positions.to(out.device)]  # (B, d)
            raise StopForward

        self._handle = norm.register_forward_hook(hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return exc_type is not None and issubclass(exc_type, StopForward)

    def logits(self) -> torch.Tensor:
        """(B, vocab) logits at the recorded positions, in the model's dtype."""
        if self.hidden is None:
            raise RuntimeError("the forward pass did not reach the final norm")
        logits = self.model.get_output_embeddings()(self.hidden)  # (B, V)
        cap = getattr(text_config(self.model.config), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap  # (B, V)
        return logits


def run_with_trace(
    model: nn.Module,
    adapter: Adapter,
    inputs: Mapping[str, torch.Tensor],
    capture: Iterable[str | HookAddress] = (),
    edits: Mapping[str | HookAddress, EditFn] | None = None,
    stop_after_layer: int | None = None,
    detach: bool = True,
) -> Trace:
    """Run one forward pass on ``inputs`` (input_ids, attention_mask, ...) inside a Trace."""
    with Trace(model, adapter, capture, edits, stop_after_layer, detach) as trace:
        model(**inputs, use_cache=False)
    return trace
