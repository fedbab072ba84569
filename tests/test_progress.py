"""Progress in tokens (icecache_ray.jobs.progress): totals, done never above them, documents done
and failed apart, rates and ETA, a line every interval; and in the local job, with a failing input
and with every document ending in the same step."""

import json
import logging
import re

import pytest

from icecache_ray.data.inflight import InFlight, TokenMeter
from icecache_ray.engine.sequence import Sequence
from icecache_ray.jobs.outputs import OutputDir
from icecache_ray.jobs.progress import Progress
from icecache_ray.jobs.summarize import main
from test_jobs import _args, _doc, _jsonl

LINE = re.compile(r"(\d+) of (\d+) documents done, (\d+) failed \| prompt ([\d,]+)/([\d,]+) tokens prefilled .* \| "
                  r"generated ([\d,]+)/([\d,]+) tokens .* ETA (\S+)")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _parse(line: str) -> dict:
    m = LINE.search(line)
    assert m, line
    ok, docs, failed, p, pt, g, gt = (int(x.replace(",", "")) for x in m.groups()[:7])
    return {"ok": ok, "documents": docs, "failed": failed, "prompt": p, "prompt_total": pt, "generated": g,
            "generated_total": gt, "eta": m.group(8)}


def _bounded(line: str) -> dict:
    got = _parse(line)
    assert got["ok"] + got["failed"] <= got["documents"], line
    assert got["prompt"] <= got["prompt_total"] and got["generated"] <= got["generated_total"], line
    return got


def test_rates_and_eta_from_the_token_rates():
    clock = FakeClock()
    p = Progress(max_new_tokens=10, clock_fn=clock)
    p.plan(documents=4, prompt_tokens=4000)
    p.begin()
    clock.t = 10.0
    p.work(1000, 0)  # 10 s of prefill: 100 prompt tokens/s
    snap = p.snapshot()
    assert (snap.prompt_done, snap.prompt_total, snap.generated_total) == (1000, 4000, 40)
    assert snap.prefill_rate == pytest.approx(100.0) and snap.decode_rate is None
    assert snap.eta_is_lower_bound and snap.eta_s == pytest.approx(30.0)  # 3000 tokens at 100/s, decode unknown
    assert snap.line().endswith("ETA >0m30s")
    clock.t = 40.0
    p.work(4000, 4)  # the rest of the prefill (each prompt's last chunk gives its first token)
    clock.t = 44.0
    p.work(4000, 12)  # 4 s of decode: 8 tokens
    snap = p.snapshot()
    # 10 s -> 40 s: 3000 prompt and 4 generated tokens share the time by count (no decode rate yet)
    assert snap.prefill_rate == pytest.approx(4000 / (10 + 30 * 3000 / 3004))
    assert snap.decode_rate == pytest.approx(12 / (4 + 30 * 4 / 3004))
    assert not snap.eta_is_lower_bound and snap.eta_s == pytest.approx(28 / snap.decode_rate)


def test_a_failing_input_is_counted_apart_and_never_more_done_than_total():
    """The issue's ``[4/3 documents]``: a failed document gives back its share of the totals."""
    clock = FakeClock()
    p = Progress(max_new_tokens=8, clock_fn=clock)
    p.plan(documents=3)
    p.ended(False, planned_prompt=0)  # a bad row: fails before it has a prompt
    p.plan(prompt_tokens=200)  # the other two, 100 tokens each
    p.begin()
    clock.t = 1.0
    p.work(100, 1)
    p.ended(False, planned_prompt=100)  # refused by the engine after a partial prefill
    clock.t = 2.0
    p.work(200, 5)
    p.ended(True, planned_prompt=100, prompt_tokens=100, generated_tokens=5)  # ended early at EOS
    got = _bounded(p.snapshot().line())
    assert (got["ok"], got["failed"], got["documents"]) == (1, 2, 3)
    assert (got["prompt"], got["prompt_total"], got["generated"], got["generated_total"]) == (100, 100, 5, 5)  # the
    # failed document's prefill is work beyond the remaining totals: not shown
    p.ended(False, planned_prompt=0)  # one more failure than planned (must not read 4 of 3)
    got = _bounded(p.snapshot().line())
    assert (got["ok"], got["failed"], got["documents"]) == (1, 3, 4)


def test_every_document_ending_in_the_same_step_still_shows_progress_in_tokens():
    """Continuous batching: all documents end in one step, long after the first; the lines before
    it still move (prompt tokens, then generated tokens), and the last one is complete."""
    clock = FakeClock()
    p = Progress(max_new_tokens=50, clock_fn=clock)
    p.plan(documents=3, prompt_tokens=3 * 600)
    p.begin()
    lines = []
    for step in range(1, 4):  # prefill: 600 tokens a step
        clock.t += 5.0
        p.work(600 * step, 3 if step == 3 else 0)
        lines.append(p.snapshot().line())
    for step in range(1, 50):  # decode: one token per document a step
        clock.t += 0.5
        p.work(1800, 3 + 3 * step)
        if step % 10 == 0:
            lines.append(p.snapshot().line())
    for _ in range(3):
        p.ended(True, planned_prompt=600, prompt_tokens=600, generated_tokens=50)
    lines.append(p.snapshot().line())
    seen = [_bounded(line) for line in lines]
    assert [s["prompt"] for s in seen[:3]] == [600, 1200, 1800] and all(s["ok"] == 0 for s in seen[:-1])
    assert [s["generated"] for s in seen[3:-1]] == [33, 63, 93, 123] and seen[-1]["generated"] == 150
    assert seen[-1] == {"ok": 3, "documents": 3, "failed": 0, "prompt": 1800, "prompt_total": 1800, "generated": 150,
                        "generated_total": 150, "eta": "0m00s"}
    assert seen[1]["eta"].startswith(">") and not seen[4]["eta"].startswith(">")  # a lower bound until decode is seen


