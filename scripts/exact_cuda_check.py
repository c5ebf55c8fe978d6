"""Bit-identical reconstruction of the exact stream arithmetic under each scaled-dot-product-attention backend.

    python scripts/exact_cuda_check.py --device cuda --out output/exact_cuda.json   # GPU (scripts/gpu_check.sh)
    python scripts/exact_cuda_check.py --device cpu                                  # the same code path on CPU

The reversible backward recomputes each layer's F and G with grad enabled, while the forward ran them
without grad; PyTorch may pick a different attention kernel for the two (e.g. flash without grad, another
with grad), and a kernel that differs by one bit breaks the exact reconstruction. For a small random OPT
and LLaMA in bf16 (MEFT1, exact stream arithmetic, no padding so that every backend is eligible), under
no pin and under each SDPA backend pinned with torch.nn.attention.sdpa_kernel: one forward + backward in
reversible mode (the keyed checksum raises ReconstructionError on any mismatch) and one in vanilla
(cached) mode; the loss and every gradient must be bit-identical. A backend the machine cannot run is
recorded as unsupported, not failed. Writes the per-case record as JSON to --out; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import transformers as tf
from torch.nn.attention import SDPBackend, sdpa_kernel

from meft_ds import MEFTConfig, make_reversible, set_backward
from meft_ds.reversible import MEFTStack, ReconstructionError

BACKENDS = {"unpinned": None, "math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def build(family: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=6, vocab_size=1000,
                  max_position_embeddings=256, attn_implementation="sdpa")
    if family == "opt":
        config = tf.OPTConfig(ffn_dim=256, word_embed_proj_dim=128, **common)
        model = tf.OPTForCausalLM(config)
    else:
        config = tf.LlamaConfig(intermediate_size=256, num_key_value_heads=4, **common)
        model = tf.LlamaForCausalLM(config)
    model.to(device=device, dtype=torch.bfloat16)
    # float32 stream values: with them the reversible and cached gradients are bit-identical, so any kernel
    # difference shows; bf16 values (the default with bf16 weights) sum gradients in bf16 in another order.
    make_reversible(model, MEFTConfig(variant="meft1", stream_arithmetic="exact", stream_dtype="float32"))
    for stack in model.modules():
        if isinstance(stack, MEFTStack):
            stack.mix.data.fill_(0.3)  # every path carries gradient
    return model


def step(model, batch, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    set_backward(model, mode)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # the same adapter dropout masks in both modes
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check(family: str, backend: str, device: str) -> dict:
    model = build(family, device)
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 1000, (2, 64), generator=generator).to(device)
    batch = {"input_ids": ids, "labels": ids}  # no attention mask: flash and the others are eligible
    pin = BACKENDS[backend]
    context = sdpa_kernel([pin]) if pin is not None else torch.enable_grad()
    record = {"family": family, "backend": backend}
    try:
        with context:
            loss_r, grads_r = step(model, batch, "reversible")
            loss_v, grads_v = step(model, batch, "vanilla")
    except ReconstructionError as error:
        return {**record, "status": "fail", "error": f"ReconstructionError: {error}"}
    except RuntimeError as error:
        if pin is not None and any(m in str(error) for m in ("No viable backend", "No available kernel")):
            return {**record, "status": "unsupported", "error": str(error).splitlines()[0]}
        raise
    different = sorted(n for n in grads_v.keys() | grads_r.keys()
                       if n not in grads_r or n not in grads_v or not torch.equal(grads_r[n], grads_v[n]))
    same_loss = torch.equal(loss_r, loss_v)
    return {**record, "status": "pass" if same_loss and not different else "fail",
            "loss": loss_r.item(), "same_loss": same_loss, "gradients": len(grads_v), "different_gradients": different}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file for the record (default: print only).")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    start = time.time()
    cases = [check(family, backend, args.device) for family in ("opt", "llama") for backend in BACKENDS]
    passed = all(c["status"] in ("pass", "unsupported") for c in cases) and any(c["status"] == "pass" for c in cases)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "pass": passed, "seconds": round(time.time() - start, 1), "cases": cases}
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
