"""Bring your own model, as users export them: real-size architectures with the exporter's fixed batch of 1.

A ResNet-50 classifier and an FCN-ResNet50 segmenter (64×64 inputs, random weights), a BERT-class text
classifier (MiniLM-L6 weights + a sequence-classification head, with its tokenizer folder), and the
ResNet-50 again with no data at all (latency only). ``byo`` builds their variants and sample libraries;
the offline accuracy it records is what onnxruntime gives on the original model for the library's items;
``make bench``'s loadgen then runs a spec naming all four, including three-tier splits over M-E-C. Bad
input ends with a clear message and exit 2, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image
from transformers import BertForSequenceClassification

from loadgen.__main__ import main as loadgen_main
from loadgen.records import read_records
from operators.__main__ import main as operators_main
from operators.byo import byo
from operators.data import read_fortunes
from operators.evaluate import score
from operators.subjects import minilm_dir
from operators.training import export_onnx
from services.contracts.manifest import load_manifest, verify_stage_files
from services.contracts.samples import UNLABELLED, load_samples
from services.contracts.specs import TIERS, network_profile_links
from services.contracts.stack_state import write_stack_state
from services.demo import local_deployment, write_deployment
from services.local import LocalStack, free_ports
from tests.realnets import fcn_resnet50, resnet50

ROOT = Path(__file__).resolve().parents[2]
SIDE = 64
IMAGE_CLASSES, SEG_CLASSES, TEXT_CLASSES, TOKENS = 10, 6, 4, 32
VARIANTS = {
    "byo-resnet50": ["identity", "partition3", "sptq", "early-exit"],
    "byo-fcn": ["identity", "partition3"],
    "byo-bert": ["identity", "partition3", "dynq"],
    "byo-latency": ["identity", "partition3", "sptq-partition"],
}
FORTUNE_TOPICS = ("computers", "science", "politics", "food")


class _BertLogits(torch.nn.Module):
    """A transformers sequence classifier as users export it: three token inputs, logits out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        logits: torch.Tensor = out.logits
        return logits


def _class_images(folder: Path, classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (SIDE, SIDE, 3)).astype(np.uint8)
            pixels[..., c % 3] = rng.integers(150, 256, (SIDE, SIDE))
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i}.png")


