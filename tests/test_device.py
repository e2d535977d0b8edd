"""The --device choice and a process's torchrun rank."""
from __future__ import annotations

import pytest
import torch

from lmaczs_cli.device import DeviceError, Rank, resolve_device, torchrun_rank


def test_rank_outside_torchrun_is_the_only_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_rank() == Rank(0, 1, 0) and torchrun_rank().main


def test_rank_reads_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    me = torchrun_rank()
    assert (me.rank, me.world, me.local_rank) == (5, 8, 1) and not me.main


def test_resolve_device_names_the_fix():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
