"""The loss function of training/step.py keeps everything on the model's device: on the
`meta` device any host copy (`.cpu()`, `.item()`, `float()`) raises, so a micro-batch that
completes there forces no device-to-host sync (Megatron-LM reads the reduced losses only when
it logs)."""

from __future__ import annotations

import torch

from megatron_longctx.training.step import _loss_func


def test_loss_func_stays_on_the_device() -> None:
    losses = torch.empty(2, 16, device="meta")
    mask = torch.empty(2, 16, device="meta")
    ids = torch.empty(2, dtype=torch.long, device="meta")
    loss, count, report = _loss_func(mask, ids, 3, losses)
    for tensor in (loss, count, report["lm loss"], report["domain"]):
        assert tensor.device.type == "meta"


def test_loss_func_sums_per_token_and_per_domain() -> None:
    losses = torch.arange(8, dtype=torch.float32).reshape(1, 8)  # one THD row of 2 samples
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 0]], dtype=torch.float32)
    loss, count, report = _loss_func(mask, torch.tensor([1, 0]), 2, losses)
    assert float(loss) == 0 + 1 + 3 + 4 + 5 + 6 and int(count) == 6
    assert report["lm loss"].tolist() == [19.0, 6.0]
    assert report["domain"].tolist() == [[15.0, 3.0], [4.0, 3.0]]
