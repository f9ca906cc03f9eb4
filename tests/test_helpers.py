"""CPU tests of the shared test toolkit (the GPU kernel tests rely on it to fail loudly)."""

from __future__ import annotations

import pytest
import torch

from helpers import TOL, assert_rel_close, make_inputs, rel_error


def test_assert_rel_close_reports_name_error_and_tolerance():
    ref = torch.ones(4, 3)
    got = ref.clone()
    got[2, 1] = 1.5
    with pytest.raises(AssertionError, match=r"dq: relative error 1\.443e-01 > tolerance 1\.0e-02.*\(2, 1\)"):
        assert_rel_close("dq", got, ref, 1e-2)
    assert assert_rel_close("dq", got, ref, 0.2) == pytest.approx(0.5 / 12 ** 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_assert_rel_close_fails_on_nonfinite_mismatch_even_with_a_huge_tolerance(bad):
    ref = torch.ones(8, dtype=torch.bfloat16)
    got = ref.clone()
    got[5] = bad
    with pytest.raises(AssertionError, match=r"^o: (NaN|inf) mismatch .*\(5,\)"):
        assert_rel_close("o", got, ref, 1e30)


def test_assert_rel_close_accepts_matching_nonfinite_and_checks_shape():
    ref = torch.tensor([1.0, float("nan"), float("inf")])
    assert assert_rel_close("x", ref.clone(), ref, 0.0) == 0.0
    with pytest.raises(AssertionError, match="shape"):
        assert_rel_close("x", torch.ones(3), torch.ones(1, 3), 1.0)
    assert rel_error(torch.ones(2), torch.zeros(2)) == pytest.approx(2 ** 0.5)


def test_make_inputs_is_fresh_reproducible_and_in_range():
    a = make_inputs(2, 9, 2, 4, 8, 6, torch.bfloat16, seed=3, with_h0=True)
    b = make_inputs(2, 9, 2, 4, 8, 6, torch.bfloat16, seed=3, with_h0=True)
    c = make_inputs(2, 9, 2, 4, 8, 6, torch.bfloat16)
    assert a.q is not b.q and torch.equal(a.q, b.q) and not torch.equal(a.q, c.q)
    assert a.q.dtype == torch.bfloat16 and a.g.dtype == torch.float32 and a.initial_state.dtype == torch.float32
    assert (a.g < 0).all() and ((a.eta > 0) & (a.eta < 1)).all()
    assert a.v.shape == (2, 9, 4, 6) and a.initial_state.shape == (2, 4, 8, 6)
    x = make_inputs(1, 50, 1, 1, 16, 4, torch.float64, seed=4, key_norm=(1e-3, 1e3), cu_seqlens=[0, 20, 50],
                    cu_dtype=torch.int64)
    n = x.k.norm(dim=-1)
    assert n.min() >= 1e-3 * (1 - 1e-9) and n.max() <= 1e3 * (1 + 1e-9) and n.max() / n.min() > 100
    assert x.cu_seqlens.dtype == torch.int64 and x.cu_seqlens.tolist() == [0, 20, 50]
    y = x.to(torch.float32, requires_grad=True)
    assert y.q.dtype == torch.float32 and y.q.requires_grad and y.cu_seqlens.dtype == torch.int64


def test_tolerance_table_covers_every_dtype_and_quantity():
    for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for qty in ("o", "ht", "grad", "stage"):
            assert 0 < TOL[(dt, qty)] < 0.05


def test_nan_poison_fixture_poisons_empty(nan_poison):
    assert torch.isnan(torch.empty(3)).all()
    assert torch.isnan(torch.empty_like(torch.ones(2, 2))).all()
    assert torch.isnan(torch.ones(2).new_empty(4)).all()
    assert torch.empty(3, dtype=torch.int32).dtype == torch.int32  # integer buffers are left alone
    assert torch.isnan(nan_poison(torch.zeros(2))).all()
