"""Tests of records/: compare.py (record logs, iso-loss speedups, the crossover fit, the check against track-3's
runs, plots), gpu_check.py's summary and benchmark.py's TST timing."""
import argparse
import json
import math
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import benchmark  # noqa: E402
import compare  # noqa: E402
import gpu_check  # noqa: E402
import train_tst as T  # noqa: E402
from test_train import shards, tiny  # noqa: E402,F401,F811  shards: the session's fixture


def synthetic_log(path, schedule, points, seed=0, **other):
    """A record log with val points (step, loss, ms, tokens)."""
    settings = dict(dict(tst_schedule=schedule, tst_mode="full", seed=seed, steps=points[-1][0], embed_lr=0.001,
                         train_files="/work/data/sample/sample_train_*.bin"), **other)
    lines = ["# source", compare.SEPARATOR, "python 3 torch 2", json.dumps(settings)]
    lines += [f"step:{s}/{points[-1][0]} val_loss:{l:.4f} train_time:{ms}ms step_avg:{ms / max(1, s):.2f}ms tokens:{t}"
              for s, l, ms, t in points]
    lines.append(f"done: step:{points[-1][0]}/{points[-1][0]} val_loss:{points[-1][1]:.4f}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_benchmark_times_a_step_of_each_bag_size_with_the_trainers_batches(monkeypatch):
    monkeypatch.setattr(benchmark.torch, "compile", lambda model, **kw: model)  # eager: the timing code is the test
    seen = []
    real = T.train_step
    monkeypatch.setattr(T, "train_step", lambda model, opts, x, y, w, *a: seen.append((x.shape, y.shape)) or real(
        model, opts, x, y, w, *a))
    extra = ["--preset", "cpu", "--device", "cpu", "--n_layer", "1", "--n_embd", "32", "--n_head", "1", "--seq_len",
             "8", "--batch_size", "2", "--vocab_size", "64", "--val_tokens", "16"]
    times = benchmark.tst_step_times([2, 4], 1, extra)
    assert sorted(times) == [1, 2, 4] and all(len(t) == 1 and t[0] > 0 for t in times.values())
    # inputs: tokens (2, 8) for the baseline, bags (2, 8, s) with their next bags as targets for TST
    assert seen[:3] == [((2, 8), (2, 8)), ((2, 8, 2), (2, 8, 2)), ((2, 8, 4), (2, 8, 4))]


def test_compare_parses_a_real_log_from_a_tiny_run(shards, tmp_path, capsys):
    assert T.main(tiny(shards, tmp_path, "--tst_s", "2", "--tst_r", "0.5", steps=8)) == 0
    run = compare.parse_log(str(tmp_path / "logs" / "run.txt"))
    assert run["settings"]["tst_s"] == 2 and run["switches"] == [4] and run["ending"].startswith("done")
    assert [v[0] for v in run["vals"]] == [0, 4, 8] and run["vals"][-1][3] == 4 * 16 * (2 * 4 + 4)
    capsys.readouterr()
    assert compare.main([str(tmp_path / "logs" / "run.txt")]) == 0
    table = capsys.readouterr().out
    assert "| run | seeds | s | r |" in table and "| run | 1 | 2 | 0.5 | full | 8 | 768 |" in table


def test_iso_loss_speedup_on_synthetic_logs_with_a_known_answer(tmp_path):
    base = compare.parse_log(synthetic_log(tmp_path / "b.txt", "", [(0, 10, 0, 0), (10, 5, 100, 10), (20, 4, 200, 20)]))
    fast = compare.parse_log(synthetic_log(tmp_path / "f.txt", "4:0.3", [(0, 10, 0, 0), (10, 4.5, 50, 40), (20, 3.5, 100, 50)]))
    # both reach 4.0: the baseline at 200 ms, the run at 50 + 0.5 * 50 = 75 ms
    assert compare.speedup(base["vals"], fast["vals"]) == pytest.approx(200 / 75)
    assert compare.speedup(base["vals"], fast["vals"], axis=0) == pytest.approx(20 / 15)
    slow = compare.parse_log(synthetic_log(tmp_path / "s.txt", "4:0.3", [(0, 10, 0, 0), (20, 4.5, 200, 50)]))
    # the run ends worse, at 4.5: the baseline got there at 100 + 0.5 * 100 ms
    assert compare.speedup(base["vals"], slow["vals"]) == pytest.approx(150 / 200)
    started = compare.parse_log(synthetic_log(tmp_path / "u.txt", "8:0.3", [(0, 10, 0, 0)]))
    assert math.isnan(compare.speedup(base["vals"], started["vals"]))  # a run with no progress has no speedup
    rows = compare.compare([base, fast, slow], compare.config_key(base), target=4.6)
    assert rows[0]["speedup"] == "1.000" and rows[1]["seeds"] == 2 and rows[1]["data"] == "2.50"
    assert rows[1]["speedup"] == f"{np.mean([200 / 75, 150 / 200]):.3f} ± {np.std([200 / 75, 150 / 200], ddof=1):.3f}"


def test_compare_leaves_out_unfinished_runs_unless_asked(tmp_path, capsys):
    base = synthetic_log(tmp_path / "b.txt", "", [(0, 10, 0, 0), (10, 5, 100, 10), (20, 4, 200, 20)])
    cut = tmp_path / "c.txt"
    cut.write_text(open(base).read().replace("done: step:20/20", "interrupted: SIGTERM at step:20/20"))
    assert compare.main([base, str(cut)]) == 0
    out, err = capsys.readouterr()
    assert "left out, not finished: c" in err and "| b | 1 |" in out
    assert compare.main([base, str(cut), "--include_unfinished"]) == 0
    assert "| b (+1) | 2 |" in capsys.readouterr().out
    assert compare.main([base, str(tmp_path)]) == 0  # named and inside the folder: read once
    assert "| b | 1 |" in capsys.readouterr().out


def test_compare_names_the_settings_a_run_changes_beyond_its_columns(tmp_path, capsys):
    points = [(0, 10, 0, 0), (10, 5, 100, 10), (20, 4, 200, 20)]
    base = synthetic_log(tmp_path / "b.txt", "", points)
    synthetic_log(tmp_path / "t.txt", "4:0.3", points, seed=1)  # TST and seed have columns or pool: nothing to add
    synthetic_log(tmp_path / "e.txt", "4:0.3", points, embed_lr=0.01)
    synthetic_log(tmp_path / "o.txt", "", points, seed=1, train_files="/elsewhere/offset/sample_train_*.bin")
    synthetic_log(tmp_path / "m.txt", "", points, seed=2, train_files="/other/machine/sample/sample_train_*.bin")
    assert compare.main([base, str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| other settings |" in out and "| e | 1 | 4 | 0.3 | full | embed_lr=0.01 |" in out
    assert "| t | 1 | 4 | 0.3 | full |  |" in out
    assert "| o | 1 | 1 | - | - | train_data=offset/sample_train_*.bin |" in out  # other data: not a seed of b
    assert "| b (+1) | 2 | 1 | - | - |  |" in out  # m: the same shards on another machine's path, a seed of b
    assert compare.main([base, str(tmp_path / "t.txt")]) == 0
    assert "other settings" not in capsys.readouterr().out  # the column shows only when a run has one


def test_p_value_of_a_record_claim():
    assert compare.student_t_sf(1.0, 2) == pytest.approx(0.5 - 1 / (2 * math.sqrt(3)), abs=1e-6)
    assert compare.student_t_sf(0.0, 5) == pytest.approx(0.5, abs=1e-6)
    assert compare.p_value_under([3.270, 3.272, 3.268, 3.271], 3.28) < 0.01
    assert compare.p_value_under([3.270, 3.29, 3.275], 3.28) > 0.05


def test_crossover_pairs_each_tst_run_with_the_baseline_of_its_seed_and_budget(tmp_path, capsys):
    def log(name, schedule, seed, steps, final, n_embd=128):
        points = [(0, 10, 0, 0), (steps // 2, 5, 50 * steps, 10 * steps), (steps, final, 100 * steps, 20 * steps)]
        return synthetic_log(tmp_path / f"{name}.txt", schedule, points, seed=seed, n_layer=4, n_embd=n_embd)
    log("b20_0", "", 0, 20, 4.0), log("b20_1", "", 1, 20, 4.2), log("b20_2", "", 2, 20, 4.1)
    log("t20_0", "4:0.3", 0, 20, 4.1), log("t20_1", "4:0.3", 1, 20, 4.25), log("t20_9", "4:0.3", 9, 20, 3.0)  # no base
    log("b40_0", "", 0, 40, 3.6), log("t40_0", "4:0.3", 0, 40, 3.5)
    log("w40_0", "", 0, 40, 3.0, n_embd=256), log("wt40_0", "4:0.3", 0, 40, 3.1, n_embd=256)
    points = compare.crossover([compare.parse_log(str(p)) for p in sorted(tmp_path.glob("*.txt"))])
    assert [(p["testbed"], p["steps"], p["seeds"]) for p in points] == [("4x128", 20, 2), ("4x128", 40, 1), ("4x256", 40, 1)]
    assert points[0]["gap"] == pytest.approx([0.1, 0.05]) and points[0]["tst"] == "4:0.3"
    # behind on both seeds: paired t = -0.075 / (0.0354 / sqrt 2) = -3, one degree of freedom; one seed: no test
    assert points[0]["p_ahead"] == pytest.approx(0.5 + math.atan(3) / math.pi, abs=1e-4) and math.isnan(points[1]["p_ahead"])
    # seed 0 at 20 steps: TST ends at 4.1, which its baseline reached at step 10 + (5 - 4.1) / (5 - 4) * 10 = 19
    assert points[0]["step_speedup"][0] == pytest.approx(19 / 20)
    assert points[1]["step_speedup"] == [pytest.approx(40 / (20 + (5 - 3.6) / (5 - 3.5) * 20))]  # TST ahead: > 1
    assert compare.main([str(tmp_path), "--crossover"]) == 0
    out = capsys.readouterr().out
    assert "| 4x128 | 4:0.3 | 20 | 2 | 4.1000 ± 0.1414 | 4.1750 ± 0.1061 | 0.0750 ± 0.0354 |" in out
    assert compare.main([str(tmp_path / "b20_0.txt"), str(tmp_path / "t40_0.txt"), "--crossover"]) == 2
    assert "no TST run has a baseline" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    assert compare.main([str(tmp_path), "--crossover", "--plot", str(tmp_path / "map.png")]) == 0
    assert open(tmp_path / "map.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a fit per TST setting, only where its points outnumber the plane's terms (4:0.3: 4 points, output: 1)
    log("b80_0", "", 0, 80, 3.3), log("t80_0", "4:0.3", 0, 80, 3.35)
    synthetic_log(tmp_path / "o40_0.txt", "4:0.3", [(0, 10, 0, 0), (20, 5, 2000, 400), (40, 3.7, 4000, 800)],
                  tst_mode="output", n_layer=4, n_embd=128)
    capsys.readouterr()
    assert compare.main([str(tmp_path), "--crossover", "--fit", "--plot", str(tmp_path / "map.png")]) == 0
    out = capsys.readouterr().out
    assert "fit over 4 points, TST 4:0.3: gap = a + b ln N + c ln S" in out
    assert "no fit for TST 4:0.3 output: 1 point(s), no more than the plane's terms" in out


def test_compare_refuses_what_is_not_a_record_log(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("step:1/2 val_loss:3.0\n")
    assert compare.main([str(tmp_path / "notes.txt")]) == 2
    assert "not a train_tst.py record log" in capsys.readouterr().err
    (tmp_path / "half.txt").write_text("x\n" + compare.SEPARATOR + "\nno json here\n")
    assert compare.main([str(tmp_path / "half.txt")]) == 2
    assert "no hyperparameter JSON line" in capsys.readouterr().err
    (tmp_path / "started.txt").write_text("x\n" + compare.SEPARATOR + '\n{"tst_schedule": ""}\nmodel: 1 parameters\n')
    done = synthetic_log(tmp_path / "done.txt", "", [(0, 10, 0, 0), (10, 5, 100, 10)])
    assert compare.main([done, str(tmp_path / "started.txt")]) == 0  # a run that has just started is left out
    assert "left out, not finished: started" in capsys.readouterr().err
    (tmp_path / "ended.txt").write_text("x\n" + compare.SEPARATOR + '\n{"tst_schedule": ""}\ndone: step:0/0\n')
    assert compare.main([str(tmp_path / "ended.txt")]) == 2
    assert "record log without any validation line" in capsys.readouterr().err


def test_plot_draws_curves_or_says_how_to_get_matplotlib(tmp_path, monkeypatch, capsys):
    base = synthetic_log(tmp_path / "b.txt", "", [(0, 10, 0, 0), (10, 5, 100, 10), (20, 4, 200, 20)])
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)
        with pytest.raises(SystemExit, match="pip install matplotlib"):
            compare.main([base, "--plot", str(tmp_path / "p.png")])
        assert capsys.readouterr().out == ""  # said before any table, not after it
    pytest.importorskip("matplotlib")
    assert compare.main([base, "--plot", str(tmp_path / "p.png")]) == 0
    assert open(tmp_path / "p.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def track3_log(path, trials):
    """A log in modded-nanogpt's track-3 format (the source, '=' lines, then its own val lines), trials one after another."""
    lines = ['"""train_gpt_simple.py"""', compare.SEPARATOR, "Running PyTorch 2.10.0+cu128 compiled for CUDA 12.8", compare.SEPARATOR]
    for points in trials:
        n = points[-1][0]
        lines += [f"step:{s}/{n} val_loss:{l:.5f} train_time:{s * 0.15365:.3f}s step_avg:{153.65 if s else float('nan'):.2f}ms"
                  for s, l in points]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_reference_check_reads_the_track3_format_and_flags_what_is_outside_the_noise(tmp_path, capsys):
    ref = track3_log(tmp_path / "03eada03.txt", [[(0, 10.82584), (125, 4.61126), (3500, 3.27847), (3600, 3.27568)]])
    assert compare.parse_reference(ref) == [[(0, 10.82584), (125, 4.61126), (3500, 3.27847), (3600, 3.27568)]]
    ours = synthetic_log(tmp_path / "ours.txt", "", [(0, 10.8258, 0, 0), (125, 4.6300, 1, 1), (3500, 3.2770, 2, 2), (3600, 3.2790, 3, 3)])
    assert compare.main([ours, "--reference", ref]) == 0
    out = capsys.readouterr().out
    tolerance = 3 * 0.0013 * math.sqrt(2)  # one run each side, the README's sigma
    assert f"| 3500 | 3.2785 | 0.0013 (track-3 README) | 3.2770 | 1 of 1 (±{tolerance:.4f}) | -0.0015 | yes |" in out
    assert f"| 3600 | 3.2757 | 0.0013 (track-3 README) | 3.2790 | 1 of 1 (±{tolerance:.4f}) | +0.0033 | yes |" in out
    assert f"| 125 | 4.6113 | 0.0013 (track-3 README) | 4.6300 | 0 of 1 (±{tolerance:.4f}) | +0.0187 | no (3σ: {tolerance:.4f}) |" in out
    assert "3 of 4 validation steps: our mean within 3σ of the reference's" in out
    assert compare.main([ours, "--reference", ours]) == 2
    assert "no track-3 validation line" in capsys.readouterr().err


def test_reference_check_against_a_folder_of_ten_runs_judges_each_run_and_our_mean(tmp_path, capsys):
    folder = tmp_path / "20260610_tuned_baseline_3250"
    folder.mkdir()
    offsets = [-0.0015, -0.001, -0.0005, 0.0, 0.0, 0.0, 0.0, 0.0005, 0.001, 0.0015]  # sd 0.000943 at the last step
    for i, d in enumerate(offsets):  # one run a file, as result #36's logs
        track3_log(folder / f"{i:08x}-run.txt", [[(0, 10.82584), (2925, 3.3139 + d / 2), (3250, 3.2787 + d)]])
    sd = float(np.std([3.2787 + d for d in offsets], ddof=1))
    runs = [synthetic_log(tmp_path / f"ours{k}.txt", "", [(0, 10.8258, 0, 0), (2925, 3.3140, 1, 1), (3250, loss, 2, 2)], seed=k)
            for k, loss in enumerate([3.2790, 3.2830, 3.2800])]  # the second run alone is out: +0.0043 > 3 sd x 1.049
    assert compare.main(runs + ["--reference", str(folder)]) == 0
    out = capsys.readouterr().out
    one_run, of_mean = 3 * sd * math.sqrt(1 + 1 / 10), 3 * sd * math.sqrt(1 / 3 + 1 / 10)
    assert (f"| 3250 | 3.2787 | {sd:.4f} (10 trials) | 3.2790 3.2830 3.2800 | 2 of 3 (±{one_run:.4f}) | +0.0020 |"
            f" no (3σ: {of_mean:.4f}) |") in out  # each run but one is in the noise; their mean, 3 runs, is not
    assert "| 2925 |" in out and "| 0 | 10.8258 |" in out
    assert "target: mean val loss at the last step 3.2807 over 3 run(s), not under 3.28" in out
    assert compare.main(runs[:1] + ["--reference", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "1 of 1" in out and "| +0.0003 | yes |" in out
    assert "target: mean val loss at the last step 3.2790 over 1 run(s), under 3.28" in out


def test_gap_fit_recovers_a_known_plane_and_its_zero_crossing(tmp_path, capsys):
    a, b, c = 0.5, 0.01, -0.08  # gap = a + b ln N + c ln S
    points = [dict(testbed=f"{n}x", tst="4:0.3", size=size, steps=steps, gap=[a + b * math.log(size) + c * math.log(steps) + noise])
              for n, (size, steps, noise) in enumerate([(1e6, 100, 0.0), (1e6, 400, 0.001), (1e6, 1600, -0.001),
                                                         (5e6, 400, 0.0), (5e6, 1600, 0.0005), (2e7, 800, -0.0005)])]
    fit = compare.fit_gap(points)
    assert fit["terms"] == ["a", "b", "c"] and fit["dof"] == 3
    assert [fit["coef"][t] for t in "abc"] == pytest.approx([a, b, c], abs=0.01)
    steps, low, high = compare.zero_crossing_steps(fit, 1e6)
    assert steps == pytest.approx(math.exp(-(a + b * math.log(1e6)) / c), rel=0.05) and low < steps < high
    one_size = compare.fit_gap([p for p in points if p["size"] == 1e6])
    assert one_size["terms"] == ["a", "c"]  # a single size: no size term
    flat = compare.fit_gap([dict(p, gap=[0.1 + 0.001 * math.log(p["steps"])]) for p in points])
    assert compare.zero_crossing_steps(flat, 1e6) is None  # a gap growing with the budget never crosses
    assert compare.fit_gap(points[3:5]) is None  # two points, two terms: nothing left to estimate the error
    value, se = compare.fitted_gap(fit, 1e6, 1000)
    assert value == pytest.approx(a + b * math.log(1e6) + c * math.log(1000), abs=0.002) and 0 < se < 0.002
    lines = compare.fit_lines(fit, points[:1])
    assert lines[0].startswith("fit over 1 points, TST 4:0.3: gap = a + b ln N + c ln S") and "crosses zero at" in lines[1]
    label, size, steps, measured = compare.PUBLIC_POINTS[0]
    expected = a + b * math.log(size) + c * math.log(steps)
    assert lines[2].startswith(f"extrapolated to {label} (N = {size / 1e6:.2f}M, {steps:,} steps): {expected:+.3f} ± ")




def gpu_check_log(path, steps_ms, s_of_step, warmup_s=50, peak=28.9):
    """A record log as a gpu_check run writes it: cumulative train_time per step, a warmup line, a peak_mem end."""
    lines, total = ["# source", compare.SEPARATOR, "{}", f"warmup: {warmup_s} s untimed (compile and ...)",
                    "model: 162,354,816 parameters, 4.481e+14 FLOPs per step"], 0
    for step, ms in enumerate(steps_ms, 1):
        total += ms
        lines.append(f"step:{step}/{len(steps_ms)} train_loss:5.0 phase:tst s:{s_of_step(step)} train_time:{total}ms")
    lines.append(f"done: step:{len(steps_ms)}/{len(steps_ms)} val_loss:5.0 peak_mem:{peak}GiB")
    path.write_text("\n".join(lines) + "\n")


def test_gpu_check_summary_takes_each_phases_median_after_its_first_steps(tmp_path, capsys):
    gpu_check_log(tmp_path / "baseline.txt", [5000, 900, 800] + [1000] * 10, lambda step: 1)
    steps = [6000, 3000, 1200] + [1100] * 10 + [700] * 2 + [1000] * 5  # s = 8 to step 15, then s = 1
    gpu_check_log(tmp_path / "tst_s8.txt", steps, lambda step: 8 if step <= 15 else 1, warmup_s=66, peak=41.1)
    summary = gpu_check.summarize(str(tmp_path / "tst_s8.txt"))
    assert summary["times"] == {8: 1100, 1: 1000} and (summary["warmup"], summary["peak"]) == (66, 41.1)
    args = argparse.Namespace(out=str(tmp_path), steps=20, peak_tflops=989.0)
    gpu_check.write_summary(args, [("baseline", "exit 0 after 94 s", 94), ("tst", "exit 0 after 117 s", 117)])
    text = open(tmp_path / "summary.md").read()
    assert "tst_s8: superposition step / baseline step = 1.100" in text
    mfu = 100 * 4.481e14 / 1.1 / 989e12
    assert f"| tst_s8 | s = 8 | 1100 | {mfu:.1f}% | 66 s | 41.1 GiB |" in text


def test_a_resumed_logs_repeated_points_count_once_and_the_reference_check_takes_runs_of_its_length(tmp_path, capsys):
    path = synthetic_log(tmp_path / "resumed.txt", "", [(0, 10, 0, 0), (125, 5, 10, 1), (250, 4.5, 20, 2), (125, 5.1, 12, 1),
                                                        (250, 4.4, 21, 2), (3250, 3.28, 300, 3)])
    assert [v[:2] for v in compare.parse_log(path)["vals"]] == [(0, 10), (125, 5.1), (250, 4.4), (3250, 3.28)]
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, d in enumerate((-0.001, 0.0, 0.001)):
        track3_log(ref / f"{i}.txt", [[(125, 5.1 + d), (3250, 3.2787 + d)]])
    longer = synthetic_log(tmp_path / "longer.txt", "", [(0, 10, 0, 0), (125, 5.2, 10, 1), (3600, 3.27, 300, 3)], seed=1)
    assert compare.main([path, longer, os.path.join(str(tmp_path), ".", "longer.txt"), "--reference", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "| 125 | 5.1000 |" in out and "| 5.1000 | 1 of 1" in out  # the 3600-step run is not pooled in
    assert "target: mean val loss at the last step 3.2800 over 1 run(s), not under 3.28" in out
    assert compare.main([path, "--reference", str(ref), "--target", "3.3"]) == 0  # a --target replaces the benchmark's
    assert "target: mean val loss at the last step 3.2800 over 1 run(s), under 3.3" in capsys.readouterr().out
    assert compare.main([longer, "--reference", str(ref)]) == 2
    assert "no baseline run of the reference's length" in capsys.readouterr().err


def test_compare_says_when_a_speedup_crosses_budgets(tmp_path, capsys):
    base = synthetic_log(tmp_path / "b.txt", "", [(0, 10, 0, 0), (200, 4, 2000, 20), (400, 3.5, 4000, 40)])
    short = synthetic_log(tmp_path / "s.txt", "4:0.3", [(0, 10, 0, 0), (30, 5, 300, 6), (60, 4.2, 600, 12)], seed=1)
    assert compare.main([base, short]) == 0
    assert "(budgets differ: 60 vs 400 steps)" in capsys.readouterr().out
