"""Cross-rank gathering: 2 gloo processes on CPU must reproduce one process on the global batch.

Per rank r the loss L_r is a mean over its B rows, so the global loss is mean_r L_r; DDP averages
gradients over ranks, so the global gradient of a shared parameter (the logit scale) is mean_r of the
rank gradients, and the global gradient of rank r's inputs is (rank r's input gradient) / W.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evl.distributed import (
    all_gather_object,
    all_gather_with_grad,
    get_rank,
    get_world_size,
    is_main_process,
)
from evl.losses.functional import egonce_loss, egonce_positive_mask, vtc_loss

WORLD = 2
B, D = 3, 5
VERBS = [["cut"], ["cut"], ["wash"], ["wash"], ["cut"], ["open"]]
NOUNS = [["onion"], ["onion"], ["pan"], ["pan"], ["knife"], ["door"]]


def _global_inputs():
    g = torch.Generator().manual_seed(123)
    return torch.randn(WORLD * B, D, generator=g), torch.randn(WORLD * B, D, generator=g)


def _loss_and_grads(loss_name: str, video, text, log_scale, mask):
    video = video.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    log_scale = log_scale.clone().requires_grad_(True)
    if loss_name == "vtc":
        loss = vtc_loss(video, text, log_scale.exp())
    else:
        loss = egonce_loss(video, text, log_scale.exp(), positive_mask=mask)
    loss.backward()
    return {"loss": loss.detach(), "video": video.grad, "text": text.grad, "scale": log_scale.grad}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {"rank": get_rank(), "world": get_world_size(), "main": is_main_process()}
        video, text = _global_inputs()
        mine = slice(rank * B, (rank + 1) * B)
        log_scale = torch.tensor(1.5)
        # The mask is built on the global batch from gathered per-rank metadata, as a trainer would.
        verbs = sum(all_gather_object(VERBS[mine]), [])
        nouns = sum(all_gather_object(NOUNS[mine]), [])
        mask = egonce_positive_mask(verbs, nouns)
        results["mask"] = mask
        for name in ("vtc", "egonce"):
            results[name] = _loss_and_grads(name, video[mine], text[mine], log_scale, mask)
        # all_gather_with_grad alone: y = sum(w * gathered); d y / d x_r = sum over ranks of w[slice r].
        x = torch.full((B, 2), float(rank), requires_grad=True)
        gathered = all_gather_with_grad(x, check_sizes=True)
        w = torch.arange(WORLD * B * 2, dtype=torch.float32).reshape(WORLD * B, 2) * (rank + 1)
        (gathered * w).sum().backward()
        results["gathered"] = gathered.detach()
        results["gather_grad"] = x.grad
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_rank_helpers(rank_results):
    assert [r["rank"] for r in rank_results] == [0, 1]
    assert all(r["world"] == WORLD for r in rank_results)
    assert [r["main"] for r in rank_results] == [True, False]


def test_single_process_helpers_are_noops():
    assert get_rank() == 0 and get_world_size() == 1 and is_main_process()
    x = torch.randn(2, 3)
    assert all_gather_with_grad(x) is x
    assert all_gather_object({"a": 1}) == [{"a": 1}]


def test_all_gather_with_grad_values_and_gradient(rank_results):
    expected = torch.cat([torch.full((B, 2), float(r)) for r in range(WORLD)])
    w_sum = torch.arange(WORLD * B * 2, dtype=torch.float32).reshape(WORLD * B, 2) * sum(
        r + 1 for r in range(WORLD)
    )
    for r, res in enumerate(rank_results):
        assert torch.equal(res["gathered"], expected)
        assert torch.allclose(res["gather_grad"], w_sum[r * B : (r + 1) * B])


@pytest.mark.parametrize("name", ["vtc", "egonce"])
def test_two_ranks_equal_one_process_on_global_batch(rank_results, name):
    video, text = _global_inputs()
    mask = egonce_positive_mask(VERBS, NOUNS)
    assert torch.equal(rank_results[0]["mask"], mask)
    assert mask.sum() > mask.shape[0]  # the case really has off-diagonal positives
    ref = _loss_and_grads(name, video, text, torch.tensor(1.5), mask)
    per_rank = [r[name] for r in rank_results]
    torch.testing.assert_close(torch.stack([p["loss"] for p in per_rank]).mean(), ref["loss"])
    # DDP averages shared-parameter gradients over ranks.
    torch.testing.assert_close(torch.stack([p["scale"] for p in per_rank]).mean(), ref["scale"])
    # Each rank's input gradient, divided by W (DDP's averaging), is its slice of the global gradient.
    for key in ("video", "text"):
        torch.testing.assert_close(torch.cat([p[key] for p in per_rank]) / WORLD, ref[key])
