"""Writing a trained model as .keras / SavedModel / TFLite / ONNX, and checking each export against Keras.

Every writer returns the path it wrote; every loader returns `predict(images) -> probabilities` for a
float32 batch of raw 0..255 RGB images, so all formats are checked the same way by `compare`.

Choices:
- SavedModel: `model.export(path)` (Keras 3 ExportArchive), called through its `serving_default`
  signature, the one TF Serving uses.
- TFLite: converted from that SavedModel with `tf.lite.TFLiteConverter.from_saved_model`
  (`from_keras_model` works too with Keras 3.15 / TF 2.21, but it goes through a temporary
  SavedModel anyway, prints every captured variable and is about twice as slow).
- int8: full-integer kernels (`TFLITE_BUILTINS_INT8` only, so conversion fails rather than silently
  falling back to float ops), calibrated on training images; the model's input and output stay
  float32 (a quantize op at the entrance, a dequantize op at the exit), so every format is fed
  the same raw 0..255 float images and returns probabilities.
- ONNX: Keras' own `model.export(path, format="onnx")`, which traces the model's call with
  TensorFlow and converts it with tf2onnx (opset 15, its default; batch dimension left dynamic), run back
  with onnxruntime. The input signature is passed explicitly: without it Keras refuses a loaded model
  that has not been called yet ("The model provided has never called"). tf2onnx 1.17 predates numpy 2:
  its one `np.product` is in `Node.get_value_attr`'s external-data branch, used only for models over
  2 GB (`large_model`), which Keras' exporter never asks for; Keras patches that function anyway (and
  defines `np.object = object` for the rest of the process). Measured on TF 2.21 / numpy 2.4: the
  conversion also works with Keras' patch disabled. The packages are the `[onnx]` extra; without them
  `validate_options` fails with one line before anything is loaded.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from finetune.errors import ConfigError, FinetuneError, did_you_mean
from finetune.model.predict_fn import predict_batch

FORMATS = ("keras", "saved_model", "tflite", "onnx")
# format -> the packages it needs beyond finetune's own (import names), and the extra that installs them
FORMAT_PACKAGES = {"onnx": ("tf2onnx", "onnx", "onnxruntime")}
FLOAT_QUANTIZE = ("none", "float16")      # exports that must match Keras' top-1 on every check image
WARN_AGREEMENT = 0.9                      # quantized exports below this top-1 agreement get a warning
# Keras' top two probabilities closer than this are a near-tie: their order is within float noise,
# so a float export ranking them the other way is reported but does not fail the check.
TIE_MARGIN = 1e-3


class ExportCheckError(FinetuneError):
    """An exported artifact does not reproduce the Keras model's predictions."""


def validate_options(export) -> tuple[list[str], str]:
    """(formats without duplicates, in order; quantize) or a one-line ConfigError. Pure Python."""
    from finetune.config.schema import choice

    formats = export.formats
    if formats is None or isinstance(formats, str) or len(formats) == 0:
        received = formats if formats is None or isinstance(formats, str) else list(formats)
        raise ConfigError("export.formats", received,
                          "a non-empty list of " + ", ".join(FORMATS) + ", e.g. export.formats=[keras,tflite]")
    chosen: list[str] = []
    for name in formats:
        name = str(name)
        if name not in FORMATS:
            raise ConfigError("export.formats", name,
                              "each one of " + ", ".join(FORMATS) + did_you_mean(name, FORMATS))
        if name not in chosen:
            chosen.append(name)
    for name in chosen:
        check_packages(name)
    quantize = str(choice(export.quantize))
    if quantize != "none" and "tflite" not in chosen:
        raise ConfigError("export.quantize", quantize, "none unless export.formats includes tflite "
                                                       "(quantization applies to TFLite only)")
    for key in ("check_samples", "representative_samples"):
        value = export[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"export.{key}", value, "an integer >= 1")
    return chosen, quantize


