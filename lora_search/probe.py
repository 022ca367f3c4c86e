"""The probe: a few eval prompts and a trial's next-token logits on them, saved beside every adapter.

It lets anyone check, in a fresh process, that an adapter reloaded with plain `PeftModel.from_pretrained`
computes exactly what the trial computed (a wrong base, a scaling bug or a half-saved adapter shows up):

    python -m lora_search.probe reports/tiny/adapters/<trial_id>
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_search import fastpath
from lora_search.layout import PROBE_FILE

if TYPE_CHECKING:
    import torch


def probe_batch(tokenizer: Any, eval_ds: Any, n: int = 2) -> list[torch.Tensor]:
    """Token ids of the first `n` eval prompts (chat prompts rendered with the tokenizer's template)."""
    out = []
    for row in eval_ds.select(range(min(n, len(eval_ds)))):
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(prompt, return_tensors="pt")["input_ids"])
    return out


def probe_logits(model: torch.nn.Module, probe: list[torch.Tensor]) -> torch.Tensor:
    """Last-position logits for each probe prompt, as float32 on the CPU: shape (n, vocab)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), fastpath.inference_attention(model):  # short forwards: never flex (fastpath)
        rows = [model(input_ids=ids.to(device)).logits[0, -1].float().cpu() for ids in probe]
    model.train(was_training)
    return torch.stack(rows)


def save_probe(model: torch.nn.Module, probe: list[torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"input_ids_{i}": ids[0].contiguous() for i, ids in enumerate(probe)}
    tensors["logits"] = probe_logits(model, probe)
    save_file(tensors, str(path))


def check_reload(adapter_dir: Path) -> float:
    """Reload `adapter_dir` on its recorded base with plain PEFT; return max |logits - trial logits|."""
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(Path(adapter_dir) / PROBE_FILE))
    config = PeftConfig.from_pretrained(str(adapter_dir))
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype="auto")
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    probe = [saved[f"input_ids_{i}"][None] for i in range(len(saved) - 1)]
    return float((probe_logits(model, probe) - saved["logits"]).abs().max())


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"{path}: max |logit diff| = {check_reload(Path(path)):.3g}")