def test_ticking_logs_a_line_every_interval_and_one_at_the_end(caplog):
    import time

    p = Progress(max_new_tokens=4, interval_s=0.05)
    p.plan(documents=1, prompt_tokens=10)
    calls = []
    with caplog.at_level(logging.INFO, logger="icecache_ray.jobs.progress"):
        with p.ticking(poll=lambda: calls.append(1) or (10, len(calls) % 5)):
            time.sleep(0.5)
        p.ended(True, planned_prompt=10, prompt_tokens=10, generated_tokens=4)
        p.log(unless_unchanged=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "icecache_ray.jobs.progress"]
    assert 5 <= len(lines) <= 13 and len(calls) >= 4  # a line at the start, every 0.05 s, at the end
    assert _bounded(lines[-1])["ok"] == 1


def test_documents_ended_together_are_never_shown_in_part():
    """A line read while a step's documents are being counted waits until all of them are."""
    import threading

    p = Progress(max_new_tokens=4)
    p.plan(documents=4, prompt_tokens=40)
    seen = []
    reader = threading.Thread(target=lambda: seen.append(p.snapshot().ok))
    with p.together():
        p.ended(True, planned_prompt=10, prompt_tokens=10, generated_tokens=4)
        reader.start()
        reader.join(timeout=0.3)
        assert reader.is_alive() and not seen  # blocked: two of four counted so far
        for _ in range(3):
            p.ended(True, planned_prompt=10, prompt_tokens=10, generated_tokens=4)
    reader.join(timeout=10)
    assert seen == [4]


def test_token_meter_and_the_replicas_actor_count_work_of_ended_and_running_sequences():
    meter = TokenMeter()
    a, b = Sequence([1] * 10, 5), Sequence([1] * 20, 5)
    meter.add(a)
    meter.add(b)
    a.prefilled, b.prefilled = 10, 8
    a.output = [7, 7]
    assert meter.totals() == (18, 2)
    meter.ended(a)
    a.output.append(7)  # read no more once ended
    assert meter.totals() == (18, 2)
    actor = InFlight()
    actor.report("r1:1", *meter.totals())
    actor.report("r2:2", 5, 1)
    actor.report("r1:1", 20, 3)  # a replica's later report replaces its earlier one
    assert actor.totals() == (25, 4)


def _progress_lines(caplog) -> list[dict]:
    return [_bounded(r.getMessage()) for r in caplog.records if r.name == "icecache_ray.jobs.progress"]


def test_local_job_with_a_failing_input_counts_it_apart(tiny_model_dir, tmp_path, caplog):
    src = _jsonl(tmp_path / "docs.jsonl", [{"id": "d0", "text": _doc(0)}, {"id": "bad", "text": "  "},
                                           {"id": "d1", "text": _doc(1)}, {"id": "d0", "text": _doc(2)}])
    with caplog.at_level(logging.INFO):
        assert main(_args(tiny_model_dir, [src], tmp_path / "out")) == 3
    lines = _progress_lines(caplog)
    assert lines[0]["ok"] == 0 and lines[0]["prompt_total"] > 0
    last = lines[-1]
    assert (last["ok"], last["failed"], last["documents"]) == (2, 2, 4)  # the empty text and the repeated id
    assert last["prompt"] == last["prompt_total"] and last["generated"] == last["generated_total"]
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    rows = OutputDir(tmp_path / "out").read_all().to_pylist()
    assert last["generated"] == info["generated_tokens"] and last["prompt_total"] == sum(r["prompt_tokens"] for r in rows)


def test_local_job_whose_documents_all_end_in_one_step_shows_tokens_before_any_document(never_eos_model_dir, tmp_path, caplog):
    text = _doc(0, 150)  # one length: every document is prefilled in the same step and ends in the same step
    src = _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": text} for i in range(4)])
    args = _args(never_eos_model_dir, [src], tmp_path / "out", "--max-running", "4", "--progress-every", "0.1")
    args[args.index("--max-new-tokens") + 1] = "120"
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    lines = _progress_lines(caplog)
    before_any_document = [line for line in lines if line["ok"] == 0]
    assert any(line["generated"] > 0 for line in before_any_document), lines  # tokens moved while documents could not
    assert all(line["ok"] in (0, 4) for line in lines)  # they did end together
    assert lines[-1]["ok"] == 4 and lines[-1]["generated"] == lines[-1]["generated_total"] == 4 * 120
