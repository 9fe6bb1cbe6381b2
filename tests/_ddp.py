"""Shared scaffolding of the DDP tests: a script (tests/callbacks/*_ddp_script.py) runs 1 or 2 gloo CPU processes.

Script side: :func:`script_arguments` parses ``--devices``, ``--out`` and ``--root``; :func:`trainer` builds the
quiet CPU trainer; :func:`write_result` writes each rank's JSON to ``<out>.rank<r>.json``. Test side:
:func:`load_script` imports a script for the one-process reference run, :func:`run` launches it as a subprocess and
returns what every rank wrote. Scripts run outside pytest, so they put tests/ on sys.path themselves.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lens._pl import Trainer


# ------------------------------------------------------------------------------------------------ in the script
def script_arguments() -> argparse.ArgumentParser:
    """A parser with ``--devices`` (default 2), ``--out`` (prefix of the per-rank JSON) and ``--root`` (logs)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", required=True)
    return parser


def trainer(devices: int, root: str, callbacks: list, **overrides: Any) -> Trainer:
    """A quiet CPU trainer on ``devices`` processes (DDP if more than one), TensorBoard logs in ``root/tb/version_0``."""
    kwargs = dict(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                  logger=TensorBoardLogger(root, name="tb", version=0), enable_progress_bar=False,
                  enable_model_summary=False, callbacks=callbacks, default_root_dir=root)
    kwargs.update(overrides)
    return Trainer(**kwargs)


def write_result(out: str, result: dict) -> None:
    """Write one rank's ``result`` (it holds its ``"rank"``) to ``<out>.rank<r>.json``."""
    Path(f"{out}.rank{result['rank']}.json").write_text(json.dumps(result))


def read_scalars(log_dir: str) -> dict[str, float]:
    """Last value of every scalar in the TensorBoard event files under ``log_dir``."""
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


# -------------------------------------------------------------------------------------------------- in the test
def load_script(path: Path) -> ModuleType:
    """Import the script at ``path`` as a module (for the one-process run in the test's own process)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(script: Path, *args: str, cwd: Path, quiet: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python script *args`` in ``cwd`` on a free local port; assert it exits with 0 (stderr's tail if not).

    ``quiet``: ignore warnings (tests that read a warning from stderr pass False). A timeout, not a hang: a rank that
    dies or waits forever in a collective fails the test.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    if quiet:
        env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_results(out: Path, devices: int = 2) -> list[dict]:
    """What ranks ``0 .. devices - 1`` wrote with :func:`write_result`."""
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(devices)]


def run(script: Path, root: Path, *args: str, devices: int = 2, quiet: bool = True) -> list[dict]:
    """Launch ``script`` on ``devices`` processes with its logs in ``root``; every rank's result, in rank order."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / "result"
    launch(script, "--devices", str(devices), "--out", str(out), "--root", str(root), *args, cwd=root, quiet=quiet)
    return read_results(out, devices)
