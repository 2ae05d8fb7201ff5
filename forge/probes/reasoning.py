"""Reasoning probe (A1): small fixed QA items scored by exact match of the final number.

GSM8K items come from the held-out split: the problem and its worked solution up to the '####' marker form
the prompt; the answer is the final number and the document's end (eos). Reading the result off the worked
solution is the simplest reasoning step a 25M model can learn; a model whose objective drifts away from
the task (A1: perplexity falls, this does not rise) fails it.
Arithmetic items "a + b =" -> " c" then a newline test the same skill without GSM8K in the mixture.
valid/reasoning_accuracy is the exact-match share over all items (scoring.py).
"""
from __future__ import annotations

import re
from typing import Iterable

import torch

from forge.probes.scoring import Item

FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")
ARITHMETIC_RANGE = 50     # operands 0..49: sums need at most two digits


def gsm8k_items(texts: Iterable[str], tokenizer, n: int, kind: str = "gsm8k") -> list[Item]:
    """The first n held-out documents that end in '#### N': prompt = text up to '####', answer = ' N' + eos.
    Documents without a final answer are skipped."""
    items = []
    for text in texts:
        if len(items) == n:
            break
        match = FINAL_ANSWER.search(text.rstrip())
        if match is None:
            continue
        marker_end = match.start() + len("####")
        prompt = tokenizer.encode(text[:marker_end])
        answer = tokenizer.encode(" " + match.group(1)) + [tokenizer.eos_id]
        items.append(Item(tuple(prompt), tuple(answer), kind))
    return items


def arithmetic_items(tokenizer, n: int, generator: torch.Generator, kind: str = "arithmetic") -> list[Item]:
    """n items 'a + b =' -> ' a+b' then a newline, operands drawn with `generator`."""
    operands = torch.randint(0, ARITHMETIC_RANGE, (n, 2), generator=generator).tolist()
    return [Item(tuple(tokenizer.encode(f"{a} + {b} =")), tuple(tokenizer.encode(f" {a + b}\n")), kind)
            for a, b in operands]
