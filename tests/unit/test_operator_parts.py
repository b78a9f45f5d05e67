"""Operators' pure parts: splits, canvases, fortune parsing, metrics and their CIs, graph cuts, pruning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from scipy.stats import binomtest
from sklearn.metrics import f1_score
from transformers import BertConfig, BertModel

from operators import training
from operators.build import artefact_sources
from operators.data import (
    DatasetMissing,
    Samples,
    compose_canvases,
    load_fashion_mnist,
    load_fortunes,
    load_image_folder,
    make_split,
    read_fortunes,
)
from operators.evaluate import CascadeTrace, cascade, macro_f1, score, wilson_interval
from operators.nets import ConvNet, ConvNetSpec, TextClassifier
from operators.onnxgraph import attach_exit_head, balanced_cuts, find_cuts, pool_features, split_stages
from operators.subjects import head_tail
from operators.training import FitSettings, fit, memory_format, parameter_groups, predict
from operators.whitebox import narrow_blocks
from services.contracts.manifest import max_softmax
from services.contracts.scoring import confusion, miou_of
from services.demo import build_demo_mlp


def test_split_is_disjoint_deterministic_and_recorded() -> None:
    samples = Samples({"x": np.arange(1000)[:, None]}, np.arange(1000))
    split = make_split(samples, seed=3, fractions=(0.1, 0.2), name="toy")
    parts = [set(split.train.targets), set(split.calibration.targets), set(split.evaluation.targets)]
    assert [len(p) for p in parts] == [700, 100, 200]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    again = make_split(samples, seed=3, fractions=(0.1, 0.2), name="toy")
    assert np.array_equal(again.evaluation.targets, split.evaluation.targets)
    assert split.record["split_sha256"] == again.record["split_sha256"]
    other = make_split(samples, seed=4, fractions=(0.1, 0.2), name="toy")
    assert other.record["split_sha256"] != split.record["split_sha256"]
    assert split.record["calibration_n"] == 100 and split.record["dataset"] == "toy"


def test_canvases_label_every_bright_pixel_and_only_those() -> None:
    rng = np.random.default_rng(0)
    items = rng.integers(0, 256, (20, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, 20)
    canvas, target = compose_canvases(items, labels, 5, seed=1)
    again, _ = compose_canvases(items, labels, 5, seed=1)
    assert np.array_equal(canvas, again)
    assert canvas.shape == target.shape == (5, 64, 64)
    assert np.all((target > 0) == (canvas > 24))
    assert set(np.unique(target)) <= set(range(11))


def test_fortunes_are_read_one_entry_per_separator(tmp_path: Path) -> None:
    (tmp_path / "science").write_text("E = mc^2\n  said he.\n%\nSecond one\n%\n")
    assert read_fortunes(tmp_path / "science") == ["E = mc^2 said he.", "Second one"]
    texts, labels = load_fortunes(tmp_path, ["science"])
    assert texts == ["E = mc^2 said he.", "Second one"] and labels.tolist() == [0, 0]


def test_a_long_text_keeps_its_head_and_tail_and_a_short_one_is_padded() -> None:
    encoded = head_tail([[101, *range(1, 11), 102], [101, 7, 102]], max_tokens=6, head_tokens=2, pad_id=0)
    assert encoded["input_ids"].tolist() == [[101, 1, 8, 9, 10, 102], [101, 7, 102, 0, 0, 0]]
    assert encoded["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert encoded["input_ids"].dtype == encoded["attention_mask"].dtype == np.int64


def test_missing_datasets_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(DatasetMissing, match="apt-get install fortunes"):
        load_fortunes(tmp_path)
    with pytest.raises(DatasetMissing, match="no class sub-folders"):
        load_image_folder(tmp_path, (8, 8), (0, 0, 0), (1, 1, 1))


def test_wilson_interval_matches_scipy() -> None:
    for successes, n in [(90, 100), (0, 20), (20, 20), (812, 1000)]:
        expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(successes, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_macro_f1_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    targets, predictions = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    predictions[:150] = targets[:150]
    assert macro_f1(predictions, targets, 5) == pytest.approx(f1_score(targets, predictions, average="macro"))


def test_miou_on_known_masks() -> None:
    target = np.array([[[0, 0], [1, 1]]])
    prediction = np.array([[[0, 1], [1, 1]]])
    # class 0: intersection 1, union 2; class 1: intersection 2, union 3
    assert miou_of(confusion(prediction, target, 2).sum(axis=0)) == pytest.approx((1 / 2 + 2 / 3) / 2)
    logits = np.zeros((1, 2, 2, 2), np.float32)
    logits[0, 1][prediction[0] == 1] = 1.0
    result = score(logits, target, "miou")
    assert result.value == pytest.approx((1 / 2 + 2 / 3) / 2) and result.others["pixel_accuracy"] == 0.75


def test_cascade_answers_at_the_first_confident_head() -> None:
    confident = np.array([[9.0, 0.0]], np.float32)  # softmax max ≈ 0.9999
    unsure = np.array([[0.1, 0.0]], np.float32)
    trace = CascadeTrace(
        final=np.array([[0.0, 5.0]] * 3, np.float32),
        heads=[np.concatenate([confident, unsure, unsure]), np.concatenate([unsure, confident, unsure])],
    )
    logits, answered_by = cascade(trace, 0.9)
    assert answered_by.tolist() == [0, 1, 2]
    assert logits.argmax(axis=1).tolist() == [0, 0, 1]
    assert cascade(trace, 1.0)[1].tolist() == [2, 2, 2]
    assert max_softmax(confident)[0] > 0.9 > max_softmax(unsure)[0]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    root = tmp_path_factory.mktemp("mlp")
    build_demo_mlp(root)
    return onnx.load(str(root / "demo-mlp" / "identity" / "stage0.onnx"))


def test_cuts_of_a_chain_are_its_layers_with_their_bytes(mlp: onnx.ModelProto) -> None:
    cuts = find_cuts(mlp)
    by_tensor = {c.tensors: c for c in cuts}
    assert by_tensor[("h1",)].bytes_per_item == 256 * 4 and by_tensor[("h2",)].bytes_per_item == 256 * 4
    assert [c.tensors for c in balanced_cuts(cuts, 3)] == [("h1",), ("h2",)]
    fractions = [c.macs_before_fraction for c in cuts]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] <= 1


def test_every_cut_of_the_mlp_is_exact(mlp: onnx.ModelProto) -> None:
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    expected = ort.InferenceSession(mlp.SerializeToString()).run(None, {"x": x})[0]
    for cut in find_cuts(mlp):
        tensors: dict[str, np.ndarray] = {"x": x}
        for stage in split_stages(mlp, [cut], "t"):
            session = ort.InferenceSession(stage.SerializeToString())
            outputs = session.run(None, {i.name: tensors[i.name] for i in session.get_inputs()})
            tensors.update(zip([o.name for o in session.get_outputs()], outputs, strict=True))
        np.testing.assert_allclose(tensors["logits"], expected, atol=1e-5)


def test_exit_head_computes_pooled_linear_logits(mlp: onnx.ModelProto) -> None:
    head_stage = split_stages(mlp, balanced_cuts(find_cuts(mlp), 2), "t")[0]
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(256, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    headed = attach_exit_head(head_stage, "h1", weight, bias)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    h1, exit_logits = ort.InferenceSession(headed.SerializeToString()).run(["h1", "exit_logits"], {"x": x})
    np.testing.assert_allclose(exit_logits, pool_features(h1) @ weight + bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["resnet", "resnext"])
def test_structured_pruning_copies_the_kept_channels(kind: Literal["resnet", "resnext"]) -> None:
    torch.manual_seed(0)
    net = ConvNet(ConvNetSpec(kind, (16, 32), (1, 1), groups=4)).eval()
    x = torch.randn(2, 1, 28, 28)
    kept_all = narrow_blocks(net, keep=1.0)
    torch.testing.assert_close(kept_all(x), net(x))  # keeping every channel changes nothing
    half = narrow_blocks(net, keep=0.5)
    mids = [getattr(b, "mid") for b in net.blocks]  # noqa: B009 - typed as Module by nn.Sequential
    assert [getattr(b, "mid") for b in half.blocks] == [m // 2 for m in mids]  # noqa: B009
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in net.parameters())
    assert half(x).shape == (2, 10)


def test_a_tensor_passed_through_a_middle_stage_gets_a_node_of_its_own() -> None:
    """Like a transformer's mask: computed in stage 0, unused by stage 1, read again by stage 2."""
    nodes = [
        helper.make_node("Relu", ["x"], ["mask"]),
        helper.make_node("Neg", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"]),
        helper.make_node("Add", ["b", "mask"], ["y"]),
    ]

    def value(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])

    model = helper.make_model(
        helper.make_graph(nodes, "g", [value("x")], [value("y")]), opset_imports=[helper.make_opsetid("", 17)]
    )
    cuts = [c for c in find_cuts(model) if set(c.tensors) in ({"mask", "a"}, {"mask", "b"})]
    stages = split_stages(model, cuts, "t")
    middle_inputs = {i.name for i in stages[1].graph.input}
    assert not middle_inputs & {o.name for o in stages[1].graph.output}
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    tensors: dict[str, np.ndarray] = {"x": x}
    for stage in stages:
        session = ort.InferenceSession(stage.SerializeToString())
        outputs = session.run(None, {i.name: tensors[i.name] for i in session.get_inputs()})
        tensors.update(zip([o.name for o in session.get_outputs()], outputs, strict=True))
    np.testing.assert_allclose(tensors["y"], x + np.maximum(x, 0))


