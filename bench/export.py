"""Explain throughput by backend: ONNX Runtime (CPU) vs torch eager, same model, one run.

    python bench/export.py                       # bundled demo model, batch 4 x 2 prompts
    python bench/export.py --clap random:tiny --decoder runs/dec1 --batch-size 8

Exports the model once into a temporary folder, then times the batched explain step
(`Runner.explain`: front end, encoder, decoder, masked encoder pass, listenable inverse) on
the same random 10-s windows for each backend: median over --repeats timed runs after one
warm-up. Prints a table and one JSON line. Target: ORT CPU >= 1.5x torch eager.

With a CUDA GPU it also times TensorRT fp16 engines vs torch eager fp32 (target >= 5x, needs
tensorrt) and the fused Triton listenable kernel vs torch mask expansion + torch.istft
(target >= 3x, needs triton), and names the GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from typing import Callable

import torch

from lmaczs_cli.audio import CLIP_SAMPLES


def _median_s(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    fn()                                               # warm-up (session init, allocations)
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(batch: int, prompts: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    waves = 0.1 * torch.randn(batch, CLIP_SAMPLES, generator=g)
    text = torch.nn.functional.normalize(torch.randn(batch, prompts, dim, generator=g), dim=-1)
    return waves, text


def bench_cpu(args: argparse.Namespace, folder: str) -> dict[str, float]:
    from lmaczs_cli.backends import OnnxRunner, load_runner

    torch_runner = load_runner("torch", clap=args.clap, decoder=args.decoder, device="cpu")
    onnx_runner = OnnxRunner(folder, device="cpu", threads=args.threads)
    waves, text = _inputs(args.batch_size, args.prompts, onnx_runner.config["joint_dim"])
    clips = args.batch_size
    t_torch = _median_s(lambda: torch_runner.explain(waves, text), args.repeats)
    t_ort = _median_s(lambda: onnx_runner.explain(waves, text), args.repeats)
    return {"torch_cpu_clips_per_s": clips / t_torch, "ort_cpu_clips_per_s": clips / t_ort,
            "ort_vs_torch": t_torch / t_ort}


def bench_gpu(args: argparse.Namespace, folder: str) -> dict[str, object]:
    """TensorRT fp16 vs torch eager fp32 explain, and the Triton kernel vs torch ops (CUDA only)."""
    from lmaczs_cli import spectral
    from lmaczs_cli.explain import Explainer

    out: dict[str, object] = {"gpu": torch.cuda.get_device_name()}
    ex = Explainer.load(clap=args.clap, decoder=args.decoder, device="cuda")
    waves, text = _inputs(args.batch_size, args.prompts, ex.clap.cfg.joint_dim)
    waves, text = waves.cuda(), text.cuda()

    def torch_fp32() -> object:
        with torch.no_grad():
            return ex.model(waves, text)

    t_torch = _median_s(torch_fp32, args.repeats, sync=True)
    out["torch_cuda_fp32_clips_per_s"] = args.batch_size / t_torch
    try:
        from lmaczs_cli.backends import TrtRunner
        from lmaczs_cli.export.to_onnx import export_onnx
        from lmaczs_cli.export.to_trt import export_engines

        fp16_folder = f"{folder}-fp16"     # TensorRT precision comes from the graph: an fp16 export
        export_onnx(ex.clap, ex.decoder, fp16_folder, domain=ex.domain, max_batch=args.batch_size, fp16=True)
        export_engines(fp16_folder, max_batch=args.batch_size, max_prompts=max(2, args.prompts))
        trt = TrtRunner(fp16_folder)
        t_trt = _median_s(lambda: trt.explain(waves, text), args.repeats, sync=True)
        out.update(trt_fp16_clips_per_s=args.batch_size / t_trt, trt_fp16_vs_torch_fp32=t_torch / t_trt)
    except Exception as e:          # report what could not be measured, keep the rest
        out["trt_error"] = f"{type(e).__name__}: {e}"
    try:
        from lmaczs_cli.kernels.istft import masked_istft

        X = spectral.stft(waves)
        masks = torch.rand(args.batch_size * args.prompts, X.shape[1], 64, device="cuda")
        W = spectral.mel_to_linear_weights("cuda")

        def torch_ops() -> torch.Tensor:
            gain = masks @ W
            Xk = X.repeat_interleave(args.prompts, 0) * gain
            return torch.istft(Xk.transpose(1, 2), 1024, 480, window=spectral.hann_window("cuda"),
                               center=True, length=CLIP_SAMPLES)

        t_ops = _median_s(torch_ops, args.repeats, sync=True)
        t_kernel = _median_s(lambda: masked_istft(X.real, X.imag, masks, args.prompts, W, CLIP_SAMPLES),
                             args.repeats, sync=True)
        out.update(triton_ms=1e3 * t_kernel, torch_istft_ms=1e3 * t_ops, triton_vs_torch=t_ops / t_kernel)
    except Exception as e:
        out["triton_error"] = f"{type(e).__name__}: {e}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clap", default="demo")
    ap.add_argument("--decoder", default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lmaczs_cli.export import export_explainer_folder

    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        export_explainer_folder(folder, clap=args.clap, decoder=args.decoder)
        result: dict[str, object] = {"model": args.clap, "batch": args.batch_size, "prompts": args.prompts,
                                     "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                                     "export_s": time.perf_counter() - t0}
        result.update(bench_cpu(args, folder))
        if torch.cuda.is_available():
            result.update(bench_gpu(args, folder))
    for k, v in result.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
