"""Bring your own model: the black-box operators on an ONNX model as users export it.

Three kinds of model, told apart by their inputs and first output:

- an **image classifier**: one float input N×C×H×W (C = 1 or 3), scores N×K;
- an **image segmenter**: the same input, per-pixel scores N×K×H'×W' (FCN, DeepLab, DUC);
- a **text classifier**: integer token ids N×L (``input_ids``, with ``attention_mask`` and
  ``token_type_ids`` if it reads them), scores N×K, and the tokenizer folder it was trained with.

Data, by kind (all optional: with none, the variants are built for latency only)::

    --images DIR               classifier: DIR/<class>/<image>; segmenter: DIR/images/<stem>.<ext> and
                               DIR/masks/<stem>.png (pixel value = class id; 255 is not scored)
    --texts DIR --tokenizer T  DIR/<class>/<file>, one text per file (scikit-learn's load_files layout,
                               as aclImdb and 20 Newsgroups come); T holds tokenizer.json or vocab.txt
    --labels FILE              the model's class names in output order, one per line: class folders are
                               matched by name (without it, class folders in sorted order are classes 0…n-1)

With no data, inputs are generated from the model's own tensor specs (normal pixels; token ids within the
embedding table's rows) to calibrate, to cut and to fill the sample library; no accuracy is claimed and
the loadgen records latency only. A model exported with a fixed batch (the exporters' default of 1) runs in
chunks of exactly that batch. Every variant lands in ``<out>/<name>/<variant>/`` with its manifest, and
the sample library (``<out>/<name>/evaluation.npz``) beside them, so ``make bench`` with a spec that names
the subject can run it. Anything byo cannot use raises :class:`ByoError` saying why and what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from operators.blackbox import BlackBoxContext, Draft, session
from operators.build import apply_chain, realise
from operators.data import (
    DatasetMissing,
    Samples,
    load_image_folder,
    load_segmentation_folder,
    load_text_folder,
    make_split,
)
from operators.onnxgraph import fixed_batch, graph_inputs
from operators.variants import EXIT_VARIANTS, VARIANTS
from services.contracts.manifest import ManifestSpec
from services.contracts.samples import IGNORE_LABEL, UNLABELLED, write_samples

BYO_VARIANTS = ("identity", "partition2", "partition3", "sptq", "dynq", "early-exit", "qee", "sptq-partition")
# exit heads are classifiers trained on labels: not for segmenters, not without data
NO_EXIT_VARIANTS = tuple(v for v in BYO_VARIANTS if v not in EXIT_VARIANTS)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_IMAGE_SIDE = 224
DEFAULT_MAX_TOKENS = 128
SYNTHETIC_ITEMS = 160  # latency only: 32 calibrate, 64 fill the sample library
FALLBACK_VOCABULARY = 100  # token ids when the embedding table cannot be found: valid for any real vocabulary
_INTEGER_TYPES: dict[int, type[np.generic]] = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}

Say = Callable[[str], None]


def _prefixed(say: Say, prefix: str) -> Say:
    return lambda message: say(prefix + message)


class ByoError(ValueError):
    """A model or dataset byo cannot use; the message says why and what to do."""


@dataclass(frozen=True)
class ModelFacts:
    """What byo read off a model: kind, task, input shapes (batch 1), classes, fixed batch."""

    kind: Literal["image", "text"]
    task: Literal["classify", "segment"]
    shapes: dict[str, tuple[int, ...]]  # one item, by input name
    dtypes: dict[str, type[np.generic]]
    classes: int
    output_hw: tuple[int, int] | None  # a segmenter's mask size (width, height)
    fixed_batch: int | None
    vocabulary: int

    @property
    def image_size(self) -> tuple[int, int]:
        shape = next(iter(self.shapes.values()))
        return (shape[3], shape[2])

    @property
    def channels(self) -> int:
        return next(iter(self.shapes.values()))[1]


def read_model(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ByoError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ByoError(f"{path} is not an ONNX model ({exc.__class__.__name__}: {exc})") from None
    if not model.graph.node or not graph_inputs(model) or not model.graph.output:
        raise ByoError(f"{path} is not an ONNX model: it has no graph with inputs, nodes and outputs")
    return model


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim
    ]


def _vocabulary(model: onnx.ModelProto, input_name: str) -> int:
    """Rows of the embedding table that ``input_name`` indexes (through Casts), for valid synthetic ids."""
    tables = {i.name: i.dims[0] for i in model.graph.initializer if len(i.dims) == 2}
    names = {input_name}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input[0] in names:
            names.add(node.output[0])
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in names and node.input[0] in tables:
            return int(tables[node.input[0]])
    return FALLBACK_VOCABULARY


def _item_shapes(
    model: onnx.ModelProto, size: tuple[int, int] | None, max_tokens: int | None
) -> tuple[Literal["image", "text"], dict[str, tuple[int, ...]], dict[str, type[np.generic]]]:
    inputs = graph_inputs(model)
    described = ", ".join(f"{i.name} {_dims(i)}" for i in inputs)
    elem = {i.name: i.type.tensor_type.elem_type for i in inputs}
    if all(e == onnx.TensorProto.FLOAT for e in elem.values()):
        if len(inputs) != 1:
            raise ByoError(f"the model takes {len(inputs)} float inputs ({described}); byo takes one image input")
        dims = _dims(inputs[0])
        if len(dims) != 4 or dims[1] not in (1, 3):
            hint = " (channels last: export the model with NCHW input)" if len(dims) == 4 and dims[3] in (1, 3) else ""
            raise ByoError(
                f"input {inputs[0].name} has shape {dims}; byo takes NCHW images (N×C×H×W, C = 1 or 3){hint}"
            )
        height, width = dims[2], dims[3]
        if size is not None and None not in (height, width) and size != (width, height):
            raise ByoError(f"the model takes {width}×{height} images, not {size[0]}×{size[1]}")
        if height is None or width is None:
            width, height = size or (DEFAULT_IMAGE_SIDE, DEFAULT_IMAGE_SIDE)
        return "image", {inputs[0].name: (1, dims[1] or 3, height, width)}, {inputs[0].name: np.float32}
    unknown = [i.name for i in inputs if i.name not in TEXT_INPUTS or elem[i.name] not in _INTEGER_TYPES]
    if unknown or "input_ids" not in elem:
        raise ByoError(
            f"unsupported inputs ({described}): byo takes one float NCHW image input, or integer token inputs "
            f"named {', '.join(TEXT_INPUTS)} (input_ids required)"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, type[np.generic]] = {}
    for value in inputs:
        dims = _dims(value)
        if len(dims) != 2:
            raise ByoError(f"token input {value.name} has shape {dims}; byo takes N×L token ids")
        length = dims[1] or max_tokens or DEFAULT_MAX_TOKENS
        shapes[value.name], dtypes[value.name] = (1, length), _INTEGER_TYPES[elem[value.name]]
    if len({s[1] for s in shapes.values()}) > 1:
        raise ByoError(f"token inputs of different lengths ({described})")
    return "text", shapes, dtypes


def synthetic_inputs(facts: ModelFacts, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs generated from the model's tensor specs: normal pixels, valid token ids, full masks."""
    rng = np.random.default_rng(seed)
    made: dict[str, np.ndarray] = {}
    for name, shape in facts.shapes.items():
        full = (count, *shape[1:])
        if facts.kind == "image":
            made[name] = rng.standard_normal(full, dtype=np.float32)
        elif name == "input_ids":
            made[name] = rng.integers(0, facts.vocabulary, full).astype(facts.dtypes[name])
        else:
            made[name] = (np.ones if name == "attention_mask" else np.zeros)(full, facts.dtypes[name])
    return made


