"""GPTQ on a GPU: wall time of comptrust's quantize() (llm-compressor's GPTQModifier underneath) on a Llama-2
architecture with random bf16 weights built on the GPU (GPTQ's time depends on shapes, not weight values).

    python bench/compress_gpu.py --arch llama2-7b-random --tokenizer .carry/tp/tok [--n-calib 128 --seq-len 512]

Reference point from llm-compressor's documentation: Llama-3-8B, GPTQ W4A16, ~745 s on one GPU.
Prints one JSON line and writes <out-dir>/compress_gpu_<arch>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama2-7b-random")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--random-calib", action="store_true",
                    help="n-calib samples of exactly seq-len random token ids (the size of llm-compressor's example: "
                         "512 x 2048), instead of the built-in conversations (152 of them, short)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: smoke test of this script on the CPU")
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from comptrust.compress.calibration import load_calibration
    from comptrust.compress.config import CompressionConfig
    from comptrust.compress.methods import method

    t0 = time.time()
    _, model = tp.random_llama7b(args.tokenizer, args.device, tiny=args.tiny, arch=args.arch)
    build_s = time.time() - t0
    # llm-compressor re-reads the config from the model's name_or_path: give the in-memory model a folder
    import tempfile

    cfg_dir = tempfile.mkdtemp(prefix="ct-random-")
    model.config.save_pretrained(cfg_dir)
    model.config._name_or_path = model.name_or_path = cfg_dir
    tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
    if args.random_calib:
        from comptrust.compress.calibration import CalibrationSet

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, len(tok), (args.n_calib, args.seq_len), generator=g).tolist()
        calib = CalibrationSet(source="random token ids", kind="random", indices=list(range(args.n_calib)),
                               texts=[""] * args.n_calib, input_ids=ids, seq_len=args.seq_len, seed=0,
                               n_available=args.n_calib, chat_template=False)
    else:
        calib = load_calibration(None, tok, args.n_calib, args.seq_len, 0)
    cfg = CompressionConfig.build(method="gptq", bits=args.bits, group_size=args.group_size, n_calib=args.n_calib,
                                  seq_len=args.seq_len, seed=0)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    info = method("gptq").apply(model, tok, cfg, calib)  # what `comptrust compress --method gptq` runs
    if cuda:
        torch.cuda.synchronize()
    secs = time.time() - t0
    res = {
        "arch": args.arch, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "method": f"gptq w{args.bits} g{args.group_size}", "params": sum(p.numel() for p in model.parameters()),
        "calibration": {"source": calib.source, "samples": calib.n, "seq_len": args.seq_len, "tokens": sum(len(x) for x in calib.input_ids)},
        "quantize_seconds": round(secs, 1), "library_seconds": info.get("library_time_s"),
        "model_build_seconds": round(build_s, 1), "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "reference": "llm-compressor docs: Llama-3-8B GPTQ W4A16 ~745 s on one GPU",
    }
    print(json.dumps(res))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"compress_gpu_{args.arch}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
