"""Thermal guard on recorded traces: hot -> back off -> cool -> restore, hysteresis, fake NVML power writer."""

from __future__ import annotations

import json

import pytest

from onecard.errors import BadInputError
from onecard.monitor.guard import GuardPolicy, HalveSetting, PauseBackoff, PowerLimiter, ThermalGuard
from onecard.monitor.replay import replay_monitor, synthetic_trace
from onecard.monitor.trace import load_trace

SW_THERMAL, HW_THERMAL, POWER_CAP, POWER_BRAKE = 0x20, 0x40, 0x4, 0x80


class Engine:
    """Stands in for the engine's scheduler knob."""

    def __init__(self):
        self.max_num_seqs = 64
        self.history = [64]

    def set(self, v):
        self.max_num_seqs = v
        self.history.append(v)


def guard_for(engine, **policy):
    return ThermalGuard(GuardPolicy(**policy), target=HalveSetting("max_num_seqs", lambda: engine.max_num_seqs, engine.set))


def test_hot_back_off_cool_restore_through_the_monitor_path(tmp_path):
    # 0-30 s at 70 C, 30-70 s at 86 C (SW thermal slowdown 40-60 s), 70-80 s in the band (79 C), then 70 C
    def temp(t):
        return 86.0 if 30 <= t < 70 else 79.0 if 70 <= t < 80 else 70.0

    trace = synthetic_trace(tmp_path / "hot.jsonl", seconds=150, temp=temp,
                            throttle=lambda t: SW_THERMAL if 40 <= t < 60 else 0)
    engine = Engine()
    g = guard_for(engine, hot_for_s=10, cool_for_s=30, max_level=2)
    mon = replay_monitor(trace, guard=g, log=tmp_path / "replayed.jsonl")
    acts = [(a.t - 1.7e9, a.action, a.level) for a in g.actions]
    # backs off after 10 s hot, escalates once after another 10 s, stops at max_level
    assert acts[:2] == [(40.0, "back_off", 1), (50.0, "back_off", 2)]
    # the band (70-80 s) does not count as cool: restore 30 s after 80 s, not after 70 s
    assert acts[2] == (110.0, "restore", 0)
    assert len(acts) == 3
    assert engine.history == [64, 32, 16, 64]
    assert "86°C >= 83°C" in g.actions[0].reason and "SW thermal slowdown" in g.actions[1].reason
    assert g.actions[0].detail == "max_num_seqs 64 -> 32"
    # every action is in the replayed trace, with its reason
    logged = load_trace(tmp_path / "replayed.jsonl").guard
    assert [e["action"] for e in logged] == ["back_off", "back_off", "restore"]
    assert all(e["reason"] for e in logged) and mon.guard_events == logged


def test_hysteresis_no_flapping_around_thresholds(tmp_path):
    # 20 s hot, then temperature flips 82 <-> 76 every sample (inside the band): no restore, no new back-off
    def temp(t):
        return 88.0 if t < 20 else (82.0 if int(t) % 2 else 76.0)

    trace = synthetic_trace(tmp_path / "flap.jsonl", seconds=200, temp=temp)
    engine = Engine()
    g = guard_for(engine, hot_for_s=10, cool_for_s=20)
    replay_monitor(trace, guard=g)
    assert [a.action for a in g.actions] == ["back_off"]


def test_short_spikes_do_not_trigger(tmp_path):
    # 5 s spikes every 20 s: never hot for 10 s in a row
    trace = synthetic_trace(tmp_path / "spiky.jsonl", seconds=200, temp=lambda t: 90.0 if int(t) % 20 < 5 else 70.0)
    g = guard_for(Engine(), hot_for_s=10)
    replay_monitor(trace, guard=g)
    assert g.actions == []


def test_throttle_reason_alone_triggers_but_power_cap_only_when_asked(tmp_path):
    trace = synthetic_trace(tmp_path / "cap.jsonl", seconds=60, temp=lambda t: 70.0, throttle=lambda t: POWER_CAP | HW_THERMAL * (t >= 30))
    g = guard_for(Engine(), hot_for_s=10)
    replay_monitor(trace, guard=g)
    # still throttling: escalates every further 10 s up to max_level 3, never restores
    assert [(a.t - 1.7e9, a.action, a.level) for a in g.actions] == [(40.0, "back_off", 1), (50.0, "back_off", 2),
                                                                     (60.0, "back_off", 3)]
    assert "HW thermal slowdown" in g.actions[0].reason and "SW power cap" not in g.actions[0].reason
    g2 = guard_for(Engine(), hot_for_s=10, reasons={"sw_power_cap"})
    replay_monitor(trace, guard=g2)
    assert g2.actions and g2.actions[0].t - 1.7e9 == 10.0 and "SW power cap" in g2.actions[0].reason