def inspect(model: onnx.ModelProto, size: tuple[int, int] | None = None, max_tokens: int | None = None) -> ModelFacts:
    """Read a model's kind and task, and run one generated item through onnxruntime to learn its outputs."""
    kind, shapes, dtypes = _item_shapes(model, size, max_tokens)
    batch = fixed_batch(model)
    vocabulary = _vocabulary(model, "input_ids") if kind == "text" else 0
    probe = ModelFacts(kind, "classify", shapes, dtypes, 0, None, batch, vocabulary)
    try:
        scores = session(model).run([model.graph.output[0].name], synthetic_inputs(probe, batch or 1))[0]
    except Exception as exc:  # onnxruntime raises its own exception types, with the reason in the message
        raise ByoError(f"onnxruntime cannot run the model on {shapes}: {exc}") from None
    output = model.graph.output[0].name
    if scores.ndim == 2:
        return ModelFacts(kind, "classify", shapes, dtypes, int(scores.shape[1]), None, batch, vocabulary)
    if scores.ndim == 4 and kind == "image":
        hw = (int(scores.shape[3]), int(scores.shape[2]))
        return ModelFacts(kind, "segment", shapes, dtypes, int(scores.shape[1]), hw, batch, vocabulary)
    raise ByoError(
        f"the first output {output} has shape {list(scores.shape)}; byo needs class scores (N×K) or, for images, "
        "per-pixel scores (N×K×H×W) — export the model with its classification head"
    )


