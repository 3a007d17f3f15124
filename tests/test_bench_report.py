"""qtool.bench's reporting on synthetic rows (CPU): the W4A16 table and the target summary, including
the no-PDL columns/medians of decode rows, the byte-floor arithmetic, the issue-7 verdicts (paired ratios,
per-M medians), and the two timers' arithmetic on a fake, drifting GPU clock."""

from __future__ import annotations

from qtool.bench import floor_us, format_table, summarize_targets, w4a16_bytes


def _row(M, us, fp16, tiny, nopdl=None):
    fl, bound = floor_us(M, 4096, 4096, 128, 3e12, 700e12)
    r = {"op": "w4a16", "K": 4096, "N": 4096, "M": M, "group": 128, "us": us, "us_fp16": fp16,
         "us_tinygemm": tiny, "x_fp16": fp16 / us, "x_tinygemm": tiny / us, "tflops": 2 * M * 4096 * 4096 / us / 1e6,
         "floor_us": fl, "bound": bound, "pct_floor": 100 * fl / us, "cfg": "c23/s8"}
    if nopdl is not None:
        r.update(us_nopdl=nopdl, x_fp16_nopdl=fp16 / nopdl, x_tinygemm_nopdl=tiny / nopdl)
    return r


def test_floor_and_bytes():
    # codes + duplicated fp16 scales + int32 zero words + activations + output
    assert w4a16_bytes(1, 4096, 4096, 128) == 4096 * 4096 // 2 + 32 * (4 * 4096 + 4096) + 2 * 4096 + 2 * 4096
    fl, bound = floor_us(4096, 4096, 4096, 128, 3e12, 700e12)
    assert bound == "compute" and abs(fl - 2 * 4096**3 / 700e12 * 1e6) < 1e-9


def test_table_and_summary_report_pdl_and_no_pdl():
    rows = [_row(1, 6.0, 15.0, 6.6, nopdl=9.0), _row(4, 7.0, 15.0, 8.7, nopdl=10.0), _row(16, 9.0, 15.0, 21.0, nopdl=11.0),
            _row(64, 19.0, 15.0, 76.0), _row(256, 32.0, 18.7, 300.0), _row(1024, 90.0, 48.0, 1150.0),
            _row(4096, 360.0, 200.0, 4500.0)]
    table = format_table(rows)
    assert "noPDL µs" in table.splitlines()[0]
    assert "9.0" in table.splitlines()[1] and table.splitlines()[4].split()[3] == "-"  # M=64: no no-PDL time
    summary = summarize_targets(rows).splitlines()
    assert summary[0].startswith("M<=16: x_fp16 median 2.14") and "without PDL: x_fp16 1.50, x_tinygemm 0.87" in summary[0]
    assert "x_fp16 median 0.69 (target >= 1.0: short)" in summary[1]
    assert "x_fp16 median 0.54 (target >= 0.5: MET)" in summary[2]


def test_issue7_tables_and_summary_report_no_pdl():
    from qtool.bench import summarize_issue7

    def w8(M, us, nopdl=None):
        r = {"op": "w8a8", "K": 4096, "N": 4096, "M": M, "us": us, "us_fp16": 13.0, "x_fp16": 13.0 / us,
             "us_int_mm": 11.0, "x_int_mm": 11.0 / us, "tops": 1.0, "floor_us": 4.0, "bound": "memory",
             "pct_floor": 400 / us, "cfg": "c13/s1"}
        if nopdl is not None:
            r.update(us_nopdl=nopdl, x_fp16_nopdl=13.0 / nopdl)
        return r

    def w4(M, us, us8, nopdl=None, nopdl8=None):
        r = {"op": "w4a8", "variant": "chn", "K": 4096, "N": 4096, "M": M, "us": us, "us_w8a8": us8,
             "x_w8a8": us8 / us, "us_fp16": 13.0, "x_fp16": 13.0 / us, "tops": 1.0, "floor_us": 2.0,
             "bound": "memory", "pct_floor": 200 / us, "cfg": "c13/s2"}
        if nopdl is not None:
            r.update(us_nopdl=nopdl, x_w8a8_nopdl=nopdl8 / nopdl)
        return r

    rows = [w8(1, 6.0, nopdl=8.0), w8(1024, 30.0), w4(1, 5.0, 6.0, nopdl=6.0, nopdl8=8.0), w4(1024, 40.0, 30.0)]
    tables = format_table(rows).split("\n\n")
    assert "noPDL µs" in tables[0].splitlines()[0] and "8.0" in tables[0].splitlines()[1]
    assert tables[0].splitlines()[2].split()[3] == "-"  # M=1024: no no-PDL time
    assert "noPDL µs" in tables[1].splitlines()[0]
    s = summarize_issue7(rows)
    assert "W4A8 chn M<=16 ×w8a8: median 1.20 min 1.20 (target >= 1.8: short); both without PDL: median 1.33" in s
    assert "W4A8 chn M>=1024 ×w8a8: median 0.75" in s and "W8A8 M>=1024 ×fp16: median 0.43" in s
    assert "paired" not in s  # rows without a paired ratio: judged block-timed, as before


