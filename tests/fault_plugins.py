"""Test-only backbones that fail on purpose, registered in the driver and (through Ray's
``worker_process_setup_hook``) in every Ray worker. Not part of the package.

- ``raise_always``: raises in its first training forward of every attempt (a deterministic bug).
- ``raise_once``: raises at the start of its second epoch unless the marker file
  ``$FAULT_MARKER_DIR/<trial seed>.raised`` exists, and creates it (a transient fault).
- ``raise_until_fixed``: raises from its second epoch on (in every attempt) while the marker
  file ``$FAULT_MARKER_DIR/raise_until_fixed.fixed`` is missing (a bug fixed before a
  ``--resume``).
- ``nan_later``: an EF-LSTM whose predictions become NaN from its second epoch on (divergence
  after a good first epoch).
- ``pid_probe``: an EF-LSTM that appends the id of the process building it to
  ``$FAULT_MARKER_DIR/pid_probe.pids`` (which worker process ran each trial).

Epochs are counted by ``model.train()`` calls: the loop calls it once at the start of each epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainables.backbones import BACKBONES
from trainables.backbones.ef_lstm import EFLSTM

NAMES = {"raise_always": "RaiseAlways", "raise_once": "RaiseOnce",
         "raise_until_fixed": "RaiseUntilFixed", "nan_later": "NanLater", "pid_probe": "PidProbe"}


def register() -> None:
    for name, cls in NAMES.items():
        BACKBONES[name] = f"tests.fault_plugins:{cls}"


class _Counting(EFLSTM):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epochs_started = 0  # in this attempt (a retry restarts from a checkpoint)

    def train(self, mode: bool = True):
        if mode:
            self.epochs_started += 1
        return super().train(mode)


class RaiseAlways(_Counting):
    def forward(self, batch):
        if self.training:
            raise RuntimeError("raise_always: a deterministic bug in forward")
        return super().forward(batch)


class RaiseOnce(_Counting):
    def forward(self, batch):
        if self.training and self.epochs_started == 2:
            marker = Path(os.environ["FAULT_MARKER_DIR"]) / "raise_once.raised"
            if not marker.exists():
                marker.touch()
                raise RuntimeError("raise_once: a transient fault")
        return super().forward(batch)


class RaiseUntilFixed(_Counting):
    resumed = False  # an attempt that continues from a checkpoint is past its first epoch

    def load_state_dict(self, *args, **kwargs):
        self.resumed = True
        return super().load_state_dict(*args, **kwargs)

    def forward(self, batch):
        if self.training and (self.epochs_started >= 2 or self.resumed):
            if not (Path(os.environ["FAULT_MARKER_DIR"]) / "raise_until_fixed.fixed").exists():
                raise RuntimeError("raise_until_fixed: a bug in forward, not fixed yet")
        return super().forward(batch)


class NanLater(_Counting):
    def forward(self, batch):
        out = super().forward(batch)
        if self.training and self.epochs_started >= 2:
            out.prediction = out.prediction * torch.nan
        return out


class PidProbe(EFLSTM):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        with open(Path(os.environ["FAULT_MARKER_DIR"]) / "pid_probe.pids", "a") as out:
            out.write(f"{os.getpid()}\n")
