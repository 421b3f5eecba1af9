"""qlinear: the W8A8 quantized linear layer on any GPU (WGSL via wgpu), on NVIDIA
(CUDA via NVRTC) and on the CPU (numpy), behind one plan interface.

>>> import numpy as np, qlinear as ql
>>> layer = ql.QuantizedLinear.from_float(np.eye(4, dtype=np.float32), backend="cpu")
>>> layer(np.array([[1.0, -2.0, 0.5, 0.0]], np.float32)).round(2)
array([[ 1. , -2. ,  0.5,  0. ]], dtype=float32)
"""

from .backends import (
    Backend,
    BackendStatus,
    Executable,
    PrecisionGuarantee,
    backend,
    backend_names,
    backend_status,
)
from .dtypes import DType, bf16, f16, f32, f64, s8, s32
from .errors import (
    BackendUnavailable,
    DeviceError,
    InvalidProblem,
    QlinearError,
    QlinearWarning,
    Unsupported,
)
from .layer import QuantizedLinear, quantize_weight
from .plans import DynamicRangeQuantizePlan, QuantizedLinearPlan
from .problem import (
    DynamicRangeQuantizeArgs,
    DynamicRangeQuantizeDescriptor,
    QuantizedLinearArgs,
    QuantizedLinearDescriptor,
    max_exact_k,
)
from .schemes import ActivationScheme, weight_colsum
from .tensors import Tensor

__version__ = "0.1.0"

__all__ = [
    "Backend", "BackendStatus", "Executable", "PrecisionGuarantee", "backend", "backend_names",
    "backend_status",
    "DType", "f32", "f16", "bf16", "f64", "s8", "s32",
    "QlinearError", "InvalidProblem", "Unsupported", "BackendUnavailable", "DeviceError",
    "QlinearWarning",
    "QuantizedLinear", "quantize_weight",
    "QuantizedLinearPlan", "DynamicRangeQuantizePlan",
    "QuantizedLinearDescriptor", "DynamicRangeQuantizeDescriptor", "QuantizedLinearArgs",
    "DynamicRangeQuantizeArgs", "max_exact_k", "ActivationScheme", "weight_colsum",
    "Tensor",
]
