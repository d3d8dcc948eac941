"""OpenVINO on the CPU: the deploy runtime most users pick for x86 (and ultralytics recommends).

A model is converted from the very ONNX file ONNX Runtime and TensorRT get (fp32, or the INT8
Q/DQ model: OpenVINO reads QuantizeLinear/DequantizeLinear as its own quantized ops), saved as an
``<name>_openvino_model/`` folder that ultralytics' AutoBackend runs (IR + metadata.yaml), and
compiled with :data:`CPU_CONFIG`, for timing and for validation alike:

- **precision f32.** OpenVINO's default on a CPU with AMX or AVX512-BF16 is to run an fp32 model
  in bfloat16; an "fp32" row must be fp32 (an INT8 model keeps its float layers in fp32 too).
- **ISA cap lifted.** The pipeline caps oneDNN to AVX2 (``ONEDNN_MAX_CPU_ISA``, see
  stages/pipeline/runtime.py) so that torch trains alike on every x86 CPU; OpenVINO's own oneDNN
  reads the same variable and then, on some CPUs and precisions, has no kernel for a node
  ("Supported primitive descriptors list is empty for node: /model.9/m/MaxPool": an AMD EPYC
  without AVX-512 at fp32, an Intel Xeon with AMX at OpenVINO's default bf16).
  :func:`kernel_cap_lifted` removes it while OpenVINO compiles, after torch's oneDNN has read it
  (each library reads it once), and the IR runs the kernels OpenVINO picks for the CPU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import openvino as ov
import torch
import yaml

from stages.pipeline.cli import UserError
from stages.pipeline.runtime import cpu_threads

ISA_CAP = "ONEDNN_MAX_CPU_ISA"
SUFFIX = "_openvino_model"  # the folder name ultralytics' AutoBackend recognises
PRECISION = "f32"


def cpu_config() -> dict[str, Any]:
    """How every OpenVINO model of the pipeline is compiled: one image at a time (latency), fp32,
    on as many threads as ONNX Runtime and torch get."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": PRECISION,
        "INFERENCE_NUM_THREADS": cpu_threads(),
    }


def version() -> str:
    return ov.get_version().split("-")[0]


def _pin_torch_kernels() -> None:
    """Run one oneDNN convolution in torch, so that torch's oneDNN has read the ISA cap before it
    is lifted (torch sends only convolutions of some size to oneDNN)."""
    with torch.inference_mode():
        torch.nn.functional.conv2d(torch.ones(1, 64, 64, 64), torch.ones(64, 64, 3, 3))


@contextlib.contextmanager
def kernel_cap_lifted() -> Iterator[None]:
    """Within the block, oneDNN's ISA cap is unset (for OpenVINO), and torch keeps its capped
    kernels; the variable is restored after, for the processes the stage starts."""
    cap = os.environ.get(ISA_CAP)
    if cap is None:
        yield
        return
    _pin_torch_kernels()
    del os.environ[ISA_CAP]
    try:
        yield
    finally:
        os.environ[ISA_CAP] = cap


def reason(err: Exception) -> str:
    """OpenVINO's message without its source locations: the lines that say what failed."""
    lines = [line.strip() for line in str(err).splitlines()]
    said = [line for line in lines if line and not line.startswith(("Exception from", "Check "))]
    return " ".join(said or lines)[:400]


def compile_checked(
    model: ov.Model | Path, name: str, config: dict[str, Any] | None = None
) -> ov.CompiledModel:
    """``model`` compiled on the CPU with ``config`` (:func:`cpu_config` by default), or a
    one-line error naming the model, the node and OpenVINO's reason. The ISA cap must already be
    lifted (:func:`compiled` does that)."""
    core = ov.Core()
    try:
        return core.compile_model(model, "CPU", cpu_config() if config is None else config)
    except RuntimeError as err:
        raise UserError(
            f"OpenVINO {version()} cannot compile {name} for this CPU: {reason(err)}. Deploy "
            f"without that layer type, or report it with the OpenVINO version."
        ) from None


