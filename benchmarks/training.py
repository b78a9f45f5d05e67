"""Training speed of the default subjects' teachers by layout and precision (``make bench-training``).

``operators.training.fit`` trains image models in channels_last and, on a CPU with bfloat16 units, runs the
forward pass under bfloat16 autocast; this shows why, side by side in one run: per subject, training items
per second over ``--seconds`` of full steps (forward, loss, backward, AdamW) on random inputs of the
subject's shape, at ``--threads`` threads (1: what each worker of ``make models --jobs 2`` gets), each mode
in turn, ``--rounds`` times, the median kept. Modes: images NCHW-contiguous, channels_last, and
channels_last with bfloat16 autocast; token sequences (MiniLM at the mean training width, 34 tokens)
float32 and bfloat16. Goals: channels_last ≥ 1.1× contiguous; where the CPU has bfloat16 units, bfloat16
≥ 1.3× float32 (where it has none, bfloat16 is emulated and not measured). The last line printed is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from operators.subjects import SUBJECTS, FashionSegmenter, FortunesText, Subject
from operators.training import bf16_supported, to_layout

LAYOUT_GOAL = 1.1
BF16_GOAL = 1.3
TEXT_TOKENS = 34  # the fortunes teacher's mean batch width in length buckets


@dataclass(frozen=True)
class Mode:
    layout: torch.memory_format
    bf16: bool


IMAGE_MODES = {
    "contiguous": Mode(torch.contiguous_format, False),
    "channels_last": Mode(torch.channels_last, False),
    "channels_last_bf16": Mode(torch.channels_last, True),
}
TEXT_MODES = {"float32": Mode(torch.contiguous_format, False), "bfloat16": Mode(torch.contiguous_format, True)}
# (faster mode, slower mode, goal) per ratio reported
IMAGE_RATIOS = {
    "layout": ("channels_last", "contiguous", LAYOUT_GOAL),
    "bf16": ("channels_last_bf16", "channels_last", BF16_GOAL),
}
TEXT_RATIOS = {"bf16": ("bfloat16", "float32", BF16_GOAL)}


def batch_of(subject: Subject) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random inputs (by argument name) and targets of the subject's shapes, at its training batch."""
    if isinstance(subject, FortunesText):
        ids = torch.randint(1000, 20000, (subject.batch, TEXT_TOKENS))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return inputs, torch.randint(0, 8, (subject.batch,))
    if isinstance(subject, FashionSegmenter):
        return {"image": torch.randn(subject.batch, 1, 64, 64)}, torch.randint(0, 11, (subject.batch, 64, 64))
    return {"image": torch.randn(subject.batch, 1, 28, 28)}, torch.randint(0, 10, (subject.batch,))


def items_per_s(subject: Subject, mode: Mode, seconds: float) -> float:
    net = to_layout(subject.teacher_net(), mode.layout).train()
    inputs, targets = batch_of(subject)
    inputs = {k: v.contiguous(memory_format=mode.layout) if v.ndim == 4 else v for k, v in inputs.items()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.bf16):
            logits = net(**inputs).float()
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # oneDNN picks and caches its kernels on the first steps
        step()
    started, items = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        step()
        items += subject.batch
    return items / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subject", action="append", choices=sorted(SUBJECTS), help="default: every subject")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = bf16_supported()
    if not bf16:
        print("this CPU has no bfloat16 units: make models trains in float32; bfloat16 is not measured", flush=True)
    result: dict[str, dict[str, float]] = {}
    met = True
    for subject in [SUBJECTS[name] for name in args.subject or SUBJECTS]:
        text = isinstance(subject, FortunesText)
        modes = {k: m for k, m in (TEXT_MODES if text else IMAGE_MODES).items() if bf16 or not m.bf16}
        speeds: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.rounds):
            for name, mode in modes.items():
                speeds[name].append(items_per_s(subject, mode, args.seconds))
        median = {name: statistics.median(v) for name, v in speeds.items()}
        row: dict[str, float] = {f"{name}_items_per_s": round(v, 1) for name, v in median.items()}
        for ratio_name, (faster, slower, goal) in (TEXT_RATIOS if text else IMAGE_RATIOS).items():
            if faster in median:
                row[f"{ratio_name}_ratio"] = round(median[faster] / median[slower], 3)
                met = met and row[f"{ratio_name}_ratio"] >= goal
        result[subject.name] = row
        print(f"{subject.name:16} " + "   ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print(json.dumps({"benchmark": "training-speed", "threads": args.threads, "bf16_units": bf16,
                      "goals": {"layout_ratio": LAYOUT_GOAL, "bf16_ratio": BF16_GOAL}, "met": met,
                      "subjects": result}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
