"""A step message's rows as a node runs them, and the rows' outputs: views into the
message's input and the batch's output, joined back into one tensor without copies where
they lie in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from zpipe.sampling import SamplingParams


@dataclass
class Row:
    """One session's part of a step message: ``n`` tokens at ``off`` in the message's tensor
    ``src`` (no per-row tensor is made unless the eager path asks for ``x``)."""

    sid: str
    step: int
    pos: int
    n: int
    src: torch.Tensor
    off: int
    params: SamplingParams | None  # last stage only

    @property
    def x(self) -> torch.Tensor:
        return self.src.narrow(0, self.off, self.n)


class RowState(NamedTuple):
    """A row's output hidden states from the decoder: rows ``off`` .. ``off + n`` of its
    batch's output ``src`` (a view per row costs ~3 µs; a batch usually goes on whole, see
    ``join_rows``)."""

    src: torch.Tensor
    off: int
    n: int = 1

    @property
    def x(self) -> torch.Tensor:
        return self.src.narrow(0, self.off, self.n)


def join_rows(parts: list) -> torch.Tensor:
    """Rows' tensors in order (``Row`` inputs, ``RowState`` outputs, or the eager path's
    plain tensors) as one tensor: their source, or a view of it, when they lie in order in
    one tensor (the usual cohort), else a concatenation."""
    first = parts[0]
    if isinstance(first, (Row, RowState)):
        src, end = first.src, first.off
        for p in parts:
            if not isinstance(p, (Row, RowState)) or p.src is not src or p.off != end:
                break
            end += p.n
        else:
            if first.off == 0 and end == src.shape[0]:
                return src
            return src.narrow(0, first.off, end - first.off)
    xs = [p.x if isinstance(p, (Row, RowState)) else p for p in parts]
    if len(xs) == 1:
        return xs[0]
    if len({x.device for x in xs}) > 1:  # decoder rows come back on the host, eager ones not
        xs = [x.cpu() for x in xs]
    return torch.cat(xs)
