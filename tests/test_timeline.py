"""Timelines: bubble arithmetic, Chrome/Perfetto trace JSON, Gantt PNG."""

from __future__ import annotations

import json

import pytest

from megatron_terapipe.schedules import build_schedule
from megatron_terapipe.simulate import ActionCosts, Timeline, TimelineEvent, simulate
from megatron_terapipe.simulate.plot import plot_timelines


def simulated(name="token-1f1b", P=3, M=2, S=3, V=1) -> Timeline:
    costs = ActionCosts.uniform()
    costs.transfer = lambda n: 0.1
    return simulate(build_schedule(name, P, M, S, V), [4] * S, costs).timeline


def measured() -> Timeline:
    """What the executor would record: seconds, slight overlaps and gaps."""
    events = [
        TimelineEvent(0, "F", 0, 0, 0, 10.0, 10.4),
        TimelineEvent(0, "F", 0, 1, 0, 10.35, 10.8),  # overlaps the previous one
        TimelineEvent(0, "comm", 0, 1, 0, 10.8, 10.9),
        TimelineEvent(1, "F", 0, 0, 0, 10.5, 10.9),
        TimelineEvent(1, "B", 0, 0, 0, 10.9, 11.7),
        TimelineEvent(0, "B", 0, 0, 0, 11.8, 12.0),
    ]
    return Timeline(events, num_stages=2, label="measured")


def test_bubble_fraction_counts_compute_only():
    timeline = measured()
    assert timeline.step_time() == pytest.approx(2.0)
    busy = timeline.busy_time()
    assert busy[0] == pytest.approx(0.8 + 0.2)  # overlap counted once, comm is idle
    assert busy[1] == pytest.approx(1.2)
    assert timeline.bubble_fraction() == pytest.approx([0.5, 0.4])
    assert timeline.mean_bubble_fraction() == pytest.approx(0.45)


def test_empty_timeline():
    timeline = Timeline([], num_stages=2)
    assert timeline.step_time() == 0.0
    assert timeline.bubble_fraction() == [0.0, 0.0]


def test_chrome_trace_structure():
    timeline = measured()
    trace = json.loads(json.dumps(timeline.to_chrome_trace()))
    assert trace["displayTimeUnit"] == "ms"
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(timeline.events)
    for e in complete:
        assert set(e) >= {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"}
        assert isinstance(e["ts"], float) and e["ts"] >= 0 and e["dur"] >= 0
        assert e["tid"] in (0, 1) and e["pid"] == 0
    first = min(complete, key=lambda e: e["ts"])
    assert first["ts"] == 0.0 and first["dur"] == pytest.approx(0.4e6)  # microseconds
    assert first["name"] == "F0.0" and first["cat"] == "forward"
    assert {e["cat"] for e in complete} == {"forward", "backward", "communication"}
    names = {
        e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"
    }
    assert names == {0: "stage 0", 1: "stage 1"}
    process = [e for e in events if e["ph"] == "M" and e["name"] == "process_name"]
    assert process[0]["args"]["name"] == "measured"


def test_trace_of_simulation_has_one_track_per_stage():
    timeline = simulated(P=4)
    trace = timeline.to_chrome_trace()
    tids = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert tids == {0, 1, 2, 3}
    chunked = simulated("token-interleaved", P=2, M=2, S=2, V=2).to_chrome_trace()
    assert any(e["name"].endswith("c1") for e in chunked["traceEvents"] if e["ph"] == "X")


def test_dict_round_trip():
    timeline = measured()
    again = Timeline.from_dict(json.loads(json.dumps(timeline.to_dict())))
    assert again == timeline


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "gantt.png"
    plot_timelines([simulated(), simulated("terapipe")], str(path), title="two schedules")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # bars, labels and legend, not an empty canvas
    import matplotlib.image

    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert width > 1000 and height > 400


def test_plot_simulated_next_to_measured(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "side_by_side.png"
    sim = simulated(P=2, M=1, S=2)
    sim.time_unit = "s"
    plot_timelines([sim, measured()], str(path))
    assert path.stat().st_size > 10_000


def test_plot_needs_a_timeline(tmp_path):
    with pytest.raises(ValueError, match="at least one timeline"):
        plot_timelines([], str(tmp_path / "x.png"))


def test_time_breakdown_splits_the_span():
    # Stage 0: F [0, 2], comm [1.5, 3] (0.5 s under the forward), idle [3, 4]; stage 1: B [1, 4].
    events = [
        TimelineEvent(0, "F", 0, 0, 0, 0.0, 2.0),
        TimelineEvent(0, "comm", 0, 0, 0, 1.5, 3.0),
        TimelineEvent(1, "B", 0, 0, 0, 1.0, 4.0),
    ]
    parts = Timeline(events, num_stages=2).time_breakdown()
    assert parts[0] == pytest.approx({"compute": 2.0, "comm_wait": 1.0, "idle": 1.0})
    assert parts[1] == pytest.approx({"compute": 3.0, "comm_wait": 0.0, "idle": 1.0})
