"""Worker for tests/test_torchrun.py: trains a toy regression model under torchrun.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_worker.py \
           OUT_DIR STRATEGY GRAD_ACCUM [--stop-after N] [--resume] [--precision fp32|bf16]
The same toy model/dataset/config is imported by the test for the single-process reference run.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from evl.train.trainer import Callback, TrainConfig, Trainer


class ToyData(torch.utils.data.Dataset):
    """48 samples of a noisy linear function; the loss is a mean over the batch."""

    def __init__(self, n: int = 48):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 6) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for blk in self.blocks:
            h = h + torch.tanh(blk(h))
        return self.head(self.norm(h)).sum(-1)  # .sum, not .squeeze: FSDP2 warns on view outputs


def toy_loss(model: nn.Module, batch: dict) -> dict:
    err = model(batch["x"]) - batch["y"]
    return {"loss": (err**2).mean(), "mae": err.abs().mean()}


def toy_config(out_dir: str, strategy: str = "ddp", grad_accum: int = 1, precision: str = "fp32") -> TrainConfig:
    """Precision is explicit (never auto): the fp32 tests compare losses to 1e-5, which bf16 cannot meet."""
    return TrainConfig(max_steps=8, batch_size=8, grad_accum=grad_accum, lr=3e-2, warmup_steps=2,
                       weight_decay=0.01, lr_mults={"head": 2.0}, ckpt_every=4, log_every=1,
                       out_dir=out_dir, seed=7, strategy=strategy, precision=precision)


def make_model() -> ToyModel:
    torch.manual_seed(0)
    return ToyModel()


class StopAfter(Callback):
    """Simulates a kill right after the checkpoint of step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            raise KeyboardInterrupt(f"simulated kill after step {self.step}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("strategy", choices=["ddp", "fsdp"])
    parser.add_argument("grad_accum", type=int)
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    callbacks = [StopAfter(args.stop_after)] if args.stop_after else []
    cfg = toy_config(args.out_dir, args.strategy, args.grad_accum, args.precision)
    trainer = Trainer(make_model(), toy_loss, ToyData(), cfg, callbacks=callbacks)
    try:
        trainer.fit(resume=args.resume)
    except KeyboardInterrupt:
        return


if __name__ == "__main__":
    main(sys.argv[1:])
