"""Choosing the torch device from the one --device option every command shares, and this
process's place in a torchrun launch."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import LmaczsError


class DeviceError(LmaczsError):
    """The device asked for is not available here."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else CPU) | ``cpu`` | ``cuda`` | ``cuda:N``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun launch; the defaults outside torchrun."""

    rank: int = 0           # process index in the whole launch
    world: int = 1          # processes in the launch
    local_rank: int = 0     # process index on this machine: picks its GPU

    @property
    def main(self) -> bool:
        """Whether this process reports and writes what is written once (rank 0)."""
        return self.rank == 0


def torchrun_rank() -> Rank:
    """This process's rank from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    env = os.environ
    return Rank(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))
