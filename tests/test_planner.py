import numpy as np
import pytest
from fedpers.nn.planner import PLANNERS, Plan, PlanError, Usage, aligned, lower_bound, validate
from fedpers.nn.pool import Arena


def random_usages(rng: np.random.Generator, n: int, steps: int) -> list[Usage]:
    out = []
    for _ in range(n):
        a, b = sorted(rng.integers(0, steps, 2))
        out.append(Usage(int(rng.integers(1, 5000)), int(a), int(b)))
    return out


def overlaps_exhaustively(usages, plan) -> list[tuple[int, int]]:
    bad = []
    for i, u in enumerate(usages):
        for j in range(i + 1, len(usages)):
            v = usages[j]
            time = u.first <= v.last and v.first <= u.last
            a0, a1 = plan.offsets[i], plan.offsets[i] + aligned(u.size)
            b0, b1 = plan.offsets[j], plan.offsets[j] + aligned(v.size)
            if time and a0 < b1 and b0 < a1:
                bad.append((i, j))
    return bad


@pytest.mark.parametrize("name", sorted(PLANNERS))
@pytest.mark.parametrize("seed", range(25))
def test_no_live_overlap_on_random_intervals(name, seed):
    rng = np.random.default_rng(seed)
    usages = random_usages(rng, int(rng.integers(1, 60)), int(rng.integers(1, 40)))
    plan = PLANNERS[name](usages)
    assert overlaps_exhaustively(usages, plan) == []
    validate(usages, plan)
    assert all(o % 64 == 0 for o in plan.offsets)
    assert plan.total >= lower_bound(usages)
    assert max(o + aligned(u.size) for o, u in zip(plan.offsets, usages, strict=True)) <= plan.total


def test_greedy_reuses_memory_of_dead_buffers():
    usages = [Usage(1000, 0, 1), Usage(1000, 2, 3), Usage(1000, 4, 5)]
    assert PLANNERS["greedy_by_size"](usages).total == aligned(1000)
    assert PLANNERS["naive"](usages).total == 3 * aligned(1000)
    assert lower_bound(usages) == aligned(1000)


def test_validate_refuses_a_bad_plan():
    usages = [Usage(100, 0, 3), Usage(100, 2, 5)]
    with pytest.raises(PlanError, match="overlap"):
        validate(usages, Plan((0, 64), 256, "bad"))
    with pytest.raises(PlanError, match="outside"):
        Arena.from_plan(usages, Plan((0, 128), 200, "bad"))


def test_arena_views_are_aligned_and_bounded():
    arena = Arena(4096)
    v = arena.view(128, (4, 8), np.float32)
    assert v.ctypes.data % 64 == 0 and v.shape == (4, 8)
    with pytest.raises(IndexError):
        arena.view(4000, (100,), np.float32)


BENCH_NETS = [("mlp.ini", 64), ("lenet5.ini", 32), ("vgg_small.ini", 32), ("vgg_small_frozen.ini", 32),
              ("digits_cnn.ini", 32)]


@pytest.mark.parametrize("model,batch", BENCH_NETS)
@pytest.mark.parametrize("mode", ["planned", "swap"])
def test_real_nets_plans_are_valid_and_near_the_lower_bound(model, batch, mode):
    from pathlib import Path

    from fedpers.nn import load_ini
    from fedpers.nn.graph import compile as compile_graph
    from fedpers.nn.optim import Optimizer

    spec = load_ini(Path(__file__).resolve().parent.parent / "common" / "models" / model)
    c = compile_graph(spec, batch, mode=mode, optimizer_slots=Optimizer(spec.optimizer).slots, allocate=False)
    usages = [Usage(g.nbytes, s.first, s.last) for g in c.groups for s in g.segments]
    assert overlaps_exhaustively(usages, c.plan) == []
    assert c.plan.total <= 1.05 * c.lower_bound_bytes
    assert c.plan.total < c.naive_bytes


def random_cyclic_usages(rng: np.random.Generator, n: int, steps: int) -> list[Usage]:
    """Usages of which about a third wrap round the end of the iteration (first > last)."""
    out = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, steps, 2))
        if rng.random() < 0.35 and a != b:
            a, b = max(a, b), min(a, b)  # wraps
        else:
            a, b = min(a, b), max(a, b)
        out.append(Usage(int(rng.integers(1, 5000)), a, b))
    return out


def live_steps(u: Usage, steps: int) -> set[int]:
    return set(range(u.first, steps)) | set(range(0, u.last + 1)) if u.wraps else set(range(u.first, u.last + 1))


@pytest.mark.parametrize("seed", range(25))
def test_wrapping_usages_never_share_live_bytes(seed):
    """Segments that span the end of an iteration (swap-all's persistent tensors): checked against
    the steps each usage is live at, and the lower bound is the most bytes live at one step."""
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(3, 40))
    usages = random_cyclic_usages(rng, int(rng.integers(1, 50)), steps)
    plan = PLANNERS["greedy_by_size"](usages)
    validate(usages, plan)
    live = [live_steps(u, steps) for u in usages]
    for i, u in enumerate(usages):
        for j in range(i + 1, len(usages)):
            assert u.overlaps(usages[j]) == bool(live[i] & live[j])
            a0, b0 = plan.offsets[i], plan.offsets[j]
            if live[i] & live[j]:
                assert a0 + aligned(u.size) <= b0 or b0 + aligned(usages[j].size) <= a0, (i, j)
    most = max(sum(aligned(u.size) for u, s in zip(usages, live, strict=True) if t in s) for t in range(steps))
    assert lower_bound(usages) == most


def test_arena_release_gives_pages_back_and_keeps_what_is_asked():
    arena = Arena(64 * 4096)
    arena.buffer[:] = 7
    kept = [(5 * 4096 + 100, 3000), (40 * 4096, 8192)]
    released = arena.release(kept)
    assert released % 4096 == 0 and 0 < released < 64 * 4096
    for off, n in kept:
        assert np.all(arena.buffer[off : off + n] == 7)
    assert np.all(arena.buffer[: 5 * 4096] == 0) and np.all(arena.buffer[-4096:] == 0)
