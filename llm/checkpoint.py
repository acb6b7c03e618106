"""What a run writes that a resume must agree with (spec llm.md section 6, "Running it").

Checkpoints: a folder per step, written under a temporary name, renamed, then the `latest`
link is swapped atomically. Weights as safetensors; per-process optimiser/scheduler/RNG state
with torch.save (loaded with weights_only=True); counters as JSON. The best student by
validation score is `checkpoints/best`, an HF-loadable folder. The metrics log drops the
records of steps a crash undid. :func:`check_resumable` refuses a resume whose settings would
change the run's trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm.config import TrainConfig, to_dict
from llm.objectives.base import Objective
from llm.run import Run, TrainState


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_link(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target_name)
    os.replace(tmp, link)


def rng_state() -> dict:
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["keys"]), p["gauss"]))


def save_model_folder(run: Run, folder: Path, weights: dict | None, metadata: dict) -> None:
    """An HF-loadable folder: model.safetensors (atomic), config, generation config, tokenizer."""
    if not run.accelerator.is_main_process:
        return
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items() if k not in run.tied_parameter_names}
    tmp = folder / ".model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt", **{k: str(v) for k, v in metadata.items()}})
    os.replace(tmp, folder / "model.safetensors")
    unwrapped = run.accelerator.unwrap_model(run.student)
    atomic_write_bytes(folder / "config.json", unwrapped.config.to_json_string().encode())
    if getattr(unwrapped, "generation_config", None) is not None:
        atomic_write_bytes(folder / "generation_config.json", unwrapped.generation_config.to_json_string().encode())
    run.tokenizer.save_pretrained(str(folder))


def save_checkpoint(run: Run, state: TrainState, optimizer, scheduler, objective: Objective) -> Path:
    """Resumable checkpoint `checkpoints/step_XXXXXXXX`; the `latest` link moves only once it is complete."""
    acc, root = run.accelerator, run.run_dir / "checkpoints"
    name = f"step_{state.step:08d}"
    tmp = root / f".tmp_{name}"
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    weights = acc.get_state_dict(run.student)  # collective under FSDP/DeepSpeed
    save_model_folder(run, tmp, weights, {"step": state.step})
    trainer = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "objective": objective.state_dict(),
    }
    path = tmp / f"trainer_state_rank{run.rank}.pt"
    torch.save(trainer, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)
    acc.wait_for_everyone()
    if acc.is_main_process:
        info = {"state": dataclasses.asdict(state), "world_size": run.world, "config": to_dict(run.cfg)}
        atomic_write_bytes(tmp / "trainer_state.json", json.dumps(info, indent=2).encode())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_link(root / "latest", name)
        kept = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in kept[: max(0, len(kept) - run.cfg.keep_checkpoints)]:
            if old.name != name:
                shutil.rmtree(old)
    acc.wait_for_everyone()
    return root / name


def save_best(run: Run, state: TrainState) -> None:
    """The best-so-far student by the validation score (eval.select_by): `checkpoints/best`, a link
    swapped atomically."""
    acc, root = run.accelerator, run.run_dir / "checkpoints"
    name = f"best_step_{state.step:08d}"
    weights = acc.get_state_dict(run.student)
    if acc.is_main_process:
        tmp = root / f".tmp_{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        best = {"step": state.step, "select_by": run.cfg.eval.select_by, "valid_score": state.best_valid}
        save_model_folder(run, tmp, weights, best)
        atomic_write_bytes(tmp / "best.json", json.dumps(best).encode())
        os.replace(tmp, root / name)
        _atomic_link(root / "best", name)
        for old in root.glob("best_step_*"):
            if old.name != name:
                shutil.rmtree(old)
    acc.wait_for_everyone()


def read_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    link = run_dir / "checkpoints" / "latest"
    if not link.exists():
        raise ValueError(
            f"--resume: {run_dir} has no complete checkpoint (no checkpoints/latest); start without --resume")
    folder = link.resolve()
    return folder, json.loads((folder / "trainer_state.json").read_text())


# Keys a resumed run may change: they do not alter the training trajectory.
RESUME_MAY_CHANGE = ("out_dir", "stop_after", "log_every", "save_every", "keep_checkpoints", "num_threads",
                     "loss_chunk_tokens",
                     "eval.before", "eval.teacher", "eval.test_seeds", "eval.batch_size")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "student_config" else {prefix + k: v}
    return out


def check_resumable(cfg: TrainConfig, saved: dict, world: int) -> None:
    """A resumed run must continue the same trajectory: same processes, same data position, same settings."""
    if saved["world_size"] != world:
        raise ValueError(f"the checkpoint was written by {saved['world_size']} processes; resume with as many")
    if saved["state"]["examples_seen"] != saved["state"]["step"] * cfg.batch_size:
        raise ValueError(
            "the checkpoint's data position does not match batch_size; resume with the original batch_size")
    before, now = _flatten(saved["config"]), _flatten(to_dict(cfg))
    changed = sorted(k for k in set(before) | set(now)
                     if before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        listed = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed)
        raise ValueError(
            f"--resume with settings that change the run: {listed}; "
            f"only {', '.join(RESUME_MAY_CHANGE)} may differ. Start a new run (without --resume) to change the others."
        )


def load_weights(student: torch.nn.Module, folder: Path, tied: list[str]) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    missing, unexpected = student.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - set(tied):
        raise ValueError(
            f"checkpoint {folder} does not fit the student: missing {sorted(set(missing) - set(tied))}, "
            f"unexpected {sorted(unexpected)}; resume with the configuration the run was started with"
        )
    if tied:
        student.tie_weights()



class MetricsLog:
    """Metrics as JSON lines (`metrics.jsonl`) and TensorBoard scalars (`tb/`), main process only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():  # drop records of steps the crash undid
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, ("\n".join(kept) + "\n" if kept else "").encode())
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{split}/{k}", v, step)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.tb.close()

