"""Training speed of the default vision subjects' teachers by activation layout (``make bench-training``).

``operators.training.fit`` trains image models in channels_last; this shows why, side by side in one run:
per subject, training items per second over ``--seconds`` of full steps (forward, loss, backward, AdamW) on
random inputs of the subject's shape, at ``--threads`` threads (1: what each worker of ``make models
--jobs 2`` gets), NCHW-contiguous then channels_last, alternating ``--rounds`` times, the median kept.
Goal: channels_last ≥ 1.1× contiguous on every subject. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn import functional as F

from operators.subjects import SUBJECTS, FashionClassifier, FashionSegmenter, Subject
from operators.training import to_layout

GOAL_RATIO = 1.1
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def batch_of(subject: Subject) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and targets of the subject's shapes, at its training batch."""
    if isinstance(subject, FashionSegmenter):
        return torch.randn(subject.batch, 1, 64, 64), torch.randint(0, 11, (subject.batch, 64, 64))
    return torch.randn(subject.batch, 1, 28, 28), torch.randint(0, 10, (subject.batch,))


def items_per_s(subject: Subject, layout: str, seconds: float) -> float:
    net = to_layout(subject.teacher_net(), LAYOUTS[layout]).train()
    inputs, targets = batch_of(subject)
    inputs = inputs.contiguous(memory_format=LAYOUTS[layout])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step() -> None:
        loss: torch.Tensor = F.cross_entropy(net(inputs), targets)
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
    parser.add_argument("--seconds", type=float, default=10.0, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    subjects = [s for s in SUBJECTS.values() if isinstance(s, FashionClassifier | FashionSegmenter)]
    result: dict[str, dict[str, float]] = {}
    for subject in subjects:
        speeds: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for _ in range(args.rounds):
            for layout in LAYOUTS:
                speeds[layout].append(items_per_s(subject, layout, args.seconds))
        median = {layout: statistics.median(v) for layout, v in speeds.items()}
        ratio = median["channels_last"] / median["contiguous"]
        result[subject.name] = {
            **{f"{k}_items_per_s": round(v, 1) for k, v in median.items()},
            "ratio": round(ratio, 3),
        }
        print(
            f"{subject.name:16} contiguous {median['contiguous']:7.1f} items/s   channels_last "
            f"{median['channels_last']:7.1f} items/s   ×{ratio:.2f}",
            flush=True,
        )
    met = all(r["ratio"] >= GOAL_RATIO for r in result.values())
    print(json.dumps({"benchmark": "training-layout", "threads": args.threads, "goal_ratio": GOAL_RATIO,
                      "met": met, "subjects": result}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
