"""Schedules read back from the text the tools print (schedules/text.py), and the simulator CLI
taking a hand-written one."""

import json

import pytest

from megatron_terapipe.schedules import Compute, build_schedule, find_problems
from megatron_terapipe.schedules.text import ScheduleTextError, parse_schedule
from megatron_terapipe.simulate.cli import main as simulate_main

SHAPES = [
    ("terapipe", 2, 1, 4, 1, False), ("terapipe", 3, 2, 3, 1, True),
    ("token-1f1b", 2, 4, 2, 1, False), ("token-1f1b", 4, 3, 2, 1, True),
    ("token-interleaved", 2, 4, 2, 2, False), ("token-interleaved", 2, 2, 2, 2, True),
    ("1f1b", 4, 6, 1, 1, False), ("interleaved", 2, 4, 1, 2, False), ("gpipe", 3, 2, 1, 1, True),
]


@pytest.mark.parametrize("name,P,M,S,V,split", SHAPES)
def test_printed_schedules_read_back_equal(name, P, M, S, V, split):
    schedule = build_schedule(name, P, M, S, V, split_backward=split)
    assert parse_schedule(str(schedule)) == schedule


@pytest.mark.parametrize("name,P,M,S,V,split", SHAPES)
def test_compute_orders_alone_get_the_generated_communication(name, P, M, S, V, split):
    """The user writes computes only; the placement rule adds exactly what the generator's
    schedule carries, and the shape is read off the actions."""
    schedule = build_schedule(name, P, M, S, V, split_backward=split)
    text = "\n".join(f"stage {p}: " + " ".join(c.format(V) for c in schedule.computes(p))
                     for p in range(P))
    parsed = parse_schedule(text, name=schedule.name)
    assert parsed == schedule


def test_a_wrong_hand_written_order_is_read_and_then_refused_by_the_validator():
    # stage 1 runs B0.0 before B0.1: the later slice's gradient (which B0.0 needs) is missing
    parsed = parse_schedule("stage 0: F0.0 F0.1 B0.1 B0.0\nstage 1: F0.0 F0.1 B0.0 B0.1")
    assert parsed.num_stages == 2 and parsed.num_token_slices == 2
    assert parsed.computes(1)[2] == Compute("B", 0, 0)
    assert find_problems(parsed)


@pytest.mark.parametrize("text,expected", [
    ("stage 0: F0.0 X1.0", "line 1 (stage 0): 'X1.0' is not a unit"),
    ("stage 0: F0.0 [>qF0.0]", "'>qF0.0' is not a message end"),
    ("stage 0: F0.0\nstage 0: B0.0", "line 2: stage 0 is given twice"),
    ("stage 1: F0.0 B0.0", "stages [1] given; expected 0 to 0"),
    ("F0.0 B0.0", "line 1: 'F0.0 B0.0': expected 'stage <rank>: <actions>'"),
    ("x: P=3 M=1 S=1 V=1\nstage 0: F0.0 B0.0", "the header says P=3 but 1 stage lines"),
    ("", "no 'stage <rank>: ...' line"),
])
def test_bad_text_is_refused_with_the_line_and_token(text, expected):
    with pytest.raises(ScheduleTextError) as err:
        parse_schedule(text)
    assert expected in str(err.value)


def test_simulator_cli_simulates_a_schedule_file(tmp_path, capsys):
    schedule = build_schedule("token-1f1b", 2, 2, 4)
    path = tmp_path / "mine.txt"
    path.write_text("# token-1f1b, computes only\n" + "\n".join(
        f"stage {p}: " + " ".join(c.format() for c in schedule.computes(p)) for p in range(2)))
    assert simulate_main(["--schedule-file", str(path), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert simulate_main(["--schedule", "token-1f1b", "--pipeline-model-parallel-size", "2",
                          "--num-microbatches", "2", "--num-token-slices", "4", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert from_file["step_time"] == generated["step_time"]
    assert from_file["bubble_fraction"] == generated["bubble_fraction"]


def test_simulator_cli_refuses_an_invalid_schedule_file(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_text("stage 0: F0.0 F0.1 B0.1 B0.0\nstage 1: F0.0 F0.1 B0.0 B0.1\n")
    with pytest.raises(SystemExit) as exit_:
        simulate_main(["--schedule-file", str(path)])
    assert exit_.value.code == 2
    assert f"--schedule-file {path} is not a valid schedule" in capsys.readouterr().err