def compiled(folder: Path) -> ov.CompiledModel:
    """The IR in ``folder`` (written by :func:`write_ir`) compiled for timing or agreement."""
    with kernel_cap_lifted():
        return compile_checked(ir_file(folder), folder.name)


def ir_file(folder: Path) -> Path:
    files = sorted(folder.glob("*.xml"))
    if len(files) != 1:
        raise UserError(f"{folder} holds {len(files)} OpenVINO .xml files, expected one.")
    return files[0]


def folder_for(onnx_path: Path) -> Path:
    """Where the IR of ``onnx_path`` goes: ``model.int8.onnx`` -> ``model_int8_openvino_model/``."""
    return onnx_path.with_name(onnx_path.name.removesuffix(".onnx").replace(".", "_") + SUFFIX)


def write_ir(onnx_path: Path) -> Path:
    """Convert ``onnx_path`` to an OpenVINO IR folder beside it (weights as they are: no fp16
    compression), with ultralytics' metadata.yaml taken from the ONNX model's metadata; compile it
    once, so that a model OpenVINO cannot run fails here. Returns the folder (replaced, if one
    was there)."""
    folder = folder_for(onnx_path)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        model = ov.Core().read_model(onnx_path)
    except RuntimeError as err:
        raise UserError(
            f"OpenVINO {version()} cannot read {onnx_path.name}: {reason(err)}."
        ) from None
    name_unnamed_nodes(model)
    stem = folder.name.removesuffix(SUFFIX)
    ov.save_model(model, folder / f"{stem}.xml", compress_to_fp16=False)
    props = onnx.load(onnx_path, load_external_data=False).metadata_props
    (folder / "metadata.yaml").write_text(yaml.safe_dump({p.key: p.value for p in props}))
    compiled(folder)
    return folder


def name_unnamed_nodes(model: ov.Model) -> None:
    """Name the nodes the ONNX reader created without a name by their place in the graph: their
    default names count every node made in the process so far, and would change the IR's bytes
    (and DVC's hash) from run to run."""
    for index, node in enumerate(model.get_ordered_ops()):
        if node.get_friendly_name() == node.get_name():
            node.set_friendly_name(f"{node.get_type_name()}_{index}")


def raw_outputs(model: ov.CompiledModel, images: np.ndarray) -> np.ndarray:
    """The model's raw output for ``images`` (as :func:`stages.deploy.onnxrt.raw_outputs`), run in
    the model's static batch (a short last batch is left out)."""
    batch = model.input(0).get_shape()[0]
    runs = [
        model(np.ascontiguousarray(images[i : i + batch]))[0]
        for i in range(0, len(images) - batch + 1, batch)
    ]
    return np.concatenate(runs)


def convolution_precisions(model: ov.CompiledModel) -> dict[str, int]:
    """How many convolutions the compiled model really runs in 8 bits and in float (OpenVINO
    fuses a Q/DQ pair around a Conv into one INT8 convolution; an unfused one stays float)."""
    precisions = [
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in model.get_runtime_model().get_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    ]
    eight_bit = sum(p in ("i8", "u8") for p in precisions)
    return {"int8_convs": eight_bit, "float_convs": len(precisions) - eight_bit}


@contextlib.contextmanager
def as_compiled_here() -> Iterator[None]:
    """Within the block, every OpenVINO compile runs on the CPU with :func:`cpu_config`, the ISA
    cap lifted: ultralytics' AutoBackend (validation) compiles an ``_openvino_model/`` folder
    itself, with a latency hint only, and would run it in bfloat16 where the CPU has it (or on
    another device, through AUTO)."""
    original = ov.Core.compile_model

    def on_the_cpu(core: ov.Core, model: Any, device_name: Any = None, config: Any = None, **kw):
        return original(core, model, "CPU", {**(config or {}), **cpu_config()}, **kw)

    ov.Core.compile_model = on_the_cpu
    try:
        with kernel_cap_lifted():
            yield
    finally:
        ov.Core.compile_model = original
