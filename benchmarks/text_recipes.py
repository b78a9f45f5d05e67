"""Fine-tuning recipes for the fortunes teacher, chosen by cross-validation (``make bench-text-recipes``).

The build chooses a recipe on the 376 calibration texts (95 % CI about ±4 points), and after some fifteen such
choices that split flatters whatever won. This compares recipes with the noise taken out: stratified k-fold
cross-validation on the training split alone (calibration and evaluation are never read), every recipe on the
same folds, each fold's fit at the build's three epochs and bfloat16 setting, one thread per worker, the
workers side by side. Out of fold every training text is predicted once (2,634 of them), and each recipe is
compared with the build's recipe at seed 0 text by text: the mean of the per-text difference and its
standard error. Recipes:

- ``base``: the build's (``FortunesText.train_teacher``); at a second seed too, so that
- ``soup`` (uniform weight average of the two seeds' fits, Wortsman et al. 2022) and ``ensemble`` (mean of
  their logits: two models served, so a ceiling, not a candidate) can be read;
- ``tok128``: 128 tokens (head 32 + tail 96) instead of 64 (16 + 48);
- ``rdrop``: R-Drop (Liang et al. 2021): two dropout passes, cross-entropy on both plus their symmetric KL;
- ``selftrain``: self-training (Du et al. 2021): the fold's seed-0 fit labels the 35 other fortune files and
  the texts it is surest of (p ≥ 0.9, at most 30 % of each class's count) join a fresh fit;
- ``dapt``: masked-LM adaptation of the encoder on the other fortune files first (Gururangan et al. 2020;
  8,000 texts; no text of the eight topics, so one adapted encoder serves every fold).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn
from torch.nn import functional as F
from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

from operators import training
from operators.data import FORTUNE_CATEGORIES, FORTUNES_DIR, Samples, TokenizeFn, fortunes_split, read_fortunes
from operators.subjects import FULL, SUBJECTS, TEXT_LAYER_DECAY, FortunesText, head_tail, minilm_dir

FITTED = ("base", "tok128", "rdrop", "selftrain", "dapt")  # each fitted per fold
DERIVED = ("soup", "ensemble")  # read from base's fits at seeds 0 and 1
SELF_TRAIN_CONFIDENCE = 0.9
SELF_TRAIN_SHARE = 0.3  # of each class's training count
MLM_ITEMS = 8000
MLM_BATCH = 32
MLM_LR = 1e-4
_TEXT_SUBJECT = SUBJECTS["fortunes-minilm"]
assert isinstance(_TEXT_SUBJECT, FortunesText)
SUBJECT: FortunesText = _TEXT_SUBJECT


def tokenizer_for(max_tokens: int) -> TokenizeFn:
    """Head + tail truncation at ``max_tokens``, a quarter from the head (the subject's own is 64 = 16 + 48)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())

    def tokenize(texts: Sequence[str]) -> dict[str, np.ndarray]:
        ids = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        return head_tail(ids, max_tokens, max_tokens // 4, int(tokenizer.pad_token_id))

    return tokenize


def other_fortunes() -> list[str]:
    """The texts of every fortune file that is not one of the subject's eight topics."""
    texts: list[str] = []
    for file in sorted(FORTUNES_DIR.iterdir()):
        if file.is_file() and not file.suffix and file.name not in FORTUNE_CATEGORIES:
            texts += read_fortunes(file)
    return texts


def training_split(max_tokens: int) -> Samples:
    return fortunes_split(tokenizer_for(max_tokens), FULL.seed, FULL.fortunes_limit).train


def folds(targets: np.ndarray, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(StratifiedKFold(count, shuffle=True, random_state=0).split(np.zeros(len(targets)), targets))


def fit_settings(seed: int, fold_items: int, train_items: int, scale: float) -> training.FitSettings:
    """The build's teacher settings at the build's number of epochs (× ``scale``) for a fold of ``fold_items``
    texts."""
    items = SUBJECT.items(FULL.train_items)
    settings = replace(SUBJECT.fit_settings(items, FULL), layer_decay=TEXT_LAYER_DECAY, precision="bfloat16")
    return replace(settings, seed=seed, items=round(items * scale * fold_items / train_items))


def rdrop_fit(model: nn.Module, samples: Samples, settings: training.FitSettings, kl_weight: float = 1.0) -> nn.Module:
    """``training.fit`` with R-Drop's loss: the batch through the model twice (two dropout masks). Written out
    here because ``fit`` takes no loss, and giving it one would change the build key (every model rebuilt) for
    a recipe the build does not use."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    groups = training.parameter_groups(model, settings)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.items // settings.batch
    max_lr = [float(g["lr"]) for g in groups]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps, pct_start=0.15)
    model.train()
    batches = training.batch_indices(samples, settings.batch, rng)
    for _ in range(steps):
        index = next(batches)
        inputs = training._batch(samples, index, torch.contiguous_format)  # as fit cuts a token batch
        targets = torch.from_numpy(samples.targets[index])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first, second = model(**inputs).float(), model(**inputs).float()
        log_p, log_q = F.log_softmax(first, 1), F.log_softmax(second, 1)
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
        kl = 0.5 * (kl + F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
        loss = 0.5 * (F.cross_entropy(first, targets) + F.cross_entropy(second, targets)) + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def adapt_encoder(path: Path, scale: float) -> float:
    """Masked-LM adaptation of the pretrained encoder on the other fortune files; its weights to ``path``.
    The checkpoint carries no MLM head, so transformers starts one from scratch. Returns the seconds taken."""
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    token_ids = tokenizer(other_fortunes(), truncation=True, max_length=64)["input_ids"]
    model = BertForMaskedLM.from_pretrained(minilm_dir())
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=MLM_LR, weight_decay=0.01)
    steps = max(1, round(MLM_ITEMS * scale) // MLM_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=MLM_LR, total_steps=steps, pct_start=0.1)
    model.train()
    order: list[int] = []
    for _ in range(steps):
        if len(order) < MLM_BATCH:  # epochs of the corpus, each in a fresh order
            order = rng.permutation(len(token_ids)).tolist()
        batch = collate([{"input_ids": token_ids[order.pop()]} for _ in range(MLM_BATCH)])
        mask = (batch["input_ids"] != tokenizer.pad_token_id).long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    torch.save(model.bert.state_dict(), path)
    return time.perf_counter() - started


def self_train_set(teacher: nn.Module, train: Samples) -> Samples:
    """``train`` plus the other fortune texts ``teacher`` is surest of, labelled by it."""
    texts = other_fortunes()
    inputs = SUBJECT.tokenize(texts)
    order = np.argsort(inputs["attention_mask"].sum(1), kind="stable")  # by length: each batch cut to its longest
    logits = np.empty((len(texts), len(FORTUNE_CATEGORIES)), np.float32)
    unlabelled = Samples({k: v[order] for k, v in inputs.items()}, np.zeros(len(texts), np.int64))
    logits[order] = training.predict(teacher, unlabelled, batch=64)
    probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
    confidence, label = probabilities.max(1), probabilities.argmax(1)
    counts = np.bincount(train.targets, minlength=len(FORTUNE_CATEGORIES))
    chosen: list[int] = []
    for category, count in enumerate(counts):
        sure = np.flatnonzero((label == category) & (confidence >= SELF_TRAIN_CONFIDENCE))
        chosen += sure[np.argsort(-confidence[sure])][: int(SELF_TRAIN_SHARE * count)].tolist()
    picked = np.sort(np.asarray(chosen, dtype=np.int64))
    return Samples(
        {k: np.concatenate([train.inputs[k], inputs[k][picked]]) for k in inputs},
        np.concatenate([train.targets, label[picked]]),
    )


def run_fold(recipe: str, seed: int, fold: int, *, fold_count: int, work: Path, scale: float) -> dict[str, float]:
    """One recipe's fit on one fold (in a worker, one thread); its out-of-fold logits to ``work``."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    train = training_split(128 if recipe == "tok128" else 64)
    fit_index, held_index = folds(train.targets, fold_count)[fold]
    fit_on, held = train.take(fit_index), train.take(held_index)
    settings = fit_settings(seed, len(fit_on), len(train), scale)
    model = SUBJECT.teacher_net()
    if recipe == "rdrop":
        model = rdrop_fit(model, fit_on, settings)
    else:
        if recipe == "dapt":
            model.get_submodule("encoder").load_state_dict(torch.load(work / "dapt-encoder.pt"), strict=False)
        if recipe == "selftrain":
            model.load_state_dict(torch.load(work / f"base-s0-f{fold}.pt"))
            fit_on = self_train_set(model, fit_on)
            model = SUBJECT.teacher_net()
        model = training.fit(model, fit_on, settings)
    if recipe == "base":
        torch.save(model.state_dict(), work / f"base-s{seed}-f{fold}.pt")
    logits = training.predict(model, held, batch=64)
    np.savez(work / f"{recipe}-s{seed}-f{fold}.npz", logits=logits, index=held_index)
    return {"accuracy_pct": float((logits.argmax(1) == held.targets).mean() * 100), "s": time.perf_counter() - started}


def soup_fold(fold: int, fold_count: int, work: Path) -> None:
    """The uniform soup of base's seed-0 and seed-1 fits on one fold, predicted on its held-out texts."""
    torch.set_num_threads(1)
    train = training_split(64)
    held_index = folds(train.targets, fold_count)[fold][1]
    first, second = (torch.load(work / f"base-s{seed}-f{fold}.pt") for seed in (0, 1))
    model = SUBJECT.teacher_net()
    assert isinstance(first, dict) and isinstance(second, dict)
    model.load_state_dict({k: (v + second[k]) / 2 if v.is_floating_point() else v for k, v in first.items()})
    logits = training.predict(model, train.take(held_index), batch=64)
    np.savez(work / f"soup-s0-f{fold}.npz", logits=logits, index=held_index)


def out_of_fold(work: Path, name: str, targets: np.ndarray, fold_count: int) -> np.ndarray:
    logits = np.zeros((len(targets), len(FORTUNE_CATEGORIES)), np.float32)
    for fold in range(fold_count):
        saved = np.load(work / f"{name}-f{fold}.npz")
        logits[saved["index"]] = saved["logits"]
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(FITTED + DERIVED), help="comma-separated; base is always run")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="workers side by side, one thread each")
    parser.add_argument("--scale", type=float, default=1.0, help="of every fit's items (a quick look: 0.05)")
    parser.add_argument("--work", type=Path, default=Path("results/text-recipes"))
    args = parser.parse_args()
    wanted = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(wanted) - set(FITTED + DERIVED))
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(FITTED + DERIVED)}")
    args.work.mkdir(parents=True, exist_ok=True)
    base_seeds = (0, 1) if set(wanted) & set(DERIVED) else (0,)
    first = [("base", seed) for seed in base_seeds] + [(r, 0) for r in ("tok128", "rdrop") if r in wanted]
    then = [(r, 0) for r in ("selftrain", "dapt") if r in wanted]  # need base's seed-0 fits / the adapted encoder
    seconds: dict[str, float] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        adapting = pool.submit(adapt_encoder, args.work / "dapt-encoder.pt", args.scale) if "dapt" in wanted else None
        for phase in (first, then):
            if phase is then and adapting is not None:
                seconds["dapt-mlm"] = adapting.result()
            jobs = {
                (r, s, f): pool.submit(run_fold, r, s, f, fold_count=args.folds, work=args.work, scale=args.scale)
                for r, s in phase
                for f in range(args.folds)
            }
            for (recipe, seed, fold), job in jobs.items():
                result = job.result()
                seconds[f"{recipe}-s{seed}"] = seconds.get(f"{recipe}-s{seed}", 0.0) + result["s"]
                print(
                    f"{recipe} seed {seed} fold {fold}: {result['accuracy_pct']:.2f} % ({result['s']:.0f} s)",
                    flush=True,
                )
        if "soup" in wanted:
            for souped in [pool.submit(soup_fold, f, args.folds, args.work) for f in range(args.folds)]:
                souped.result()
    targets = training_split(64).targets
    names = [f"base-s{s}" for s in base_seeds] + [f"{r}-s0" for r in (*FITTED[1:], "soup") if r in wanted]
    logits = {name: out_of_fold(args.work, name, targets, args.folds) for name in names}
    if "ensemble" in wanted:
        logits["ensemble-s0s1"] = (logits["base-s0"] + logits["base-s1"]) / 2
    right_base = logits["base-s0"].argmax(1) == targets
    report: dict[str, dict[str, float]] = {}
    for name, values in logits.items():
        difference = (values.argmax(1) == targets).astype(np.float64) - right_base
        report[name] = {
            "oof_accuracy_pct": round(float((values.argmax(1) == targets).mean() * 100), 2),
            "vs_base_s0_pts": round(float(difference.mean() * 100), 2),
            "se_pts": round(float(difference.std(ddof=1) / np.sqrt(len(targets)) * 100), 2),
        }
        row = report[name]
        print(f"{name:14s} {row['oof_accuracy_pct']:6.2f} %  {row['vs_base_s0_pts']:+.2f} ± {row['se_pts']:.2f} points")
    print(json.dumps({"texts": len(targets), "folds": args.folds, "recipes": report, "worker_s": seconds}))


if __name__ == "__main__":
    main()