def _images(count: int) -> Samples:
    rng = np.random.default_rng(0)
    return Samples({"image": rng.normal(size=(count, 1, 28, 28)).astype(np.float32)}, rng.integers(0, 10, count))


def test_training_in_channels_last_learns_the_same_and_hands_back_a_contiguous_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    samples = _images(256)
    settings = FitSettings(items=256, batch=32, lr=1e-2)
    assert memory_format(samples) == torch.channels_last
    torch.manual_seed(0)
    trained = fit(ConvNet(ConvNetSpec("resnet", (8, 16), (1, 1))), samples, settings)
    with monkeypatch.context() as patch:  # the reference: the same loop on NCHW-contiguous batches
        patch.setattr(training, "memory_format", lambda _samples: torch.contiguous_format)
        torch.manual_seed(0)
        reference = fit(ConvNet(ConvNetSpec("resnet", (8, 16), (1, 1))), samples, settings)
    for parameter in trained.parameters():
        assert parameter.is_contiguous()  # saved and exported as before
    x = torch.from_numpy(samples.inputs["image"][:8])
    torch.testing.assert_close(trained(x), reference(x), rtol=1e-3, atol=1e-3)
    assert predict(trained, samples.head(8)).flags["C_CONTIGUOUS"]


def test_training_precision_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for has_units, auto in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(training, "bf16_supported", lambda has=has_units: has)
        monkeypatch.delenv(training.PRECISION_ENV, raising=False)
        assert training.training_precision() == auto
        monkeypatch.setenv(training.PRECISION_ENV, " Auto ")
        assert training.training_precision() == auto
        for chosen in training.PRECISIONS:
            monkeypatch.setenv(training.PRECISION_ENV, chosen)
            assert training.training_precision() == chosen
    monkeypatch.setenv(training.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="TIERLAB_TRAIN_PRECISION='fp16': use one of auto, float32, bfloat16"):
        training.training_precision()