def class_ids(folders: Sequence[str], labels_file: Path | None, classes: int, what: str) -> np.ndarray:
    """Model class index of each class folder: by name in ``labels_file``, else in sorted order."""
    if labels_file is not None:
        if not labels_file.is_file():
            raise ByoError(f"labels file {labels_file} does not exist")
        names = [line.strip() for line in labels_file.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) != classes:
            raise ByoError(f"{labels_file} names {len(names)} classes but the model gives {classes} class scores")
        unknown = [f for f in folders if f not in names]
        if unknown:
            raise ByoError(f"{what} folders {unknown[:5]} are not among the model's classes in {labels_file}")
        return np.asarray([names.index(f) for f in folders], np.int64)
    if len(folders) > classes:
        raise ByoError(
            f"{what} has {len(folders)} class folders but the model gives {classes} class scores; "
            "give --labels FILE (the model's class names in output order) to match folders by name"
        )
    return np.arange(len(folders), dtype=np.int64)


def _images(
    folder: Path, facts: ModelFacts, mean: Sequence[float], std: Sequence[float], labels: Path | None
) -> Samples:
    name = next(iter(facts.shapes))
    if facts.task == "segment":
        images, masks = load_segmentation_folder(
            folder, facts.image_size, mean, std, channels=facts.channels, mask_size=facts.output_hw
        )
        bad = np.unique(masks[(masks >= facts.classes) & (masks != IGNORE_LABEL)])
        if len(bad):
            raise ByoError(
                f"masks in {folder / 'masks'} hold class ids {bad[:5].tolist()}, but the model gives "
                f"{facts.classes} classes (ids 0–{facts.classes - 1}, {IGNORE_LABEL} = not scored)"
            )
        return Samples({name: images}, masks)
    images, folder_labels, folders = load_image_folder(folder, facts.image_size, mean, std, facts.channels)
    return Samples({name: images}, class_ids(folders, labels, facts.classes, str(folder))[folder_labels])


def _texts(folder: Path, tokenizer_dir: Path | None, facts: ModelFacts, labels: Path | None) -> Samples:
    if tokenizer_dir is None or not tokenizer_dir.is_dir():
        raise ByoError(
            f"--texts needs --tokenizer DIR, the folder of the model's tokenizer files (got {tokenizer_dir})"
        )
    texts, folder_labels, folders = load_text_folder(folder)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ByoError(f"{tokenizer_dir} holds no tokenizer transformers can read: {exc}") from None
    length = next(iter(facts.shapes.values()))[1]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    inputs = {}
    for name in facts.shapes:
        values = encoded.get(name)
        if values is None:  # e.g. token_type_ids from a tokenizer that does not make them: one segment
            values = np.zeros((len(texts), length), np.int64)
        inputs[name] = values.astype(facts.dtypes[name])
    return Samples(inputs, class_ids(folders, labels, facts.classes, str(folder))[folder_labels])


