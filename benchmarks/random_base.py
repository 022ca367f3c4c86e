"""Random-init Llama-architecture bases of real sizes, for GPU runs where no weights can be downloaded.

The tokenizer is the demo base's (trained on the shipped corpus, so the demo data tokenizes as in the demo);
the weights are random, in bf16, saved as a HF model dir (safetensors) that every lora_search path loads like a
hub checkpoint. Quality figures from such a base mean nothing; speed and memory figures are real.

    python benchmarks/random_base.py 1b /tmp/llama-1b
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

SHAPES: dict[str, dict[str, int | float | bool]] = {
    # Llama-3-8B's shape (GQA 32/8, 128,256 vocabulary): 8.03B parameters.
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    # A few MiB: for checking the benchmarks' own code on a CPU.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
    },
    # SmolLM2-135M's shape (sweeps/smollm2.py's base: GQA 9/3, tied embeddings): 0.13B parameters. Its speed on a
    # GPU without the GGUF and its set-up calls; the weights are random, so only speed and memory mean anything.
    "135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    # TinyLlama-1.1B's shape (Llama-2 architecture, GQA 32/4): 1.10B parameters at a 32,000 vocabulary.
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
    },
}


def build(shape: str, dest: Path, seed: int = 0) -> Path:
    """Write a random-init Llama of `shape` with the demo tokenizer to `dest` (kept if it already holds one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_search.demo_base import TOKENIZER_DOCS, VOCAB_SIZE, _story, _train_tokenizer

    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    start = time.monotonic()
    rng = random.Random(f"corpus-{seed}")
    sizes = SHAPES[shape]
    tok = _train_tokenizer(
        [_story(rng) for _ in range(TOKENIZER_DOCS)], VOCAB_SIZE, int(sizes["max_position_embeddings"])
    )
    config = LlamaConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sizes
    )
    config.dtype = torch.bfloat16
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    params = sum(p.numel() for p in model.parameters())
    (dest / "random_base.json").write_text(json.dumps({"shape": shape, "params": params, "seed": seed}) + "\n")
    print(f"[random_base] {shape}: {params / 1e9:.2f}B params in {time.monotonic() - start:.0f}s -> {dest}", flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dest


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]))