def test_bfloat16_training_runs_the_forward_in_bf16_learns_and_keeps_float32_weights() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 512)
    # class 1 is brighter: learnable in a few steps at either precision
    offset = np.where(labels == 1, 0.5, -0.5)[:, None, None, None]
    samples = Samples({"image": (rng.normal(size=(512, 1, 28, 28)) + offset).astype(np.float32)}, labels)
    train, held_out = samples.take(slice(0, 384)), samples.take(slice(384, 512))
    seen: set[torch.dtype] = set()
    torch.manual_seed(0)
    net = ConvNet(ConvNetSpec("resnet", (8, 16), (1, 1), classes=2))
    hook = net.stem.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    trained = fit(net, train, FitSettings(items=384, batch=32, lr=1e-2, precision="bfloat16"))
    hook.remove()
    assert seen == {torch.bfloat16}  # the convolutions ran in bfloat16
    assert {p.dtype for p in trained.parameters()} == {torch.float32}  # weights, and so the export, stay float32
    accuracy = (predict(trained, held_out).argmax(1) == held_out.targets).mean()
    assert accuracy > 0.9, f"bfloat16 training reached {accuracy:.2f} on a task float32 learns"


def test_layer_decay_gives_each_depth_its_rate() -> None:
    class Layered(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.low, self.mid, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(self.mid(self.low(x)))
            return out

        def layer_groups(self) -> list[list[torch.nn.Parameter]]:
            return [list(self.head.parameters()), list(self.mid.parameters())]  # `low` left to the default

    groups = parameter_groups(Layered(), FitSettings(items=1, lr=1.0, layer_decay=0.5))
    assert [g["lr"] for g in groups] == [1.0, 0.5, 1.0]
    assert [len(g["params"]) for g in groups] == [2, 2, 2]
    assert len(parameter_groups(Layered(), FitSettings(items=1, lr=1.0))) == 1


def _texts(count: int, max_tokens: int = 24) -> Samples:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, max_tokens + 1, count)
    mask = (np.arange(max_tokens)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(5, 100, (count, max_tokens)), 0).astype(np.int64)
    return Samples({"input_ids": ids, "attention_mask": mask}, rng.integers(0, 3, count))


