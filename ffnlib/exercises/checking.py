"""What every check shares: the exceptions a student sees, calling the student's function, and comparing its
result with ffnlib's (naming the known mistake it matches)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..capture import capture

__all__ = ["CheckFailed", "NotDoneYet", "name_of", "call_student", "as_tensor", "all_close", "compare", "passed",
           "ffn_input"]


class CheckFailed(AssertionError):
    """The student's answer differs from ffnlib's; the message says how, in words."""


class NotDoneYet(CheckFailed):
    """The student's function still raises ``NotImplementedError``."""


def name_of(fn) -> str:
    """The name a message gives the student's function."""
    return getattr(fn, "__name__", "your function")


def call_student(fn, *args):
    """Run the student's function, turning a stub or a crash into a message that says so."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise NotDoneYet(f"`{name_of(fn)}` is not written yet: replace `raise NotImplementedError()` in its cell "
                         f"with your code, run that cell, then this one. `hint({name_of(fn)!r})` gives a hint.") from None
    except CheckFailed:
        raise
    except Exception as exc:  # the student's code crashed: say where, keep the traceback chained
        raise CheckFailed(f"`{name_of(fn)}` raised {type(exc).__name__}: {exc}. It was called with "
                          f"{_describe_args(args)}.") from exc


def _describe_args(args) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"a tensor of shape {tuple(a.shape)}")
        elif isinstance(a, (list, tuple)):
            parts.append(f"a {type(a).__name__} of {len(a)} items")
        elif callable(a):
            parts.append(f"the function `{name_of(a)}`")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


def as_tensor(fn, got, expected: torch.Tensor, meaning: str) -> torch.Tensor:
    """The student's result as a tensor of the expected shape, or a message about its type or shape."""
    if isinstance(got, np.ndarray):
        got = torch.from_numpy(got)
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"`{name_of(fn)}` returned {type(got).__name__}; it should return a torch tensor "
                          f"({meaning}).")
    if tuple(got.shape) != tuple(expected.shape):
        transposed = got.ndim == 2 and tuple(got.shape) == tuple(expected.shape)[::-1]
        raise CheckFailed(f"`{name_of(fn)}` returned shape {tuple(got.shape)}; it should be {tuple(expected.shape)} "
                          f"({meaning})." + (" It looks transposed: which matrix did you put first in the product?"
                                             if transposed else ""))
    return got.detach().to(expected.dtype).cpu()


def all_close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    """``torch.allclose`` in float32."""
    return bool(torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol))


def compare(fn, got, expected: torch.Tensor, meaning: str, mistakes: Sequence[tuple[torch.Tensor, str]] = (),
            rtol: float = 1e-3, atol: float = 1e-5) -> torch.Tensor:
    """Pass when ``got`` equals ``expected`` within tolerance; else name the first known mistake it matches,
    or say how far off it is."""
    expected = expected.detach().cpu()
    if isinstance(got, (torch.Tensor, np.ndarray)) and tuple(got.shape) != tuple(expected.shape):
        got_t = torch.as_tensor(got).detach().cpu()
        for wrong, message in mistakes:  # a known mistake of another shape says more than the shape alone
            if tuple(wrong.shape) == tuple(got_t.shape) and all_close(got_t, wrong.detach().cpu(), rtol, atol):
                raise CheckFailed(f"`{name_of(fn)}`: {message}")
    got = as_tensor(fn, got, expected, meaning)
    if all_close(got, expected, rtol, atol):
        return got
    for wrong, message in mistakes:
        if tuple(wrong.shape) == tuple(expected.shape) and all_close(got, wrong.detach().cpu(), rtol, atol):
            raise CheckFailed(f"`{name_of(fn)}`: {message}")
    off = ~torch.isclose(got.float(), expected.float(), rtol=rtol, atol=atol)
    worst = (got.float() - expected.float()).abs().max().item()
    raise CheckFailed(f"`{name_of(fn)}`: {off.float().mean().item():.1%} of the values differ from ffnlib's "
                      f"(largest difference {worst:.3g}). Compare a few entries by hand, or ask for "
                      f"`hint({name_of(fn)!r})`.")


def passed(fn, what: str) -> None:
    """Say that the check passed, and what it compared."""
    print(f"✔ `{name_of(fn)}` passed: {what}")


def ffn_input(loaded, layer: int, text: str) -> torch.Tensor:
    """The FFN's input at every position of ``text`` (tokens, d_model), captured at ``layer``."""
    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("ffn_input",)) as acts:
        loaded.model(ids)
    return acts.ffn_input[layer][0]