def _segmentation_folder(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for i in range(count):
        mask = np.zeros((SIDE, SIDE), np.uint8)
        mask[rng.integers(0, SIDE // 2) :, rng.integers(0, SIDE // 2) :] = rng.integers(1, SEG_CLASSES)
        mask[0, :] = 255  # VOC's void border: not scored
        Image.fromarray(mask).save(folder / "masks" / f"{i}.png")
        pixels = (mask[..., None] % 200 * 40 + rng.integers(0, 30, (SIDE, SIDE, 3))).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.jpg")


def _text_folder(folder: Path, per_class: int) -> None:
    for topic in FORTUNE_TOPICS:
        (folder / topic).mkdir(parents=True)
        for i, text in enumerate(read_fortunes(Path("/usr/share/games/fortunes") / topic)[:per_class]):
            (folder / topic / f"{i}.txt").write_text(text)


@pytest.fixture(scope="module")
def byo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four subjects built by byo into one models folder (about two minutes on two cores)."""
    work = tmp_path_factory.mktemp("byo")
    models = work / "models"
    image = {"data": np.zeros((1, 3, SIDE, SIDE), np.float32)}
    classifier = export_onnx(resnet50(IMAGE_CLASSES), image, work / "resnet50.onnx", "scores", dynamic_batch=False)
    segmenter = export_onnx(fcn_resnet50(SEG_CLASSES), image, work / "fcn.onnx", "out", dynamic_batch=False)
    torch.manual_seed(0)
    bert = BertForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=TEXT_CLASSES, attn_implementation="eager"
    )
    tokens = {n: np.ones((1, TOKENS), np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")}
    text = export_onnx(
        _BertLogits(torch.nn.Module.eval(bert)), tokens, work / "bert.onnx", "logits", dynamic_batch=False
    )
    _class_images(work / "images", 3, 16)
    _segmentation_folder(work / "seg", 24)
    _text_folder(work / "texts", 24)

    def build(model: Path, name: str, images: Path | None = None, texts: Path | None = None) -> None:
        tokenizer = Path(minilm_dir()) if texts else None
        byo(model, models, name=name, images=images, texts=texts, tokenizer=tokenizer, operators=VARIANTS[name],
            head_train_items=200, calibration_items=16, say=lambda _: None)  # fmt: skip

    build(classifier, "byo-resnet50", images=work / "images")
    build(segmenter, "byo-fcn", images=work / "seg")
    build(text, "byo-bert", texts=work / "texts")
    build(classifier, "byo-latency")
    return models


def test_fixed_batch_models_are_built_and_scored_as_onnxruntime_runs_them(byo_models: Path) -> None:
    for subject, variants in VARIANTS.items():
        for variant in variants:
            manifest = load_manifest(byo_models / subject / variant)
            verify_stage_files(manifest, byo_models / subject / variant)
            assert manifest.parameters["fixed_batch"] == 1
            assert len(manifest.stages) == (3 if "partition" in variant else 2 if variant == "early-exit" else 1)
    # the recorded accuracy of the unmodified model is onnxruntime's, item by item, on the sample library
    for subject, metric in (("byo-resnet50", "accuracy"), ("byo-fcn", "miou"), ("byo-bert", "accuracy")):
        manifest = load_manifest(byo_models / subject / "identity")
        samples = load_samples(byo_models / subject)
        assert samples.labelled and manifest.accuracy is not None and manifest.accuracy.n == len(samples)
        original = ort.InferenceSession(str(byo_models / subject / "identity" / manifest.stages[0].file))
        logits = np.concatenate([original.run(None, samples.item(i))[0] for i in range(len(samples))])
        assert manifest.accuracy.metric == metric
        assert manifest.accuracy.value == pytest.approx(score(logits, samples.targets, metric).value, abs=1e-9)
    fcn = load_samples(byo_models / "byo-fcn")
    assert fcn.targets.shape[1:] == (SIDE, SIDE) and (fcn.targets == 255).any()


def test_with_no_data_the_variants_are_built_for_latency_only(byo_models: Path) -> None:
    samples = load_samples(byo_models / "byo-latency")
    assert not samples.labelled and (samples.targets == UNLABELLED).all() and len(samples) > 0
    assert samples.inputs["data"].shape[1:] == (3, SIDE, SIDE)
    for variant in VARIANTS["byo-latency"]:
        manifest = load_manifest(byo_models / "byo-latency" / variant)
        assert manifest.accuracy is None and manifest.parameters["labels"] == "none"


@pytest.fixture(scope="module")
def byo_stack(byo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("byo-stack")
    deployment = local_deployment(
        [f"{s}/{v}/manifest.json" for s, variants in VARIANTS.items() for v in variants if v != "sptq"],
        models_dir=str(byo_models),
        ports=dict(zip(TIERS, free_ports(3), strict=True)),
        links=network_profile_links(ROOT / "compose" / "network-lan.yml"),
    )
    env = {"TIERLAB_STARTUP_MODELS": "none"}
    with LocalStack(
        write_deployment(deployment, folder / "deployment.yaml"), log_dir=folder / "logs", env=env
    ) as stack:
        state = folder / "stack.json"
        write_stack_state(state, stack.state().model_copy(update={"network": "lan"}))
        yield state


def test_bench_runs_a_spec_naming_the_byo_subjects_across_three_tiers(
    byo_models: Path, byo_stack: Path, tmp_path: Path
) -> None:
    spec = {
        "name": "byo",
        "selections": [
            {"subject": subject, "variants": ["identity", "partition3"], "placements": ["E", "M-E-C"]}
            for subject in VARIANTS
        ],
        "scenarios": [{"kind": "single-stream"}],
        "networks": ["lan"],
        "warmup_requests": 2,
        "stopping": {"min_samples": 20, "max_samples": 20, "max_duration_s": 60, "check_every": 10},
        "seed": 1,
    }
    (tmp_path / "byo.yaml").write_text(yaml.safe_dump(spec))
    code = loadgen_main(["run", "--spec", str(tmp_path / "byo.yaml"), "--state", str(byo_stack), "--models",
                         str(byo_models), "--results", str(tmp_path / "results"), "--run-id", "byo"])  # fmt: skip
    assert code == 0
    records = read_records(tmp_path / "results" / "byo")
    summary = json.loads((tmp_path / "results" / "byo" / "summary.json").read_text())
    strategies = {(e["subject"], e["strategy"]): e for e in summary["strategies"]}
    assert set(strategies) == {(s, f"{s}.{v}@{p}") for s in VARIANTS for v, p in
                               (("identity", "E"), ("partition3", "E"), ("partition3", "M-E-C"))}  # fmt: skip
    assert records and all(r["status"] == 200 for r in records), [r["error"] for r in records if r["status"] != 200]
    three_tier = [r for r in records if r["placement"] == "M-E-C"]
    assert {r["subject"] for r in three_tier} == set(VARIANTS) and all(r["hops"] == 3 for r in three_tier)
    for (subject, _), entry in strategies.items():
        # labelled subjects are scored online; the latency-only one measures latency and claims no accuracy
        assert (entry.get("accuracy") is None) == (subject == "byo-latency"), entry
        assert entry["n"] == 20 and entry["latency_ms"]["p50"] > 0


def _nhwc_model(path: Path) -> Path:
    class ChannelsLast(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2))

    return export_onnx(ChannelsLast(), {"x": np.zeros((1, 32, 32, 3), np.float32)}, path, "scores")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-onnx", "is not an ONNX model"),
        ("nhwc", "channels last: export the model with NCHW input"),
        ("too-many-classes", "has 12 class folders but the model gives 10 class scores"),
        ("labels-mismatch", "are not among the model's classes"),
        ("mask-values", "hold class ids [9]"),
        ("text-without-tokenizer", "--texts needs --tokenizer"),
        ("images-for-text", "the model takes token ids"),
    ],
)
def test_bad_input_gets_a_clear_message_and_exit_2(
    case: str, message: str, byo_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = byo_models.parent
    args = ["byo", "--name", "bad", "--out", str(tmp_path / "out"), "--onnx", str(models / "resnet50.onnx")]
    if case == "not-onnx":
        (tmp_path / "model.onnx").write_bytes(b"\x08\x07not a model")
        args[-1] = str(tmp_path / "model.onnx")
    elif case == "nhwc":
        args[-1] = str(_nhwc_model(tmp_path / "nhwc.onnx"))
    elif case == "too-many-classes":
        _class_images(tmp_path / "images", 12, 1)
        args += ["--images", str(tmp_path / "images")]
    elif case == "labels-mismatch":
        _class_images(tmp_path / "images", 2, 1)
        (tmp_path / "labels.txt").write_text("\n".join(f"n{i:08d}" for i in range(IMAGE_CLASSES)))
        args += ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels.txt")]
    elif case == "mask-values":
        _segmentation_folder(tmp_path / "seg", 2)
        Image.fromarray(np.full((SIDE, SIDE), 9, np.uint8)).save(tmp_path / "seg" / "masks" / "0.png")
        args[-1] = str(models / "fcn.onnx")
        args += ["--images", str(tmp_path / "seg")]
    elif case == "text-without-tokenizer":
        args[-1] = str(models / "bert.onnx")
        args += ["--texts", str(models / "texts")]
    elif case == "images-for-text":
        args[-1] = str(models / "bert.onnx")
        args += ["--images", str(models / "images")]
    assert operators_main(args) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error
