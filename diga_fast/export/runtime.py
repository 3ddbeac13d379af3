"""An exported diga-fast ONNX file in ONNX Runtime: ``diga predict/eval --onnx`` and ``diga bench infer``.

Session settings, set explicitly (ONNX Runtime 1.32's defaults happen to agree, older releases and
other builds differ): all graph optimisations (``ORT_ENABLE_ALL``: constant folding, Conv+BN/Add/ReLU
fusion and the NCHWc layout of the CPU's convolution kernels; on a 2-core EPYC it ran the small model
at 512x1024 1.4x faster than ``ORT_ENABLE_EXTENDED`` and 1.8x faster than ``ORT_ENABLE_BASIC``, which
``diga bench infer --impl ort-cpu-fp32-basic`` shows), sequential execution (a segmentation net is one
chain of convolutions: running branches in parallel gains nothing and costs thread hand-offs), one
inter-op thread and as many intra-op threads as the process has *physical* cores (hyper-threads share
the vector units the convolutions saturate). The CUDA provider is used when onnxruntime-gpu is
installed and ``device`` allows it, the CPU provider otherwise.

Inputs: ``image`` float32 [B, 3, H, W], RGB in [0, 1]. Pictures that are not 8-bit RGB (greyscale,
palette, RGBA, 16-bit) are converted to that by :class:`~diga_fast.data.datasets.ImageFolder`
(``to_rgb_uint8``) before they get here; anything else is refused with one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from diga_fast.errors import DigaError
from diga_fast.export.wrapper import FORMAT, label_space_from_metadata


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise DigaError("onnxruntime is not installed: pip install 'diga-fast[cpu]' (or 'diga-fast[gpu]' "
                        "for onnxruntime-gpu; never both)") from None
    return onnxruntime


def physical_cores() -> int:
    """Physical cores this process may run on (Linux: distinct (package, core) pairs among the CPUs of
    its affinity mask); the logical CPU count where that cannot be read."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = set(range(os.cpu_count() or 1))
    try:
        cores, processor, package = set(), None, "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                processor = int(value)
            elif key == "physical id":
                package = value
            elif key == "core id" and processor in allowed:
                cores.add((package, value))
        return max(1, min(len(cores), len(allowed))) if cores else max(1, len(allowed))
    except (OSError, ValueError):
        return max(1, len(allowed))


def session_options(threads: int | None = None, optimization: str = "all"):
    """ONNX Runtime session options (module docstring); ``optimization`` "basic" | "extended" | "all"."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.graph_optimization_level = levels[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no warnings about unused initialisers etc.
    return options


def providers_for(device: str = "auto") -> list:
    """``auto``: CUDA when this onnxruntime has the CUDA provider, else CPU; ``cpu``; ``cuda[:N]``."""
    ort = import_onnxruntime()
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    device = (device or "auto").lower()
    if device == "cpu" or (device == "auto" and not has_cuda):
        return ["CPUExecutionProvider"]
    index = 0
    if device.startswith("cuda"):
        if not has_cuda:
            raise DigaError(f"--device {device}: this onnxruntime has no CUDA provider "
                            f"(install onnxruntime-gpu: pip install 'diga-fast[gpu]')")
        _, _, number = device.partition(":")
        if number and not number.isdigit():
            raise DigaError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
        index = int(number or 0)
    elif device != "auto":
        raise DigaError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights not loaded); DigaError if it is not ONNX."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise DigaError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises several types for a file that is not ONNX
        raise DigaError(f"{path} is not an ONNX model ({type(err).__name__})") from None
    if not model.graph.node:
        raise DigaError(f"{path} is not an ONNX model (it holds no graph)")
    return {prop.key: prop.value for prop in model.metadata_props}


class OnnxSegmenter:
    """A diga-fast ONNX export in an ONNX Runtime session. Call it with an image batch (torch or numpy,
    [B, 3, H, W] RGB in [0, 1]) for logits [B, K, H, W] as a float32 torch tensor; an export made
    with ``--argmax`` returns the one-hot encoding of its labels instead, so the argmax of the result
    is always the prediction and the callers need no second code path."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None,
                 optimization: str = "all", providers: list | None = None) -> None:
        ort = import_onnxruntime()
        self.path = Path(path)
        self.metadata = read_onnx_metadata(self.path)
        if self.metadata.get("diga.format") != FORMAT:
            raise DigaError(f"{self.path} is an ONNX model but not a diga-fast export (no diga.* metadata; "
                            "make one with 'diga export')")
        self.label_space = label_space_from_metadata(self.metadata)
        self.num_classes = self.label_space.num_classes
        self.precision = self.metadata.get("diga.precision", "fp32")
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads, optimization),
                                                providers=providers or providers_for(device))
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise DigaError(f"ONNX Runtime cannot load {self.path}: {_first_line(err)}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != ["image"] or len(outputs) != 1 or outputs[0].name not in ("logits", "labels"):
            raise DigaError(f"{self.path}: expected one input 'image' and one output 'logits' or 'labels'")
        self.output_name = outputs[0].name
        classes = outputs[0].shape[1] if self.output_name == "logits" and len(outputs[0].shape) == 4 else None
        if isinstance(classes, int) and classes != self.num_classes:
            raise DigaError(f"{self.path}: its logits have {classes} channels, its metadata says "
                            f"{self.label_space.name} ({self.num_classes} classes)")
        self.provider = self.session.get_providers()[0]

    @property
    def returns_labels(self) -> bool:
        return self.output_name == "labels"

    def run(self, image: np.ndarray) -> np.ndarray:
        """The raw graph: float32 [B, 3, H, W] -> logits or labels, numpy in and out."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise DigaError(f"ONNX input must be [B, 3, H, W] RGB, got shape {tuple(image.shape)} "
                            "(greyscale/RGBA images are converted to RGB by the image loader)")
        image = np.ascontiguousarray(image, dtype=np.float32)
        try:
            return self.session.run([self.output_name], {"image": image})[0]
        except Exception as err:  # noqa: BLE001
            raise DigaError(f"ONNX Runtime failed on a {'x'.join(map(str, image.shape))} input: "
                            f"{_first_line(err)}") from None

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        out = torch.from_numpy(self.run(array))
        if not self.returns_labels and out.shape[1] != self.num_classes:  # a graph with a dynamic class axis
            raise DigaError(f"{self.path}: its logits have {out.shape[1]} channels, its metadata says "
                            f"{self.label_space.name} ({self.num_classes} classes)")
        if self.returns_labels:
            out = torch.nn.functional.one_hot(out.long(), self.num_classes).permute(0, 3, 1, 2).float()
        return out.to(device)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(err).__name__)