def _variants(facts: ModelFacts, labelled: bool, wanted: Sequence[str] | None) -> list[str]:
    offered = BYO_VARIANTS if labelled and facts.task == "classify" else NO_EXIT_VARIANTS
    unsupported = [v for v in wanted or () if v not in BYO_VARIANTS]
    if unsupported:
        raise ByoError(f"byo applies only black-box variants {BYO_VARIANTS}, not {unsupported}")
    refused = [v for v in wanted or () if v not in offered]
    if refused:
        why = "a segmenter" if facts.task == "segment" else "a model built without labels"
        raise ByoError(f"{refused} need exit heads trained on class labels, which {why} cannot have")
    return list(wanted or offered)


def byo(
    model_path: Path,
    out: Path,
    *,
    name: str,
    images: Path | None = None,
    texts: Path | None = None,
    tokenizer: Path | None = None,
    labels: Path | None = None,
    size: tuple[int, int] | None = None,
    max_tokens: int | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    operators: Sequence[str] | None = None,
    seed: int = 0,
    head_train_items: int = 2000,
    calibration_items: int = 256,
    evaluation_items: int = 5000,
    say: Say = print,
) -> list[ManifestSpec]:
    """Build the black-box variants of a user's model into ``out/name`` with its sample library."""
    model = read_model(model_path)
    facts = inspect(model, size, max_tokens)
    if images is not None and texts is not None:
        raise ByoError("give --images or --texts, not both")
    if facts.kind == "text" and images is not None:
        raise ByoError("the model takes token ids: give --texts DIR --tokenizer DIR, not --images")
    if facts.kind == "image" and texts is not None:
        raise ByoError("the model takes images: give --images DIR, not --texts")
    task = f"{facts.kind} {'segmenter' if facts.task == 'segment' else 'classifier'}, {facts.classes} classes"
    batch = f"fixed batch {facts.fixed_batch}" if facts.fixed_batch else "dynamic batch"
    say(f"{model_path.name}: {task}, inputs {facts.shapes}, {batch}")
    try:
        if images is not None:
            samples: Samples | None = _images(images, facts, mean, std, labels)
            dataset = f"{'segmentation' if facts.task == 'segment' else 'images'}:{images.name}"
        elif texts is not None:
            samples, dataset = _texts(texts, tokenizer, facts, labels), f"texts:{texts.name}"
        else:
            samples, dataset = None, "synthetic"
    except DatasetMissing as exc:
        raise ByoError(str(exc)) from None
    if samples is None:
        say("no dataset given: building for latency only, with inputs generated from the model's tensor specs; "
            "accuracy is unknown")  # fmt: skip
        samples = Samples(synthetic_inputs(facts, SYNTHETIC_ITEMS, seed), np.full(SYNTHETIC_ITEMS, UNLABELLED))
    labelled = dataset != "synthetic"
    split = make_split(samples, seed=seed, fractions=(0.2, 0.4), name=dataset)
    metric = None if not labelled else "miou" if facts.task == "segment" else "accuracy"
    context = BlackBoxContext(split, head_train_items, calibration_items, seed)
    parameters: dict[str, str | int | float | bool] = {
        "source": model_path.name,
        "labels": "yes" if labelled else "none",
        "fixed_batch": facts.fixed_batch or 0,
    }
    built = []
    for variant in _variants(facts, labelled, operators):
        say(f"{name}.{variant}: building")
        draft = apply_chain(Draft.of(model), VARIANTS[variant], context, _prefixed(say, f"{name}.{variant}: "))
        built.append(realise(draft, out / name, name, variant, parameters, split=split,
                             evaluation_items=evaluation_items, metric=metric))  # fmt: skip
    evaluation = split.evaluation.head(evaluation_items)
    write_samples(out / name, evaluation.inputs, evaluation.targets, {"subject": name, **split.record})
    identity = next((m for m in built if m.operator == "identity"), None)
    if identity and identity.accuracy and facts.task == "classify" and identity.accuracy.value < 2 / facts.classes:
        say(f"warning: {name}.identity scores {identity.accuracy.value:.3f}, near chance (1/{facts.classes}): do the "
            "class folders follow the model's class order? (--labels FILE matches them by name)")  # fmt: skip
    return built
