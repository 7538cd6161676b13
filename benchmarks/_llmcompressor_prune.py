"""Prune a saved causal LM with vllm-project/llm-compressor (run by oneshot_lm.py in the
interpreter of llm-compressor's own venv; admmprune is not imported here).

    PY _llmcompressor_prune.py MODEL_DIR CALIBRATION.pt sparsegpt|wanda SPARSITY N:M OUT_DIR \
        TOKENIZER.json

CALIBRATION.pt holds the [samples, seq_len] token windows oneshot_lm.py prunes with;
``N:M`` is ``0:0`` for unstructured. SparseGPT's dampening is set to 0.01 of the mean Hessian
diagonal, as admmprune's default (llm-compressor's own default is 0.001).
"""

import sys

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def main() -> None:
    model_dir, calib, method, sparsity, structure, out, tokenizer = sys.argv[1:8]
    windows = torch.load(calib, weights_only=True)
    ds = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    common = {
        "sparsity": float(sparsity),
        "mask_structure": structure,
        "targets": ["Linear"],
        "ignore": ["re:.*lm_head"],
    }
    if method == "sparsegpt":
        recipe = SparseGPTModifier(**common, dampening_frac=0.01, block_size=128)
    else:
        recipe = WandaPruningModifier(**common)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    oneshot(
        model=model,
        tokenizer=PreTrainedTokenizerFast(tokenizer_file=tokenizer),
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(windows),
        max_seq_length=windows.shape[1],
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(out, save_compressed=False)


if __name__ == "__main__":
    main()
