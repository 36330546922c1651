"""Checkpoint files: round trip, atomic writes, and a named error for every kind of damage."""

from __future__ import annotations

import random

import pytest
import torch

from bayesso import checkpoint
from bayesso.checkpoint import CheckpointError, read_checkpoint, write_checkpoint


def _content():
    return {
        "weights": torch.randn(20, 30, generator=torch.Generator().manual_seed(0)),
        "half": torch.ones(3, dtype=torch.bfloat16),
        "generator": torch.Generator().manual_seed(1).get_state(),
        "numbers": [1, 2.5, None, "text", (3, (4, 5))],
        "nested": {"flag": True, "empty": []},
    }


def test_round_trip_keeps_every_value_and_type(tmp_path):
    content = _content()
    write_checkpoint(tmp_path / "a.pt", "model", content)
    loaded = read_checkpoint(tmp_path / "a.pt", "model")
    assert torch.equal(loaded["weights"], content["weights"]) and loaded["half"].dtype == torch.bfloat16
    assert torch.equal(loaded["generator"], content["generator"])
    assert loaded["numbers"] == content["numbers"] and loaded["nested"] == content["nested"]
    assert torch.load(tmp_path / "a.pt", weights_only=True)["format"] == "bayesso"  # plain torch.load works


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    write_checkpoint(path, "model", {"step": 1})
    before = path.read_bytes()

    def crash(payload, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, "model", {"step": 2})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_every_kind_of_damage_is_named(tmp_path):
    path = tmp_path / "a.pt"
    write_checkpoint(path, "model", _content())
    raw = path.read_bytes()
    with pytest.raises(CheckpointError, match="a 'model' checkpoint, expected a 'fit' checkpoint"):
        read_checkpoint(path, "fit")
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        read_checkpoint(tmp_path / "missing.pt", "model")
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"a.pt: the file is empty \(0 bytes\)"):
        read_checkpoint(path, "model")
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="a.pt: cannot be read as a checkpoint .*truncated or corrupted"):
        read_checkpoint(path, "model")
    weights = _content()["weights"].numpy().tobytes()
    damaged = bytearray(raw)
    start = damaged.find(weights[:64])
    damaged[start + 100] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"the content is corrupted: entry \['weights'\] has changed"):
        read_checkpoint(path, "model")
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a bayesso checkpoint"):
        read_checkpoint(path, "model")


@pytest.mark.parametrize("seed", range(10))
def test_64_flipped_bytes_anywhere_never_load_silently(seed, tmp_path):
    path = tmp_path / "a.pt"
    write_checkpoint(path, "model", _content())
    raw = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for position in rng.sample(range(len(raw)), 64):
        raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="a.pt: "):
        read_checkpoint(path, "model")