def check_packages(fmt: str) -> None:
    """A one-line FinetuneError when a format's optional packages are not installed. No import happens."""
    missing = [p for p in FORMAT_PACKAGES.get(fmt, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise FinetuneError(f"export.formats: {fmt} needs {', '.join(missing)}, not installed here; "
                            f"install them with: pip install 'finetune[{fmt}]'")


def tflite_name(quantize: str) -> str:
    return "model.tflite" if quantize == "none" else f"model_{quantize}.tflite"


def label(fmt: str, quantize: str) -> str:
    """The row name in the report: keras, saved_model, tflite, tflite_int8, ..."""
    return fmt if fmt != "tflite" or quantize == "none" else f"tflite_{quantize}"


def load_for_export(path: Path, safe_mode: bool = True):
    """The model for inference: Keras safe mode, without its optimizer state (compile=False): models
    saved before files.save_model dropped it carry it, and it would triple the re-saved .keras."""
    from finetune.model.load import load_model  # registers BackbonePreprocess (older models)

    return load_model(path, safe_mode=safe_mode, compile=False)


# -- writers -----------------------------------------------------------------------------------------
def write_keras(model, out_dir: Path) -> Path:
    from finetune import files

    return files.save_model(model, out_dir / "model.keras")


def write_saved_model(model, path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    logger = logging.getLogger("tensorflow")  # "Assets written to: ..." at INFO through Hydra's logging
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.export(str(path), format="tf_saved_model", verbose=False)
    finally:
        logger.setLevel(level)
    return path


def _float16(converter, tf, representative) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def _dynamic(converter, tf, representative) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _int8(converter, tf, representative) -> None:
    if representative is None or not len(representative):
        raise FinetuneError("int8 quantization needs representative images (export.representative_samples)")

    def samples():
        for image in representative:
            yield [image[None].astype(np.float32)]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = samples
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # inference_input_type / inference_output_type stay float32: see the module docstring


# export.quantize -> how it sets up the TFLite converter
QUANTIZERS = {"none": lambda converter, tf, representative: None, "float16": _float16, "dynamic": _dynamic,
              "int8": _int8}
QUANTIZE = tuple(QUANTIZERS)


def write_tflite(saved_model_dir: Path, path: Path, quantize: str, representative: np.ndarray | None) -> Path:
    import tensorflow as tf

    from finetune.registry import lookup

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    lookup(QUANTIZERS, "export.quantize", quantize)(converter, tf, representative)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Statistics for quantized inputs were expected ..." and the like
        blob = converter.convert()
    path.write_bytes(blob)
    return path


def write_onnx(model, path: Path) -> Path:
    try:
        import onnx  # noqa: F401  the ones Keras' exporter imports lazily, mid-conversion
        import tf2onnx  # noqa: F401
    except ImportError as error:  # installed (check_packages passed) but broken
        raise FinetuneError(f"export.formats: onnx could not import {error.name or 'its packages'} ({error}); "
                            "reinstall them with: pip install 'finetune[onnx]'") from None
    loggers = [logging.getLogger(name) for name in ("tensorflow", "tf2onnx")]  # tf2onnx logs each pass at INFO
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Keras' numpy 2 patch probes the removed np.object
            model.export(str(path), format="onnx", verbose=False, input_signature=[model.inputs[0]])
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    unsupported = unconverted_ops(path)
    if unsupported:  # tf2onnx logs them and writes the file anyway; onnxruntime then refuses to load it
        path.unlink(missing_ok=True)
        raise ExportCheckError(f"export.formats: onnx: tf2onnx could not convert the TensorFlow op(s) "
                               f"{', '.join(unsupported)} (Erfc is the exact GELU of ViT/DINOv2 and other "
                               "transformers); export keras, saved_model or tflite for this model")
    return path


def unconverted_ops(path: Path) -> list[str]:
    """Op types in the ONNX file that no ONNX operator set defines (TensorFlow ops tf2onnx left as they were)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sorted({node.op_type for node in graph.node
                   if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)})


# -- loaders: each returns predict(images) -> probabilities -------------------------------------------
def keras_predictor(path: Path, safe_mode: bool = True):
    from finetune.model.load import load_model

    model = load_model(path, safe_mode=safe_mode)  # safe mode unless the user trusted the source model
    return lambda images: predict_batch(model, images).astype(np.float32, copy=False)


def saved_model_predictor(path: Path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    if "serving_default" not in loaded.signatures:
        raise ExportCheckError(f"{path}: the SavedModel has no serving_default signature "
                               f"(has: {', '.join(loaded.signatures) or 'none'})")
    serve = loaded.signatures["serving_default"]
    (input_name,) = serve.structured_input_signature[1].keys()

    def predict(images):
        outputs = serve(**{input_name: tf.constant(images, dtype=tf.float32)})
        if len(outputs) != 1:
            raise ExportCheckError(f"{path}: expected one output from serving_default, got {sorted(outputs)}")
        return next(iter(outputs.values())).numpy().astype(np.float32)

    return predict


def tflite_interpreter(path: Path):
    """ai_edge_litert's Interpreter when installed, else tf.lite's (deprecated, same API)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        return Interpreter(model_path=str(path))


def tflite_predictor(path: Path):
    interpreter = tflite_interpreter(path)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    state = {"batch": None}

    def predict(images):
        images = np.asarray(images, np.float32)
        if state["batch"] != len(images):
            interpreter.resize_tensor_input(inp["index"], list(images.shape))
            interpreter.allocate_tensors()
            state["batch"] = len(images)
        feed = images
        if inp["dtype"] != np.float32:  # an integer-input model: quantize with its own parameters
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            feed = np.clip(np.round(images / scale + zero), info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], feed)
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            result = (result.astype(np.float32) - zero) * scale
        return np.asarray(result, np.float32)

    predict.io = f"{np.dtype(inp['dtype']).name} -> {np.dtype(out['dtype']).name}"
    return predict


def onnx_predictor(path: Path):
    try:
        import onnxruntime
    except ImportError as error:
        raise FinetuneError(f"export.formats: onnx could not import onnxruntime ({error}); "
                            "reinstall it with: pip install 'finetune[onnx]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), outputs = session.get_inputs(), session.get_outputs()
    if len(outputs) != 1:
        raise ExportCheckError(f"{path}: expected one output, got {[o.name for o in outputs]}")

    def predict(images):
        (result,) = session.run(None, {inp.name: np.asarray(images, np.float32)})
        return np.asarray(result, np.float32)

    predict.io = f"{inp.type} -> {outputs[0].type}"
    return predict


# -- the check ---------------------------------------------------------------------------------------
def compare(reference: np.ndarray, probs: np.ndarray, tie_margin: float = TIE_MARGIN) -> dict:
    """How far `probs` is from the Keras model's `reference` probabilities on the same images.

    top1_agreement: the fraction of images with the same top-1 class. near_ties: images whose Keras
    top-1 leads the export's choice by less than `tie_margin` (reported, never failures).
    decisive_disagreements: the other images where the top-1 differs."""
    reference = np.asarray(reference, np.float64)
    probs = np.asarray(probs, np.float64)
    if probs.shape != reference.shape:
        raise ExportCheckError(f"output shape {probs.shape} differs from the Keras model's {reference.shape}")
    finite = bool(np.isfinite(probs).all())
    ref_top, top = reference.argmax(axis=1), np.nan_to_num(probs, nan=-np.inf).argmax(axis=1)
    differs = ref_top != top
    rows = np.arange(len(reference))
    lead = reference[rows, ref_top] - reference[rows, top]  # how much Keras prefers its own choice
    near_tie = differs & (lead < tie_margin)
    return {
        "images": int(len(reference)),
        "max_abs_diff": float(np.abs(probs - reference).max()) if finite else float("nan"),
        "mean_abs_diff": float(np.abs(probs - reference).mean()) if finite else float("nan"),
        "top1_agreement": float(1.0 - differs.mean()),
        "near_ties": int(near_tie.sum()),
        "decisive_disagreements": int((differs & ~near_tie).sum()) if finite else int(len(reference)),
        "finite": finite,
    }


def judge(name: str, quantize: str | None, result: dict) -> tuple[str | None, str | None]:
    """(failure, warning) for one export's comparison: float exports must agree; quantized may warn."""
    is_float = quantize is None or quantize in FLOAT_QUANTIZE
    if not result["finite"]:
        return f"{name}: the export's outputs are not all finite", None
    if is_float and result["decisive_disagreements"]:
        return (f"{name}: top-1 differs from the Keras model on {result['decisive_disagreements']} of "
                f"{result['images']} check image(s) (max abs diff {result['max_abs_diff']:.3g})"), None
    if not is_float and result["top1_agreement"] < WARN_AGREEMENT:
        ties = (f"; {result['near_ties']} of the differences are near-ties in the Keras model "
                f"(top-2 within {TIE_MARGIN:g})" if result["near_ties"] else "")
        return None, (f"{name}: top-1 agreement with Keras is {result['top1_agreement']:.0%} "
                      f"(< {WARN_AGREEMENT:.0%}) on {result['images']} image(s){ties}")
    return None, None


def size_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def format_table(rows: list[dict]) -> str:
    header = f"  {'format':<16} {'file':<22} {'size KB':>10} {'max abs diff':>13} {'top-1 agree':>12}  status"
    lines = [header, "  " + "-" * (len(header) - 2)]
    for row in rows:
        agree = f"{row['top1_agreement']:.1%}"
        lines.append(f"  {row['format']:<16} {row['file']:<22} {row['size_kb']:>10.1f} "
                     f"{row['max_abs_diff']:>13.3g} {agree:>12}  {row['status']}")
    return "\n".join(lines)
