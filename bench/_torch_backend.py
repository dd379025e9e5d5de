"""A torch predictor behind the pipeline's predictor interface, for measuring the GPU path.

The GPU machines this benchmark runs on have torch with CUDA but no onnxruntime-gpu, so the GPU numbers are
taken with the same network's torch weights (the checkpoint the ONNX was exported from, parity-checked by
bench_analyze) behind the interface `service.analysis.inference.TilePredictor` asks for: uint8 (B, S, S, 3) RGB in,
`Prediction(class_probs, fg_prob)` out as float32 numpy, and `predict_dense` for regions of a dense plan. Benchmark-only: the service itself runs ONNX.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TorchPredictor:
    """The exported graph's computation (`model.export.OnnxWrapper`) in torch on ``device``.

    ``metadata``, ``input_size`` and ``fm_size`` come from the ONNX predictor of the same model, so plans, the
    stitching and the result are exactly those of an ONNX analysis. ``half`` runs the network under bf16
    autocast (outputs stay float32).
    """

    def __init__(self, torch_model: Any, onnx_predictor: Any, device: str = "cuda", half: bool = False):
        import torch

        from model.export import OnnxWrapper

        self._torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        self.half = half
        self.metadata = onnx_predictor.metadata
        self.sha256 = onnx_predictor.sha256
        self.input_size, self.fm_size = onnx_predictor.input_size, onnx_predictor.fm_size
        self._net = OnnxWrapper(torch_model.to(self.device).eval(), torch_model.config).eval()
        self._dense_net = OnnxWrapper(torch_model, torch_model.config, dense=True).eval()
        self.providers = [f"torch-{self.device.type}{' bf16' if half else ''}"]

    def describe(self) -> dict[str, Any]:
        """The backend, for the benchmark's JSON."""
        torch = self._torch
        info: dict[str, Any] = {
            "backend": "torch",
            "device": str(self.device),
            "bf16": self.half,
            "torch": torch.__version__,
        }
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info.update(
                gpu=props.name,
                gpu_mem_gib=round(props.total_memory / 2**30, 1),
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
            )
        return info

    def predict(self, tiles: np.ndarray) -> Any:
        """uint8 tiles to the device, the network, the two outputs back as float32 numpy."""
        from model.runtime import Prediction

        torch = self._torch
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (self.input_size,) * 2 + (3,):
            raise ValueError(
                f"expected uint8 (B, {self.input_size}, {self.input_size}, 3), got "
                f"{tiles.dtype} {tiles.shape}"
            )
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.half):
                probs, fg = self._net(x)
            probs_np = probs.float().cpu().numpy()
            fg_np = fg.float()[:, 0].cpu().numpy()
        return Prediction(class_probs=probs_np, fg_prob=fg_np)

    def predict_dense(self, regions: np.ndarray) -> Any:
        """uint8 regions (B, H, W, 3) to the device, the dense network, fg_prob and class_logits back."""
        from model.runtime import DensePrediction

        torch = self._torch
        k = self.metadata.output_stride
        if regions.dtype != np.uint8 or regions.ndim != 4 or regions.shape[1] % k or regions.shape[2] % k:
            raise ValueError(f"expected uint8 (B, H, W, 3) with H, W multiples of {k}, got "
                             f"{regions.dtype} {regions.shape}")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(regions)).to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.half):
                _, fg, logits = self._dense_net(x)
            return DensePrediction(fg_prob=fg.float()[:, 0].cpu().numpy(), class_logits=logits.float().cpu().numpy())
