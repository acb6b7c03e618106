"""Multi-process training through accelerate under torchrun (spec llm.md section 6, "Multi-GPU").

Two CPU processes with the gloo backend train the same small GPT-2 student as one process does
(DDP, FSDP, and DeepSpeed ZeRO-2 when the optional `deepspeed` package is installed):
each process takes half of every batch, the loss is normalised by the response tokens of the
whole batch (summed over processes) and the engine averages gradients, so the final weights
match the single-process run up to floating-point summation order.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import TRAIN_SCRIPT, _config, _records, _weights, _write_config, assets  # noqa: E402,F401

sys.path.pop(0)

from llm import train as trainer  # noqa: E402
from llm.config import load_config  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Adam with a large epsilon is nearly SGD (update ~ lr g / eps): rounding noise in near-zero
# gradients is not blown up to a full step, and a wrong gradient scale would show.
OVERRIDES = dict(max_steps=4, grad_accum=2, **{"eval.every": 2, "optim.lr": 0.1, "optim.eps": 0.01})


@pytest.fixture(scope="module")
def one_process_run(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_process")
    return trainer.train(load_config(_write_config(tmp, _config(assets, tmp, **OVERRIDES))))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "deepspeed"])
def test_two_gloo_processes_match_one_process(assets, one_process_run, tmp_path, engine):
    """`torchrun --nproc_per_node=2` with distributed=ddp|fsdp|deepspeed (ZeRO-2) against distributed=none.

    Compared: every weight of the final checkpoint (to 1e-6 absolute, while the largest weight
    moves by more than 1e-3) and the logged per-step loss and true forward KL (to 1e-5 relative).
    Validation runs during training (eval.every=2), so the main-process generation and score
    broadcast are exercised too."""
    reference = one_process_run
    path = _write_config(tmp_path, _config(assets, tmp_path, distributed=engine, **OVERRIDES), "two.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         str(TRAIN_SCRIPT), "--config", str(path)],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path,
    )
    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        # without the optional package the run is refused at start, saying how to get it
        assert result.returncode != 0 and "needs the deepspeed package" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs" / "run"
    got, want = _weights(run_dir), _weights(reference["run_dir"])
    assert got.keys() == want.keys()
    initial = _weights_of_student(assets)
    moved = max((want[k] - initial[k]).abs().max().item() for k in want)
    assert moved > 1e-3  # training moved the weights, so agreement is not trivial
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    two, one = _records(run_dir), _records(reference["run_dir"])
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        assert a["examples_seen"] == b["examples_seen"]
        for key in ("loss", "fkl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5)
    assert [r["step"] for r in _records(run_dir, "valid")] == [2, 4]


def _weights_of_student(assets) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(assets["student"]) / "model.safetensors"))