def test_policy_validation():
    with pytest.raises(BadInputError, match="cool_c < hot_c"):
        GuardPolicy(hot_c=80, cool_c=80)
    with pytest.raises(BadInputError, match="unknown throttle reason"):
        GuardPolicy(reasons={"too_hot"})
    with pytest.raises(BadInputError):
        GuardPolicy(max_level=0)


class FakeWriter:
    """A fake NVML power writer: records calls, never touches a card."""

    def __init__(self, permitted=True, limit=450.0, lo=150.0, hi=600.0):
        self.limit, self.lo, self.hi, self.ok = limit, lo, hi, permitted
        self.set_calls = []

    def limit_w(self, i):
        return self.limit

    def constraints_w(self, i):
        return self.lo, self.hi

    def permitted(self, i):
        return (True, "") if self.ok else (False, "changing the power limit needs root")

    def set_limit_w(self, i, w):
        self.set_calls.append((i, w))
        self.limit = w


def hot_then_cool(tmp_path):
    return synthetic_trace(tmp_path / "p.jsonl", seconds=120, temp=lambda t: 88.0 if 10 <= t < 40 else 65.0)


def test_power_limit_dry_run_is_default_and_changes_nothing(tmp_path):
    w = FakeWriter()
    g = ThermalGuard(GuardPolicy(hot_for_s=10, cool_for_s=20), power=PowerLimiter(w))
    replay_monitor(hot_then_cool(tmp_path), guard=g)
    assert w.set_calls == []
    dry = [a for a in g.actions if a.action.endswith("_dry_run")]
    assert dry[0].detail == "would set GPU0 power limit 450 W -> 405 W (dry run: pass --allow-power-limit to apply)"
    assert dry[1].detail.startswith("would set GPU0 power limit 450 W -> 364 W")  # 0.9**2 at level 2
    assert dry[-1].action == "power_restore_dry_run"


def test_power_limit_not_permitted_refuses(tmp_path):
    w = FakeWriter(permitted=False)
    g = ThermalGuard(GuardPolicy(hot_for_s=10, cool_for_s=20), power=PowerLimiter(w, apply=True))
    replay_monitor(hot_then_cool(tmp_path), guard=g)
    assert w.set_calls == []
    assert all("not permitted: changing the power limit needs root" in a.detail for a in g.actions if "power" in a.action)


def test_power_limit_applied_when_permitted_and_restored(tmp_path):
    w = FakeWriter(lo=380.0)
    g = ThermalGuard(GuardPolicy(hot_for_s=10, cool_for_s=20, max_level=3), power=PowerLimiter(w, apply=True))
    replay_monitor(hot_then_cool(tmp_path), guard=g)
    # hot 10-40 s: level 1 at 20 s (450 * 0.9 = 405), level 2 at 30 s (364.5 floored at the card's minimum 380),
    # cool from 40 s: restored to the original 450 at 60 s
    assert w.set_calls == [(0, 405.0), (0, 380.0), (0, 450.0)]
    assert [a.action for a in g.actions if "power" in a.action] == ["power_limit"] * 2 + ["power_restore"]
    with pytest.raises(BadInputError):
        PowerLimiter(w, fraction=1.2)


def test_pause_backoff_and_halve_setting():
    p = PauseBackoff(0.01)
    assert p.back_off(2, "hot") == "pause 0.02 s between steps" and p.current == 0.02
    p.wait()
    assert p.restore("cool") == "no pause between steps" and p.current == 0.0
    box = {"mb": 8}
    h = HalveSetting("micro_batch", lambda: box["mb"], lambda v: box.__setitem__("mb", v))
    h.back_off(1, "x"), h.back_off(3, "x")
    assert box["mb"] == 1
    h.restore("cool")
    assert box["mb"] == 8
    assert h.restore("again") == "micro_batch unchanged"


def test_trace_is_plain_jsonl(tmp_path):
    p = synthetic_trace(tmp_path / "t.jsonl", seconds=3)
    kinds = [json.loads(line)["kind"] for line in p.read_text().splitlines()]
    assert kinds[0] == "meta" and kinds[-1] == "exit" and "sample" in kinds and "record" in kinds


def test_duty_cycle_pause_stops_and_always_resumes_a_process():
    import subprocess
    import sys
    import time

    from onecard.monitor.guard import DutyCyclePause

    def state(pid):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"])
    try:
        p = DutyCyclePause(child.pid, period_s=0.4, pause_s=0.3)
        assert "paused 0.30 s of every 0.4 s" in p.back_off(1, "hot")
        seen = set()
        end = time.monotonic() + 10
        while time.monotonic() < end and "T" not in seen:
            seen.add(state(child.pid))
            time.sleep(0.01)
        assert "T" in seen  # stopped during the pause
        p.restore("cool")
        time.sleep(0.1)
        assert state(child.pid) != "T"  # resumed and left running
        with pytest.raises(BadInputError):
            DutyCyclePause(child.pid, period_s=1.0, pause_s=1.5)
    finally:
        child.kill()
        child.wait()
