"""Progress of long loops: a tqdm bar in terminals and notebooks, nothing elsewhere, nothing with ``progress=False``.

Every long loop of bayesso (``fit``, ``fit_laplace``, the prior precision search, ``evaluate``, the
ensembles, the demo and the benchmarks) makes its bar here. A bar is shown where stderr is a
terminal (redrawn in place at most every ``MIN_INTERVAL`` seconds) and in notebooks (a widget through
``tqdm.auto`` where ipywidgets is installed, else the text bar, without tqdm's "IProgress not found");
where stderr is not a terminal (CI logs, ``nohup``, captured output) it writes nothing at all, postfix
updates included (tqdm's ``disable=None``). Loops count each item with ``update()`` once it is done, so
the count advances together with the postfix. ``fit`` also logs one INFO record per epoch to the
``bayesso.training`` logger, which ``logging.basicConfig(level=logging.INFO)`` shows anywhere.
``progress=False`` silences bars and records alike.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from typing import TypeVar

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:  # tqdm.auto's notebook bar needs ipywidgets, and warns in every notebook without it
    from tqdm.std import tqdm

__all__ = ["MIN_INTERVAL", "check_progress", "known_length", "progress_bar", "track"]

MIN_INTERVAL = 0.5  # seconds between two redraws of a shown bar

T = TypeVar("T")


def check_progress(progress: bool) -> None:
    """ValueError naming ``progress`` unless it is True or False."""
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")


def progress_bar(total: int | None, desc: str, progress: bool, initial: int = 0) -> tqdm:
    """A bar over ``total`` items (None: unknown), starting at ``initial``, that the loop advances with ``update()``.

    Shown only in terminals and notebooks, and only if ``progress``; cleared when closed. Set a
    postfix with ``set_postfix(..., refresh=False)``: the next ``update()`` draws it with the count.
    """
    check_progress(progress)
    disable = None if progress else True  # None: off where stderr is not a terminal
    return tqdm(total=total, desc=desc, initial=initial, leave=False, disable=disable, mininterval=MIN_INTERVAL)


def track(items: Iterable[T], desc: str, progress: bool, total: int | None = None) -> Iterator[T]:
    """The items of ``items`` under a ``progress_bar``, each counted once the loop body is done with it.

    ``total`` defaults to ``len(items)`` when ``items`` has a length.
    """
    return _counted(items, progress_bar(known_length(items) if total is None else total, desc, progress))


def known_length(items: Iterable) -> int | None:
    """``len(items)``, or None for iterables without a length (generators, loaders over iterable datasets)."""
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _counted(items: Iterable[T], bar: tqdm) -> Iterator[T]:
    with bar:
        for item in items:
            yield item
            bar.update()
