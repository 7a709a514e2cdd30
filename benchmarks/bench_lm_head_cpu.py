"""TRL's fused LM head on the CPU against a plain autograd head and the bare matmuls, on the same scored positions.

    python benchmarks/bench_lm_head_cpu.py --threads 2 --positions 512 --rounds 7

SmolLM2-135M-Instruct's head shape (hidden 576, vocabulary 49,152), random fp32 weights. One pass each is what the
policy's head costs in a training step: forward and backward of the target log-probs, the entropy computed too (as
TRL's DPO trainer asks for it). Arms:
- `trl`: `trl.kernels.ChunkedLogProbFunction`, as `add_fused_lm_head` calls it (its chunk size), on the positions given;
- `plain`: `hidden @ weight.T`, `log_softmax`, the targets gathered, the entropy without gradient;
- `matmuls`: the three matmuls of any head (logits, then the gradients of the hidden states and of the weight), the
  floor.
The arms take turns one pass at a time over several rounds (this machine drifts); the median and the min-max per arm
and the median of the per-round ratios to `trl` are printed. Before timing, `plain` is checked to give TRL's
log-probs, entropy and gradients (so both arms do the same work).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from trl.kernels import ChunkedLogProbFunction
from trl.trainer import utils as trl_utils


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=512, help="Scored positions (a step's completion tokens).")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def trl_head(hidden, weight, targets):
    """TRL's kernel: (log-probs, entropy), gradients into hidden.grad and weight.grad."""
    logps, entropy, *_ = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",)
    )
    logps.sum().backward()
    return logps.detach(), entropy


def plain_head(hidden, weight, targets):
    log_probs = (hidden @ weight.t()).log_softmax(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    logps = log_probs.gather(1, targets[:, None]).squeeze(1)
    logps.sum().backward()
    return logps.detach(), entropy


def main() -> None:
    args = make_parser().parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) * 0.02).requires_grad_()
    hidden0 = torch.randn(args.positions, args.hidden, generator=generator)
    targets = torch.randint(0, args.vocab, (args.positions,), generator=generator)
    grad_logits = torch.randn(args.positions, args.vocab, generator=generator)

    def run(head):
        hidden = hidden0.clone().requires_grad_()
        weight.grad = None
        out = head(hidden, weight, targets)
        return out, hidden.grad, weight.grad

    def matmuls():
        plain_weight = weight.detach()
        hidden0 @ plain_weight.t()
        grad_logits @ plain_weight
        grad_logits.t() @ hidden0

    # The same work: log-probs, entropy and both gradients agree
    (trl_logps, trl_entropy), trl_dh, trl_dw = run(trl_head)
    (logps, entropy), dh, dw = run(plain_head)
    for name, a, b in [("logps", logps, trl_logps), ("entropy", entropy, trl_entropy), ("d hidden", dh, trl_dh)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(dw, trl_dw, rtol=1e-4, atol=1e-6, msg="d weight")

    arms = {"trl": lambda: run(trl_head), "plain": lambda: run(plain_head), "matmuls": matmuls}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    flops = 3 * 2 * args.positions * args.hidden * args.vocab
    print(
        f"{args.positions} positions, hidden {args.hidden}, vocabulary {args.vocab}, {args.threads} thread(s), "
        f"{args.rounds} rounds after 1 warm-up; {flops / 1e9:.0f} GFLOP of matmuls a pass"
    )
    print("| arm | s a pass (median, min-max) | vs trl (median of per-round ratios) | matmul GFLOP/s |")
    print("|---|---|---|---|")
    for name, values in times.items():
        timed = values[1:]
        ratios = [t / v for t, v in zip(times["trl"][1:], timed)]
        print(
            f"| {name} | {statistics.median(timed):.3f} ({min(timed):.3f}-{max(timed):.3f}) "
            f"| {statistics.median(ratios):.2f}× | {flops / statistics.median(timed) / 1e9:.0f} |"
        )


if __name__ == "__main__":
    main()