def test_texts_train_in_length_buckets_cut_to_their_longest_and_images_do_not() -> None:
    samples, batch = _texts(500), 8
    lengths = samples.inputs["attention_mask"].sum(axis=1)
    draw = training.batch_indices(samples, batch, np.random.default_rng(1))
    batches = [next(draw) for _ in range(2 * training.LENGTH_POOL_BATCHES)]
    assert all(len(index) == batch and index.min() >= 0 and index.max() < len(samples) for index in batches)
    spread = np.mean([np.ptp(lengths[index]) for index in batches])
    unbucketed = np.mean([np.ptp(lengths[np.random.default_rng(i).integers(0, 500, batch)]) for i in range(100)])
    assert spread < unbucketed / 4  # about one length per batch, against the whole range when drawn at random
    assert len({int(lengths[index].max()) for index in batches}) > 5  # and the widths still vary from batch to batch
    again = training.batch_indices(samples, batch, np.random.default_rng(1))
    assert all(np.array_equal(next(again), index) for index in batches)  # a seed gives the same batches
    cut = training._batch(samples, batches[0], torch.contiguous_format)
    width = int(lengths[batches[0]].max())
    assert {tuple(t.shape) for t in cut.values()} == {(batch, width)}
    assert np.array_equal(cut["input_ids"].numpy(), samples.inputs["input_ids"][batches[0], :width])
    images = _images(64)
    image_draw = training.batch_indices(images, batch, np.random.default_rng(1))
    assert np.array_equal(next(image_draw), np.random.default_rng(1).integers(0, 64, batch))  # as before


def test_a_text_model_predicts_the_same_on_batches_cut_to_their_longest() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = TextClassifier(BertModel(config, add_pooling_layer=False), classes=3).eval()
    samples = _texts(40)
    full = {k: torch.from_numpy(v) for k, v in samples.inputs.items()}
    with torch.no_grad():
        expected = model(**full).numpy()
    np.testing.assert_allclose(predict(model, samples, batch=16), expected, rtol=1e-4, atol=1e-5)


def test_the_build_key_covers_what_shapes_an_artefact_and_not_the_link_specs() -> None:
    sources = artefact_sources()
    names = {f"{f.parent.name}/{f.name}" for f in sources}
    assert {"operators/build.py", "operators/subjects.py", "contracts/manifest.py", "contracts/variant.py"} <= names
    assert not {"contracts/transport.py", "contracts/specs.py", "operators/byo.py", "operators/__main__.py"} & names
    # every contracts module the artefact-making modules load when imported is in the key
    modules = [f"operators.{f.stem}" for f in sources if f.parent.name == "operators" and f.stem != "__init__"]
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {', '.join(modules)}; print(*sorted(sys.modules))"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.split()  # fmt: skip
    contracts = {m.split(".")[2] for m in loaded if m.startswith("services.contracts.")}
    assert contracts and contracts <= {f.stem for f in sources if f.parent.name == "contracts"}