def test_issue7_w4a8_verdict_uses_the_paired_ratio_when_every_row_has_one():
    from qtool.bench import summarize_issue7

    def w4(M, x, xp):
        return {"op": "w4a8", "variant": "g128", "K": 4096, "N": 4096, "M": M, "us": 10.0, "us_w8a8": 10.0 * x,
                "x_w8a8": x, "x_w8a8_paired": xp, "us_fp16": 13.0, "x_fp16": 1.3, "tops": 1.0, "floor_us": 2.0,
                "bound": "compute", "pct_floor": 20.0, "cfg": "c20/s1"}

    rows = [w4(1024, 0.78, 0.81), w4(4096, 0.79, 0.83), w4(1024, 0.80, 0.79)]
    s = summarize_issue7(rows)
    assert "W4A8 g128 M>=1024 ×w8a8: median 0.79 min 0.78; paired median 0.81 min 0.79 (target >= 0.8 on paired: MET); by M: 1024 0.80, 4096 0.83" in s
    rows[0]["x_w8a8_paired"] = None  # a row without one: the block-timed verdict
    s = summarize_issue7(rows)
    assert "paired median 0.81 min 0.79 (target >= 0.8: short)" in s
    lines = format_table(rows).splitlines()
    assert lines[0].split()[-8:-6] == ["×w8a8", "pr"] and lines[1].split()[8] == "-"  # data: one token per column


def test_issue7_w8a8_verdicts_use_the_paired_ratios():
    from qtool.bench import summarize_issue7

    def w8(M, xf, xfp, xi, xip):
        return {"op": "w8a8", "K": 4096, "N": 4096, "M": M, "us": 10.0, "us_fp16": 10.0 * xf, "x_fp16": xf,
                "x_fp16_paired": xfp, "us_int_mm": 10.0 * xi, "x_int_mm": xi, "x_int_mm_paired": xip, "tops": 1.0,
                "floor_us": 4.0, "bound": "compute", "pct_floor": 40.0, "cfg": "c6/s1"}

    rows = [w8(1024, 1.58, 1.63, 1.2, 1.1), w8(4096, 1.59, 1.62, 1.3, 1.2)]
    s = summarize_issue7(rows)
    assert "W8A8 M>=1024 ×fp16: median 1.58 min 1.58; paired median 1.62 min 1.62 (target >= 1.6 on paired: MET)" in s
    assert "W8A8 M>=256 ×_int_mm: median 1.25 min 1.20; paired median 1.15 min 1.10 (target >= 0.9 on paired: MET)" in s
    lines = format_table(rows).splitlines()
    assert lines[0].split()[-9:-5] == ["×intmm", "pr", "×fp16", "pr"]
    assert lines[1].split()[6:10] == ["1.20", "1.10", "1.58", "1.63"]  # data rows: one token per column


class _FakeCuda:
    """Just enough of torch.cuda for the timers: a clock that the ops advance, graphs that replay recorded ops,
    events that read the clock. `drift` makes every op slower as time goes on (a GPU warming up)."""

    def __init__(self, drift: float):
        self.t, self.drift, self.recording = 0.0, drift, None
        fake = self

        class Graph:
            def __init__(self):
                self.ops = []

            def replay(self):
                for op in self.ops:
                    fake.t += op * (1 + fake.drift * fake.t)

        class Capture:
            def __init__(self, g):
                self.g = g

            def __enter__(self):
                fake.recording = self.g

            def __exit__(self, *a):
                fake.recording = None

        class Event:
            def __init__(self, enable_timing=True):
                self.at = None

            def record(self):
                self.at = fake.t

            def elapsed_time(self, other):
                return (other.at - self.at) * 1e3  # ms

        self.CUDAGraph, self.graph, self.Event = Graph, Capture, Event

    def synchronize(self):
        pass

    def op(self, cost_s):
        if self.recording is not None:
            self.recording.ops.append(cost_s)
        else:
            self.t += cost_s


def test_time_paired_keeps_drift_out_of_a_ratio(monkeypatch):
    import torch

    from qtool.bench import time_paired, time_rotating

    fake = _FakeCuda(drift=20.0)  # +20 % per 10 ms of GPU time
    for name in ("CUDAGraph", "graph", "Event", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    a = [lambda: fake.op(1e-4)] * 4  # two ops of the same cost, 4 weight copies each
    b = [lambda: fake.op(1e-4)] * 4
    block = time_rotating(a, 0.02) / time_rotating(b, 0.02)  # b timed after a: drift makes it look slower
    pa, pb = time_paired([a, b], 0.02)
    assert block < 0.9
    assert abs(pa / pb - 1) < 0.02 and pa > 100  # µs per call: 100 at the start, drifted up since
