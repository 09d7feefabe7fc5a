"""Training-step benchmarks of ipu_norm models against timm, Proxy Norm and AGC overheads (see run.py)."""

from ipu_norm.bench.harness import StepTimes, TrainStep, Variant, gemm_peak_flops, time_interleaved

__all__ = ["StepTimes", "TrainStep", "Variant", "gemm_peak_flops", "time_interleaved"]
