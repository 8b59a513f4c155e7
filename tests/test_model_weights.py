"""Weights that scale: export streams tensor by tensor into HF-named shards, and samplers build
the model on its device in its dtype straight from the file (meta device, no fp32 detour)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.generate import load_model
from model.hf import export_hf, to_hf_name
from model.llama import Transformer
from model.weights import WeightsReader, load_into

SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=16, max_seq_len=64)
REPO = Path(__file__).resolve().parent.parent


def saved(tmp_path, cfg=SMALL, seed=0) -> tuple[Transformer, Path]:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_lazy_meta_loading_equals_eager_loading(tmp_path):
    eager, path = saved(tmp_path)
    lazy = load_model(SMALL, path, device="cpu", dtype=torch.float32)
    assert not any(p.is_meta for p in lazy.parameters())
    for (n, a), (m, b) in zip(eager.state_dict().items(), lazy.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    x = torch.randint(0, SMALL.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lazy(x), eager(x), atol=0, rtol=0)


def test_loading_goes_straight_to_the_target_dtype(tmp_path):
    eager, path = saved(tmp_path)
    half = load_model(SMALL, path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(half.output.weight, eager.output.weight.to(torch.bfloat16))


def test_load_into_names_missing_and_misshapen_tensors(tmp_path):
    _, path = saved(tmp_path)
    bigger = SMALL.model_copy(update={"vocab_size": 102})
    with torch.device("meta"):
        m = Transformer(bigger)
    with pytest.raises(ValueError, match="tok_embeddings.weight has shape"):
        load_into(m, path)
    with torch.device("meta"):
        deeper = Transformer(SMALL.model_copy(update={"n_layers": 3}))
    with pytest.raises(ValueError, match="layers.2"):
        load_into(deeper, path)


def test_export_streams_into_hf_named_bf16_shards(tmp_path):
    _, path = saved(tmp_path)
    out = export_hf(path, SMALL, tmp_path / "hf", dtype=torch.bfloat16, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 4 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    with WeightsReader(path) as src, WeightsReader(out) as dst:
        assert sorted(dst.keys()) == sorted(to_hf_name(k) for k in src.keys())
        for k in src.keys():
            assert dst[to_hf_name(k)].dtype == torch.bfloat16
            assert torch.equal(dst[to_hf_name(k)], src[k].to(torch.bfloat16))
        assert index["metadata"]["total_size"] == sum(2 * t.numel() for _, t in src.items())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # a re-export with one shard replaces the shards rather than leaving stale ones beside it
    export_hf(path, SMALL, out, dtype=torch.bfloat16)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    with pytest.raises(ValueError, match="holds the weights being exported"):  # never delete the source
        export_hf(out, SMALL, out)
    assert (out / "model.safetensors").exists()


MEASURE = r"""
import sys, threading, time, json
sys.path.insert(0, sys.argv[1])
import torch
from model.config import ModelConfig
from model.hf import export_hf

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

cfg = ModelConfig.model_validate_json(sys.argv[4])
peak, stop = [anon_kb()], False
def sample():
    while not stop:
        peak.append(anon_kb()); time.sleep(0.002)
base = anon_kb()
t = threading.Thread(target=sample); t.start()
export_hf(sys.argv[2], cfg, sys.argv[3], dtype=torch.bfloat16, max_shard_bytes=int(sys.argv[5]))
stop = True; t.join()
print(json.dumps({"peak_growth_bytes": (max(peak) - base) * 1024}))
"""


def test_export_peak_host_memory_is_one_tensor_plus_a_shard_not_the_model(tmp_path):
    """~300 MB of fp32 weights exported to bf16 in 24 MB shards: resident anonymous memory grows
    by about the largest tensor (read, then cast) plus one shard, far below the state dict."""
    cfg = ModelConfig(dim=768, n_layers=10, n_heads=12, n_kv_heads=4, vocab_size=8000, multiple_of=256,
                      max_seq_len=128)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    path = tmp_path / "big.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    model_bytes = path.stat().st_size
    largest = max(s.numel() for s in shapes.values()) * 4  # fp32 as read
    shard = 24 * 2**20
    res = subprocess.run([sys.executable, "-c", MEASURE, str(REPO), str(path), str(tmp_path / "hf"),
                          cfg.model_dump_json(), str(shard)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    growth = json.loads(res.stdout.strip().splitlines()[-1])["peak_growth_bytes"]
    bound = shard + largest + largest // 2 + 16 * 2**20  # a shard + the tensor read + its bf16 copy + slack
    print(f"model {model_bytes / 2**20:.0f} MB, largest tensor {largest / 2**20:.0f} MB, "
          f"shard {shard / 2**20:.0f} MB: peak growth {growth / 2**20:.0f} MB (bound {bound / 2**20:.0f} MB)")
    assert model_bytes > 280 * 2**20
    assert growth < bound < model_bytes / 2
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= 6
