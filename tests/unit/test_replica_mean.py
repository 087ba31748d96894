"""The mean of a stage's replicas' weights that an export from a swarm writes (gptjt_core/replica_mean.py)."""

from __future__ import annotations

import pytest
import torch

from gptjt_core.replica_mean import ReplicaMean


def replica(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g).to(dtype), "b": torch.randn(32, generator=g).to(dtype)}


def test_the_mean_of_differing_replicas_keeps_each_tensors_dtype():
    mean = ReplicaMean()
    for seed in (1, 2, 3):
        mean.add(replica(seed, torch.bfloat16), f"w{seed}")
    got = mean.mean()
    want = {k: sum(replica(s, torch.bfloat16)[k].double() for s in (1, 2, 3)) / 3 for k in ("w", "b")}
    assert all(got[k].dtype == torch.bfloat16 for k in got)
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in got)


def test_identical_replicas_average_to_themselves_bit_for_bit():
    # every-step replicas are identical: their mean must be the replica, not a rounding of it
    one = replica(7)
    one["w"][0, :4] = torch.tensor([3.4028e38, 1e-45, -0.1, 1 / 3])  # huge, subnormal, inexact values
    mean = ReplicaMean()
    for i in range(7):
        mean.add({k: v.clone() for k, v in one.items()}, f"w{i}")
    assert all(torch.equal(mean.mean()[k], one[k]) for k in one)


@pytest.mark.parametrize("spoil, message", [
    (lambda s: s.pop("b"), "holds other tensors"),
    (lambda s: s.update(b=torch.zeros(31)), r"b is torch.float32 \(31,\)"),
    (lambda s: s.update(b=torch.zeros(32, dtype=torch.float16)), "b is torch.float16"),
    (lambda s: s["w"].__setitem__((3, 3), float("nan")), "NaN or infinite"),
])
def test_a_replica_that_does_not_fit_is_refused_by_name_and_adds_nothing(spoil, message):
    for good in (1, 2):  # refused as the second replica, and as a later one (the sums are float64 then)
        mean = ReplicaMean()
        for seed in range(1, good + 1):
            mean.add(replica(seed), f"w{seed}")
        bad = replica(9)
        spoil(bad)
        with pytest.raises(ValueError, match=message) as refused:
            mean.add(bad, "w-bad")
        assert "w-bad" in str(refused.value) and mean.count == good
        want = {k: sum(replica(s)[k].double() for s in range(1, good + 1)) / good for k in ("w", "b")}
        assert all(torch.equal(mean.mean()[k], want[k].float()) for k in ("w", "b"))


def test_a_stage_of_one_replica_is_exported_as_it_is():
    one = replica(4, torch.float16)
    mean = ReplicaMean()
    mean.add(one, "w1")
    got = mean.mean()
    assert all(got[k].dtype == torch.float16 and got[k].data_ptr() == one[k].data_ptr() for k in one)  # no copy


def test_a_mean_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no replica"):
        ReplicaMean().mean()
