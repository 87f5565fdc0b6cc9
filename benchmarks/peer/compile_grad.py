"""Where ``torch.compile``'s LoRA gradient differs from eager (issue 15, item 3).

One training pass of the shapes-world LoRA UNet (batch 4 doubled for CFG, loss = mean square of
the noise prediction), eager against ``torch.compile(unet, backend=...)`` on the same inputs and
weights: the forward's largest absolute difference, the LoRA gradient's relative difference, and
the parameters whose gradients differ most. ``aot_eager`` traces like inductor but runs the
graph eagerly: if it matches and ``inductor`` does not, the difference is inductor's code.

    OMP_NUM_THREADS=1 python benchmarks/peer/compile_grad.py --backend aot_eager
    OMP_NUM_THREADS=1 python benchmarks/peer/compile_grad.py --backend inductor   # minutes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--worst", type=int, default=8, help="parameters to list")
    args = parser.parse_args(argv)
    _, policy = c.shapes_policy()
    unet = policy.unet
    c.perturb_lora(unet)
    lora = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    pos, _ = policy.encode_prompts(["a red circle"] * 4)
    neg, _ = policy.negative_embeds(4)
    x = torch.randn(4, *policy.noise_shape[1:])
    inputs = (torch.cat([x, x]), torch.full((8,), 500), torch.cat([neg, pos]))

    def grads(model):
        for _, p in lora:
            p.grad = None
        out = model(*inputs).sample.float()
        (out**2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in lora}

    out_eager, g_eager = grads(unet)
    start = time.perf_counter()
    out_comp, g_comp = grads(torch.compile(unet, backend=args.backend))
    seconds = time.perf_counter() - start
    flat = torch.cat([g_eager[n].flatten() for n in g_eager])
    diff = torch.cat([(g_comp[n] - g_eager[n]).flatten() for n in g_eager])
    print(
        f"{args.backend}: first call {seconds:.1f} s | forward max abs diff "
        f"{float((out_comp - out_eager).abs().max()):.2e} | LoRA grad rel. diff "
        f"{float(diff.norm() / flat.norm()):.3e} over {len(lora)} tensors"
    )
    rel = {n: float((g_comp[n] - g_eager[n]).norm() / g_eager[n].norm()) for n in g_eager}
    zero = [n for n in g_eager if g_comp[n].abs().max() == 0 and g_eager[n].abs().max() > 0]
    print(f"tensors whose compiled gradient is exactly 0 but eager's is not: {len(zero)}")
    for name in sorted(rel, key=rel.get, reverse=True)[: args.worst]:
        print(
            f"  {rel[name]:.3e}  {name}  |g| eager {float(g_eager[name].norm()):.3e}, "
            f"compiled {float(g_comp[name].norm()):.3e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
