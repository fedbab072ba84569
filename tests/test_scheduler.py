"""The scheduler alone (plain Python): step budget, admission order, rows and host pages, refusal."""

import numpy as np
import pytest

from icecache_ray.engine.plan import StepPlan
from icecache_ray.engine.scheduler import HostLedger, Refused, Scheduler
from icecache_ray.engine.sequence import Sequence, SeqStatus


def _finish(sched, scheduled, token=5):
    plan, _ = scheduled
    return sched.finish_step(plan, [token] * int(plan.emits.sum()))


def test_a_step_is_running_decodes_then_prompt_chunks_within_the_token_budget():
    sched = Scheduler(max_running=3, max_step_tokens=100, max_seq_len=1000)
    seqs = [Sequence([1] * 150, 4), Sequence([2] * 30, 4), Sequence([3] * 10, 4)]
    for seq in seqs:
        sched.add(seq)
    plan, tokens = sched.schedule()
    assert plan.seq_ids == (seqs[0].seq_id,) and plan.lengths.tolist() == [100] and plan.n_decode == 0
    assert tokens.tolist() == [1] * 100 and not plan.emits.any()
    _finish(sched, (plan, tokens))
    plan, tokens = sched.schedule()  # the rest of the first prompt, then the next ones while the budget lasts
    assert [(s, int(n)) for s, n in zip(plan.seq_ids, plan.lengths)] == [(seqs[0].seq_id, 50), (seqs[1].seq_id, 30),
                                                                        (seqs[2].seq_id, 10)]
    assert plan.emits.tolist() == [True, True, True] and plan.positions[:2].tolist() == [100, 101]
    assert _finish(sched, (plan, tokens)) == []
    plan, tokens = sched.schedule()
    assert plan.n_decode == 3 and plan.lengths.tolist() == [1, 1, 1] and tokens.tolist() == [5, 5, 5]
    assert plan.starts.tolist() == [150, 30, 10] and plan.rows.tolist() == [0, 1, 2]


def test_rows_are_lent_first_come_first_served_and_reused_at_once():
    sched = Scheduler(max_running=2, max_step_tokens=64, max_seq_len=100)
    seqs = [Sequence([1] * 8, n) for n in (1, 3, 2)]
    for s in seqs:
        sched.add(s)
    ended = _finish(sched, sched.schedule())  # both prefilled; the first wanted one token only
    assert ended == [seqs[0]] and seqs[0].status is SeqStatus.FINISHED and seqs[0].row is None
    plan, _ = sched.schedule()
    assert plan.released == ((seqs[0].seq_id, 0),)
    assert plan.seq_ids == (seqs[1].seq_id, seqs[2].seq_id) and plan.rows.tolist() == [1, 0]  # row 0 lent again
    assert plan.n_decode == 1


def test_eos_ends_a_sequence_early():
    sched = Scheduler(1, 64, 100)
    seq = Sequence([1, 2, 3], 10, eos_token_id=9)
    sched.add(seq)
    _finish(sched, sched.schedule(), token=4)
    assert _finish(sched, sched.schedule(), token=9) == [seq]
    assert seq.output == [4, 9] and seq.finish_reason == "eos"


def test_host_pages_decide_admission_and_a_request_that_never_fits_is_refused():
    sched = Scheduler(4, 1000, 500, host_need=lambda n: {"a": n // 10}, host_capacity={"a": 30})
    first, second = Sequence([1] * 190, 10), Sequence([1] * 190, 10)
    sched.add(first)
    sched.add(second)
    sched.schedule()
    assert first.status is SeqStatus.PREFILLING and second.status is SeqStatus.WAITING  # 20 + 20 > 30 pages
    with pytest.raises(Refused, match="needs 40 host pages on index service a but it holds 30"):
        sched.add(Sequence([1] * 390, 10))
    with pytest.raises(Refused, match="exceed the 500 tokens a row holds"):
        sched.add(Sequence([1] * 495, 10))
    sched.fail(first, "boom")
    assert first.status is SeqStatus.FAILED and sched.ledger.used == {"a": 0}
    sched.schedule()
    assert second.status is SeqStatus.PREFILLING


def test_fail_all_ends_queued_and_running_sequences():
    sched = Scheduler(1, 64, 100)
    running, waiting = Sequence([1] * 5, 4), Sequence([1] * 5, 4)
    sched.add(running)
    sched.add(waiting)
    sched.schedule()
    assert set(sched.fail_all("replica 0 failed")) == {running, waiting}
    assert all(s.error == "replica 0 failed" and s.status is SeqStatus.FAILED for s in (running, waiting))
    assert not sched.running and not sched.waiting and sched.free_rows == [0]


def test_ledger_reserves_and_releases():
    ledger = HostLedger({0: 100})
    assert ledger.fits({0: 60})
    ledger.reserve("x", {0: 60})
    assert not ledger.fits({0: 60}) and ledger.fits({0: 60}, empty=True)
    ledger.release("x")
    assert ledger.used == {0: 0}


def test_plan_layout_arithmetic():
    plan = StepPlan.build([("a", 2, 9, 1, 5), ("b", 0, 0, 4, 4), ("c", 1, 3, 2, 10)], n_decode=1)
    assert plan.offsets.tolist() == [0, 1, 5, 7] and plan.positions.tolist() == [9, 0, 1, 2, 3, 3, 4]
    assert plan.emits.tolist() == [True, True, False] and plan.emit_tokens.tolist() == [0, 4]
    assert isinstance(plan.rows, np.ndarray) and plan.n_tokens == 7
