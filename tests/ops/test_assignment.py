"""linear_sum_assignment as a drop-in for scipy's: results, conventions, errors, input kinds, batching."""
import concurrent.futures

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detrcore import ops
from detrcore import _C
from detrcore.ops import reference

SHAPES = [(1, 1), (1, 7), (7, 1), (3, 5), (5, 3), (10, 10), (300, 50), (50, 300), (900, 100), (100, 1), (37, 23)]


def total(cost, rows, cols):
    return float(np.asarray(cost, dtype=np.float64)[np.asarray(rows), np.asarray(cols)].sum())


def check_against_scipy(cost, maximize=False, exact=True):
    rows, cols = ops.linear_sum_assignment(cost, maximize=maximize)
    srows, scols = scipy.optimize.linear_sum_assignment(np.asarray(cost, dtype=np.float64), maximize=maximize)
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert rows.shape == srows.shape and cols.shape == scols.shape
    assert np.all(np.diff(rows) > 0), "rows must be strictly ascending"
    assert len(set(cols.tolist())) == len(cols)
    assert total(cost, rows, cols) == pytest.approx(total(cost, srows, scols), rel=1e-12, abs=1e-9)
    if exact:  # continuous random costs: the optimum is unique
        np.testing.assert_array_equal(rows, srows)
        np.testing.assert_array_equal(cols, scols)
    return rows, cols


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_random_matches_scipy(shape, dtype, maximize):
    rng = np.random.default_rng(abs(hash((shape, maximize))) % 2**32)
    cost = rng.standard_normal(shape).astype(dtype) * 10
    check_against_scipy(cost, maximize=maximize)


@pytest.mark.parametrize("shape", [(6, 6), (8, 3), (3, 8), (300, 50), (40, 40)])
def test_ties_give_an_optimal_assignment(shape):
    rng = np.random.default_rng(1)
    for _ in range(5):
        cost = rng.integers(0, 3, size=shape).astype(np.float64)
        check_against_scipy(cost, exact=False)
    check_against_scipy(np.zeros(shape), exact=False)
    check_against_scipy(np.ones(shape) * 7.5, exact=False)


def test_detr_like_costs_with_duplicate_preferences():
    # Many targets preferring the same query: the greedy seed collides and augmenting paths do the work.
    rng = np.random.default_rng(2)
    cost = rng.random((300, 60)) * 0.1
    cost[17, :] -= 5.0  # query 17 is everyone's favourite
    cost[:, 3] -= 1.0
    check_against_scipy(cost)
    check_against_scipy(cost.T)


def test_inf_marks_forbidden_pairs():
    cost = np.array([[np.inf, 1.0, 5.0], [2.0, np.inf, 3.0], [np.inf, np.inf, 0.5]])
    rows, cols = check_against_scipy(cost, exact=False)
    assert np.isfinite(cost[rows, cols]).all()
    rng = np.random.default_rng(3)
    big = rng.random((50, 20))
    big[rng.random((50, 20)) < 0.5] = np.inf
    check_against_scipy(big, exact=False)
    check_against_scipy(-big, maximize=True, exact=False)


@pytest.mark.parametrize(
    "cost,message",
    [
        (np.array([[np.inf, np.inf], [1.0, 2.0]]), "cost matrix is infeasible"),
        (np.array([[1.0, np.inf], [2.0, np.inf]]), "cost matrix is infeasible"),
        (np.array([[1.0, np.nan]]), "matrix contains invalid numeric entries"),
        (np.array([[1.0, -np.inf]]), "matrix contains invalid numeric entries"),
    ],
)
def test_errors_match_scipy(cost, message):
    with pytest.raises(ValueError, match=message):
        scipy.optimize.linear_sum_assignment(cost)
    with pytest.raises(ValueError, match=message):
        ops.linear_sum_assignment(cost)
    with pytest.raises(ValueError, match=message):
        ops.linear_sum_assignment(torch.from_numpy(cost))


def test_maximize_flips_which_infinity_is_invalid():
    with pytest.raises(ValueError, match="invalid numeric entries"):
        ops.linear_sum_assignment(np.array([[np.inf, 1.0]]), maximize=True)
    rows, cols = ops.linear_sum_assignment(np.array([[-np.inf, 1.0]]), maximize=True)
    assert cols.tolist() == [1]


def test_wrong_rank_and_dtype():
    for bad in (np.zeros(3), np.zeros((2, 2, 2)), 5.0):
        with pytest.raises(ValueError, match="expected a matrix"):
            ops.linear_sum_assignment(bad)
    with pytest.raises(TypeError):
        ops.linear_sum_assignment(np.array([["a", "b"]]))
    with pytest.raises(TypeError, match="complex"):
        ops.linear_sum_assignment(torch.zeros(2, 2, dtype=torch.complex64))


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
def test_empty(shape):
    rows, cols = ops.linear_sum_assignment(np.zeros(shape))
    srows, scols = scipy.optimize.linear_sum_assignment(np.zeros(shape))
    assert rows.shape == srows.shape == (0,) and rows.dtype == np.int64 and cols.dtype == np.int64
    rows, cols = ops.linear_sum_assignment(torch.zeros(shape))
    assert rows.shape == (0,) and rows.dtype == torch.int64


def test_array_likes_bool_and_int_inputs():
    check_against_scipy([[4, 1, 3], [2, 0, 5], [3, 2, 2]], exact=False)
    rows, cols = ops.linear_sum_assignment(np.array([[True, False], [False, True]]))
    srows, scols = scipy.optimize.linear_sum_assignment(np.array([[True, False], [False, True]]))
    np.testing.assert_array_equal(cols, scols)
    check_against_scipy(np.arange(12, dtype=np.int32).reshape(3, 4) % 5, exact=False)
    check_against_scipy(np.random.default_rng(4).random((6, 4)).astype(np.float16), exact=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool])
