"""Checkpoint files: atomic writes and verified reads.

A checkpoint is a ``torch.save`` file (readable with ``torch.load(path, weights_only=True)``)
holding ``{"format": "bayesso", "version", "kind", "content", "checksums"}``: ``checksums``
maps the path of every entry of ``content`` (``module['0.weight']``, ``optimizer.vi.step``)
to the SHA-256 of its dtype, shape and bytes (or of its value), so a flipped byte is found
and named. Writing goes to a temporary file in the same folder, which is flushed to disk and
then renamed over the target: a crash mid-write never leaves a half-written checkpoint.
Every failure to read names the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from bayesso.distributed import ProcessGrid

__all__ = ["CheckpointError", "CheckpointFiles", "read_checkpoint", "write_checkpoint"]

FORMAT, VERSION = "bayesso", 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, empty, truncated, corrupted or for something else."""


def write_checkpoint(path: str | Path, kind: str, content: dict) -> None:
    """Write ``content`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically, with checksums."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, "content": content, "checksums": _checksums(content)}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(path.parent)


def read_checkpoint(path: str | Path, kind: str) -> dict:
    """The verified ``content`` of a checkpoint of ``kind`` ("model", "fit"); ``CheckpointError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a checkpoint")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({size:,} bytes; truncated or corrupted?): {reason}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a bayesso checkpoint (no 'format': {FORMAT!r} entry)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('version')!r}, expected {VERSION}")
    if payload.get("kind") != kind:
        raise CheckpointError(f"{path}: a {payload.get('kind')!r} checkpoint, expected a {kind!r} checkpoint")
    content, saved = payload.get("content"), payload.get("checksums")
    if not isinstance(content, dict) or not isinstance(saved, dict):
        raise CheckpointError(f"{path}: the checkpoint lacks its content or its checksums")
    actual = _checksums(content)
    for where in sorted(set(saved) | set(actual), key=lambda w: (w not in actual, w)):
        if saved.get(where) != actual.get(where):
            what = "is missing" if where not in actual else "is unexpected" if where not in saved else "has changed"
            raise CheckpointError(f"{path}: the content is corrupted: entry {where} {what} since the file was written")
    return content


def _checksums(content: dict) -> dict[str, str]:
    return dict(_leaves(content, ""))


def _leaves(value, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{where}[{i}]")
    else:
        yield where or "content", _digest(value)


def _digest(value) -> str:
    sha = hashlib.sha256()
    if isinstance(value, Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        sha.update(f"{flat.dtype}{tuple(value.shape)}".encode())
        sha.update(flat.view(torch.uint8).numpy().tobytes())
    else:
        sha.update(f"{type(value).__name__}:{value!r}".encode())
    return sha.hexdigest()[:32]


def _sync_folder(folder: Path) -> None:
    """Persist the rename itself (where the platform allows opening a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class CheckpointFiles:
    """This rank's checkpoint file and the previous one; agreement across ranks on where to resume."""

    def __init__(self, path: str | Path, grid: ProcessGrid) -> None:
        path = Path(path)
        if grid.active:
            path = path.with_name(f"{path.stem}.rank{grid.rank}{path.suffix}")
        if path.is_dir():
            raise ValueError(f"checkpoint must be a file path, got the folder {path}")
        if not path.parent.is_dir():
            raise ValueError(f"checkpoint {path}: the folder {path.parent} does not exist")
        self.path, self.previous, self.grid = path, path.with_name(path.name + ".previous"), grid

    def write(self, content: dict) -> None:
        if self.path.exists():
            os.replace(self.path, self.previous)
        write_checkpoint(self.path, "fit", content)

    def latest(self) -> dict | None:
        """The newest checkpoint every rank holds (None when no rank has one)."""
        grid = self.grid
        with grid.lockstep("checkpoint reading"):
            found, problems = {}, []
            for path in (self.path, self.previous):
                if path.exists():
                    try:
                        content = read_checkpoint(path, "fit")
                        found[content["progress"]["step"]] = content
                    except (CheckpointError, KeyError, TypeError) as error:
                        problems.append(str(error))
            if problems and not found:
                raise CheckpointError(f"no usable checkpoint to resume from: {'; '.join(problems)}")
            for problem in problems:
                warnings.warn(f"skipping a damaged checkpoint: {problem}", stacklevel=3)
        steps = torch.zeros(grid.world_size, 2, dtype=torch.float64)  # per rank: the steps it holds, plus one
        steps[grid.rank, : len(found)] = torch.tensor(sorted(found), dtype=torch.float64) + 1
        steps = grid.all_reduce([steps])[0]
        held = [{round(s) - 1 for s in row if s > 0} for row in steps.tolist()]
        if not any(held):
            return None
        common = set.intersection(*held)
        if not common:
            raise CheckpointError(
                f"the ranks hold checkpoints of different steps ({[sorted(h) for h in held]}), none common to all; "
                "resume=False starts afresh"
            )
        return found[max(common)]
