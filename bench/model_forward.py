"""Forward throughput of GLIP-T(C): 256-padded vs dynamic text padding, batch 1 vs 4.

Prints images/s for each setting and ratios against the official setting measured in the
same run (prompts padded to 256 tokens, batch 1). On the CPU it runs at the reference size
(480x640, no resize); with a GPU it also runs at the official test size (800x1333) in fp32
and bf16 autocast.

    .venv/bin/python bench/model_forward.py [--variant glip-t] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from model.config import get_config
from model.network.glip import GLIP
from model.inputs.text import load_tokenizer, tokenize

CAPTION = "person. bicycle. car. dog. a red umbrella. traffic light."


def measure(model, images, text, *, repeats: int, bf16: bool) -> float:
    """Seconds per forward, best of `repeats` after one warm-up."""
    device = images.device
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    timings = []
    with torch.inference_mode(), autocast:
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(images, text["input_ids"], text["attention_mask"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                timings.append(time.perf_counter() - start)
    return min(timings)


def run(device: torch.device, height: int, width: int, *, variant: str, repeats: int, bf16: bool) -> None:
    torch.manual_seed(0)
    model = GLIP(get_config(variant)).eval().to(device)
    tokenizer = load_tokenizer()
    rows = []
    for batch in (1, 4):
        images = torch.randn(batch, 3, height, width, device=device)
        for pad_to_max in (True, False):
            text = tokenize(tokenizer, [CAPTION] * batch, max_length=256, pad_to_max=pad_to_max)
            text = {k: v.to(device) for k, v in text.items()}
            seconds = measure(model, images, text, repeats=repeats, bf16=bf16)
            rows.append((batch, "256" if pad_to_max else f"dynamic({text['input_ids'].shape[1]})", batch / seconds))
    baseline = rows[0][2]
    tag = f"{variant} on {device.type} at {height}x{width}{' bf16' if bf16 else ' fp32'}"
    print(f"\n{tag}")
    print(f"{'batch':>5} {'text padding':>14} {'images/s':>10} {'vs batch1/256':>14}")
    for batch, padding, rate in rows:
        print(f"{batch:>5} {padding:>14} {rate:>10.3f} {rate / baseline:>13.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="glip-t")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    run(torch.device("cpu"), 480, 640, variant=args.variant, repeats=args.repeats, bf16=False)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name(gpu)}")
        for bf16 in (False, True):
            run(gpu, 800, 1344, variant=args.variant, repeats=max(args.repeats, 5), bf16=bf16)
    else:
        print("\nno GPU here: GPU figures (800x1333, bf16) are printed when one is available")


if __name__ == "__main__":
    main()