def test_torch_inputs_return_int64_tensors(dtype):
    g = torch.Generator().manual_seed(5)
    cost = (torch.rand(30, 8, generator=g) * 10).to(dtype)
    rows, cols = ops.linear_sum_assignment(cost)
    assert isinstance(rows, torch.Tensor) and rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert rows.device == cost.device
    c64 = cost.double().numpy()
    srows, scols = scipy.optimize.linear_sum_assignment(c64)
    assert total(c64, rows.numpy(), cols.numpy()) == pytest.approx(total(c64, srows, scols))


def test_strided_inputs_are_read_in_place():
    rng = np.random.default_rng(6)
    base = rng.random((80, 60)).astype(np.float32)
    for view in (base.T, base[::2, 1::3], base[5:40, 7:30].T, np.asfortranarray(base)):
        check_against_scipy(view)
        if view.dtype in (np.float32, np.float64) and view.strides[0] > 0:
            assert _C.inspect(view)["data_ptr"] == view.ctypes.data  # no copy on the way in
    check_against_scipy(base[::-1, ::-2])  # negative strides
    t = torch.from_numpy(base).t()[3:, ::2]
    rows, cols = ops.linear_sum_assignment(t)
    srows, scols = scipy.optimize.linear_sum_assignment(t.numpy())
    np.testing.assert_array_equal(rows.numpy(), srows)
    np.testing.assert_array_equal(cols.numpy(), scols)
    check_against_scipy(base.astype(base.dtype.newbyteorder(">")))  # non-native byte order


def test_read_only_array():
    a = np.random.default_rng(7).random((9, 4))
    a.setflags(write=False)
    check_against_scipy(a)


@settings(max_examples=150, deadline=None)
@given(
    nr=st.integers(0, 6),
    nc=st.integers(0, 6),
    data=st.data(),
    maximize=st.booleans(),
)
def test_hypothesis_against_brute_force(nr, nc, data, maximize):
    values = st.one_of(st.integers(-3, 3).map(float), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
                       st.just(np.inf if not maximize else -np.inf))
    cost = np.array(data.draw(st.lists(st.lists(values, min_size=nc, max_size=nc), min_size=nr, max_size=nr)),
                    dtype=np.float64).reshape(nr, nc)
    try:
        want_rows, want_cols = reference.linear_sum_assignment(cost, maximize)
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e)):
            ops.linear_sum_assignment(cost, maximize)
        return
    rows, cols = ops.linear_sum_assignment(cost, maximize)
    assert len(rows) == min(nr, nc) and np.all(np.diff(rows) > 0) and len(set(cols.tolist())) == len(cols)
    assert total(cost, rows, cols) == pytest.approx(total(cost, want_rows, want_cols), rel=1e-9, abs=1e-6)


# ---- batched ----
def test_batched_matches_single():
    rng = np.random.default_rng(8)
    mats = [rng.random((q, t)) for q, t in [(300, 50), (300, 0), (300, 1), (20, 40), (900, 100), (5, 5)]]
    mats.append(torch.rand(100, 7, dtype=torch.float32))
    mats.append(rng.random((50, 30)).astype(np.float32).T)
    results = ops.batched_linear_sum_assignment(mats, num_threads=3)
    assert len(results) == len(mats)
    for m, (rows, cols) in zip(mats, results):
        want_rows, want_cols = ops.linear_sum_assignment(m)
        assert type(rows) is type(want_rows)
        np.testing.assert_array_equal(np.asarray(rows), np.asarray(want_rows))
        np.testing.assert_array_equal(np.asarray(cols), np.asarray(want_cols))


def test_batched_accepts_a_stack_and_empty_list():
    stack = torch.rand(4, 30, 5)
    out = ops.batched_linear_sum_assignment(stack)
    assert len(out) == 4
    for i, (rows, cols) in enumerate(out):
        assert torch.equal(cols, ops.linear_sum_assignment(stack[i])[1])
    assert ops.batched_linear_sum_assignment([]) == []


def test_batched_errors_name_the_matrix():
    good = np.random.default_rng(9).random((5, 3))
    with pytest.raises(ValueError, match=r"costs\[2\]: matrix contains invalid numeric entries"):
        ops.batched_linear_sum_assignment([good, good, np.array([[np.nan]])])
    with pytest.raises(ValueError, match=r"costs\[1\]: cost matrix is infeasible"):
        ops.batched_linear_sum_assignment([good, np.full((2, 2), np.inf)])
    with pytest.raises(ValueError, match=r"costs\[0\].*expected a matrix"):
        ops.batched_linear_sum_assignment([np.zeros(3)])


def test_concurrent_callers_from_python_threads():
    rng = np.random.default_rng(10)
    batches = [[rng.random((300, 50)) for _ in range(8)] for _ in range(6)]
    want = [[scipy.optimize.linear_sum_assignment(m)[1] for m in b] for b in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: ops.batched_linear_sum_assignment(b, num_threads=2), batches))
    for w, g in zip(want, got):
        for wc, (_, gc) in zip(w, g):
            np.testing.assert_array_equal(gc, wc)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_results_come_back_on_its_device():
    cost = torch.rand(30, 6, device="cuda")
    rows, cols = ops.linear_sum_assignment(cost)
    assert rows.device == cost.device
    srows, scols = scipy.optimize.linear_sum_assignment(cost.cpu().numpy())
    np.testing.assert_array_equal(cols.cpu().numpy(), scols)
