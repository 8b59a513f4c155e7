"""Weights on disk as safetensors, read and written one tensor at a time.

A model's weights are either one `model.safetensors` or, above `max_shard_bytes`, shards
`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json` (the Hugging Face
layout). Neither side ever holds the whole state dict: the reader memory-maps a file and
materialises only the tensor asked for; the writer keeps at most one shard in memory. That is
what lets a 70B model (~140 GB in bf16) be loaded into a ZeRO-3 partitioned module and exported
by a host with far less memory. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Checksum of a saved file (weights, checkpoint shards, artifact files), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_files(path: str | Path) -> tuple[dict[str, Path], Path]:
    """name -> file for a .safetensors file, an index .json, or a directory holding either;
    also the location that was resolved (for messages)."""
    p = Path(path)
    if p.is_dir():
        if (p / INDEX).exists():
            p = p / INDEX
        elif (p / SINGLE).exists():
            p = p / SINGLE
        else:
            raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX} (pickled checkpoints are not loaded)")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such weights file")
    if p.suffix == ".json":
        weight_map = json.loads(p.read_text())["weight_map"]
        return {name: p.parent / f for name, f in weight_map.items()}, p
    if p.suffix != ".safetensors":
        raise ValueError(f"{p}: weights must be safetensors (pickled checkpoints are not loaded)")
    with safe_open(str(p), framework="pt") as f:
        return dict.fromkeys(f.keys(), p), p


class WeightsReader:
    """Lazy access to saved weights: `reader[name]` reads one tensor from its (memory-mapped)
    file. Use as a context manager, or call close()."""

    def __init__(self, path: str | Path):
        self.files, self.location = weights_files(path)
        self._open: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{self.location}: no tensor {name!r}")
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.files:
            yield name, self[name]

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> WeightsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole state dict (small models: tests, the tiny preset's samplers and judges)."""
    with WeightsReader(path) as r:
        return dict(r.items())


class ShardedWriter:
    """Write tensors one by one into shards of at most `max_shard_bytes` (one shard in memory
    at a time); close() names them and writes the index, or a single `model.safetensors`
    when everything fit in one shard. Returns the path a WeightsReader opens."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 dtype: torch.dtype | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.dtype = max_shard_bytes, dtype
        self._current: dict[str, torch.Tensor] = {}
        self._size = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self._total = 0

    def _tmp(self, k: int) -> Path:
        return self.out / f".shard-{k:05d}.safetensors.tmp"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu", self.dtype or tensor.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if self._current and self._size + nbytes > self.max_bytes:
            self._flush()
        self._current[name] = t
        self._size += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        save_file(self._current, str(self._tmp(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._current))
        self._current, self._size = {}, 0

    def close(self) -> Path:
        if self._current or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._tmp(0), self.out / SINGLE)
            return self.out / SINGLE
        weight_map = {}
        for k, names in enumerate(self._shards):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp(k), self.out / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = self.out / INDEX
        index.write_text(json.dumps({"metadata": {"total_size": self._total}, "weight_map": weight_map}, indent=2))
        return index


def load_into(module: torch.nn.Module, path: str | Path, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None, rename=None) -> torch.nn.Module:
    """Fill `module` tensor by tensor from saved weights, each parameter and buffer allocated
    directly on `device` in `dtype` (floating-point tensors only; default: as saved).

    Build the module on the meta device (`with torch.device("meta"):`) so nothing is allocated
    before this: host memory never holds more than one tensor, and a bf16 model on a GPU never
    exists in fp32 anywhere. `rename` maps a module name to its name in the file (HF import).
    Every parameter must be in the file."""
    rename = rename or (lambda n: n)
    with WeightsReader(path) as reader:
        wanted = [(n, t, True) for n, t in module.named_parameters()] + \
                 [(n, t, False) for n, t in module.named_buffers()]
        missing = [n for n, _, is_param in wanted if is_param and rename(n) not in reader]
        if missing:
            raise ValueError(f"{reader.location}: no weights for {missing[:5]} ({len(missing)} missing)")
        for name, old, is_param in wanted:
            if rename(name) not in reader:
                continue  # a buffer the file does not carry keeps its value
            src = reader[rename(name)]
            if tuple(src.shape) != tuple(old.shape):
                raise ValueError(f"{reader.location}: {rename(name)} has shape {tuple(src.shape)}, "
                                 f"the model expects {tuple(old.shape)}")
            target = device if device is not None else ("cpu" if old.is_meta else old.device)
            t = src.to(device=target, dtype=dtype if dtype is not None and src.is_floating_point() else src.dtype)
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if is_param:
                owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=old.requires_grad)
            else:
                owner._buffers[leaf] = t
            del src
    return module
