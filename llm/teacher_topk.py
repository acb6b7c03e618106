"""The teacher top-k cache (spec llm.md section 6): the teacher's k most likely tokens, their
log-probabilities and the log of the remaining (tail) mass at every response token of the fixed
responses a run trains on (gold or cached teacher samples), computed once and stored under
`cache_dir/teacher_topk/`. Off-policy token-level batches then run on the sparse teacher
(llm.losses.topk_buckets: the top-k tokens one by one and the tail as one bucket) and never run
the teacher at train time.

One file per (teacher, k, sequence limits), a safetensors file written atomically: `ids`
(M, k) int32, `logp` (M, k) and `tail` (M,) float32 over the M cached response tokens, and
`rows` / `offsets` naming the sequences they belong to. A sequence is known by the digest of its
token ids and response start, so the data is covered row by row: rows a run needs and the file
lacks are computed and the file rewritten with them. The header records the key and a
fingerprint of the teacher's weights; a file whose header names another teacher (weights changed
under the same name) or that cannot be read whole (torn) is refused, with the command that
rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llm import losses
from llm.cache import cache_lock
from llm.run import Run, digest, teacher_logits

VERSION = 1


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the teacher's weights: every tensor's name, shape and sum, and a strided sample of its values."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().flatten().float()
            sample = flat[:: max(1, flat.numel() // 4096)]
            h.update(f"{name}{tuple(tensor.shape)}{float(flat.sum()):.6e}".encode())
            h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def row_keys(batch: dict) -> list[int]:
    """One 63-bit key per sequence of an encoded batch: its real token ids and its response start."""
    keys = []
    for ids, attention, keep in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                    batch["keep"].tolist()):
        real = [t for t, a in zip(ids, attention) if a]
        text = json.dumps([real, keep.index(True), sum(keep)]).encode()
        keys.append(int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1)
    return keys


@dataclass
class TeacherTopK:
    """A loaded cache: `lookup(batch)` gives the packed (N, k) ids, (N, k) log-probs and (N,) tail of a batch."""

    path: Path
    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor
    index: dict  # row key -> (start, end) into the token axis
    rebuild: str

    def lookup(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spans = []
        for key, length in zip(row_keys(batch), batch["keep"].sum(1).tolist()):
            span = self.index.get(key)
            if span is None or span[1] - span[0] != length:
                raise ValueError(f"teacher top-k cache {self.path} does not hold a sequence of this batch; it is "
                                 f"stale: {self.rebuild}")
            spans.append(torch.arange(*span))
        where = torch.cat(spans)
        return self.ids[where].to(device), self.logp[where].to(device), self.tail[where].to(device)


def cache_path(run: Run) -> tuple[Path, str]:
    cfg = run.cfg
    key = digest("teacher_topk", VERSION, cfg.teacher, cfg.teacher_dtype, cfg.kd.teacher_topk,
                 cfg.data.max_prompt_tokens, cfg.data.max_length)
    return run.cache_dir / "teacher_topk" / f"{key}.safetensors", key


def _read(path: Path, key: str, fingerprint: str, rebuild: str) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in ("ids", "logp", "tail", "rows", "offsets")}
    except (SafetensorError, OSError, KeyError) as err:
        raise ValueError(f"teacher top-k cache {path} is torn or unreadable ({err}): {rebuild}") from None
    if meta.get("key") != key or meta.get("teacher_fingerprint") != fingerprint:
        raise ValueError(f"teacher top-k cache {path} was built for another teacher or setting (its key "
                         f"{meta.get('key')}, teacher {meta.get('teacher_fingerprint')}; this run's {key}, "
                         f"{fingerprint}); it is stale: {rebuild}")
    offsets, m = tensors["offsets"], tensors["ids"].shape[0]
    if (offsets.numel() != tensors["rows"].numel() + 1 or int(offsets[-1]) != m or tensors["logp"].shape[0] != m
            or tensors["tail"].shape[0] != m):
        raise ValueError(f"teacher top-k cache {path} is torn (its offsets do not match its {m} tokens): {rebuild}")
    return tensors


def _write(path: Path, tensors: dict, key: str, fingerprint: str, k: int) -> None:
    from safetensors.torch import save

    from llm.checkpoint import atomic_write_bytes

    meta = {"key": key, "teacher_fingerprint": fingerprint, "k": str(k), "version": str(VERSION)}
    atomic_write_bytes(path, save({n: t.contiguous() for n, t in tensors.items()}, metadata=meta))


def teacher_topk_cache(run: Run, batches) -> TeacherTopK:
    """The cache of `run.cfg.kd.teacher_topk`, holding every sequence of `batches` (encoded batches
    of the fixed responses, as the objective's off-policy micro-batches encode them). The main
    process computes the missing sequences; the others wait, then everyone loads the file."""
    k = run.cfg.kd.teacher_topk
    path, key = cache_path(run)
    fingerprint = teacher_fingerprint(run.teacher)
    rebuild = f"delete it (rm {path}) and run again to rebuild it"
    if run.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        with cache_lock(path):
            have = _read(path, key, fingerprint, rebuild) if path.is_file() else None
            known = set() if have is None else set(have["rows"].tolist())
            new = {"ids": [], "logp": [], "tail": [], "rows": [], "lengths": []}
            for batch in tqdm(batches, desc=f"teacher top-{k} cache (computed once)", leave=False):
                keys, lengths = row_keys(batch), batch["keep"].sum(1).tolist()
                wanted = [i for i, r in enumerate(keys) if r not in known]
                if not wanted:
                    continue
                sub = {name: value[wanted] for name, value in batch.items()}
                ids, logp, tail = losses.teacher_topk(teacher_logits(run, sub)[sub["response_mask"].bool()], k)
                new["ids"].append(ids.int().cpu())
                new["logp"].append(logp.float().cpu())
                new["tail"].append(tail.float().cpu())
                new["rows"] += [keys[i] for i in wanted]
                new["lengths"] += [lengths[i] for i in wanted]
                known |= {keys[i] for i in wanted}
            if new["rows"]:
                old = have or {"ids": torch.zeros(0, k, dtype=torch.int32), "logp": torch.zeros(0, k),
                               "tail": torch.zeros(0), "rows": torch.zeros(0, dtype=torch.int64),
                               "offsets": torch.zeros(1, dtype=torch.int64)}
                added = torch.tensor(new["lengths"], dtype=torch.int64).cumsum(0) + old["offsets"][-1]
                _write(path, {"ids": torch.cat([old["ids"], *new["ids"]]),
                              "logp": torch.cat([old["logp"], *new["logp"]]),
                              "tail": torch.cat([old["tail"], *new["tail"]]),
                              "rows": torch.cat([old["rows"], torch.tensor(new["rows"], dtype=torch.int64)]),
                              "offsets": torch.cat([old["offsets"], added])}, key, fingerprint, k)
    run.accelerator.wait_for_everyone()
    tensors = _read(path, key, fingerprint, rebuild)
    offsets = tensors["offsets"].tolist()
    index = {row: (offsets[i], offsets[i + 1]) for i, row in enumerate(tensors["rows"].tolist())}
    return TeacherTopK(path, tensors["ids"], tensors["logp"], tensors["tail"], index, rebuild)
