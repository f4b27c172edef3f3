"""Read train_tst.py record logs: a row per run, speedup at iso-loss against a baseline, seeds, plots.

    python records/compare.py records/cpu/2026-11-22_400steps/            # every log in a folder
    python records/compare.py base.txt tst.txt --target 3.28 --plot curves.png
    python records/compare.py records/cpu/2026-11-23_crossover/ --crossover --plot map.png   # speedup vs budget
    python records/compare.py records/cpu/2026-11-24_size/ --crossover --fit --plot map.png   # gap fitted by size, budget
    python records/compare.py logs/gpt2_seed*.txt --reference 20260610_tuned_baseline_3250/   # is my baseline right?

The baseline is the first argument's run (or every run of --baseline's configuration, averaged over
seeds). Speedup at iso-loss: take the loss L that both runs reach (the worse of their final val losses);
speedup = the baseline's training time to reach L / the run's training time to reach L, each interpolated
linearly between validation points. Above 1, the run is faster; with the run ahead at the end this is the
baseline's whole time over the run's time to the baseline's final loss.
"""
import argparse
import glob
import json
import math
import os
import re
import sys

import numpy as np

SEPARATOR = "=" * 100
VAL_LINE = re.compile(r"step:(\d+)/(\d+) val_loss:(\S+) train_time:(\d+)ms step_avg:(\S+)ms tokens:(\d+)$")
SWITCH_LINE = re.compile(r"checkpoint: step:(\d+) phase switch")
HELLASWAG_LINE = re.compile(r"hellaswag: acc_norm (\S+) acc (\S+) \((\d+) items\)")
# modded-nanogpt's track-3 logs (train_gpt_simple.py): "step:125/3600 val_loss:4.61126 train_time:22.160s step_avg:177.28ms"
REFERENCE_VAL_LINE = re.compile(r"step:(\d+)/(\d+) val_loss:(\S+) train_time:([\d.]+)s step_avg:\S+ms")
TRACK3_NOISE = 0.0013  # the track-3 README's run-to-run standard deviation of the final val loss near 3.28
REFERENCE_TARGET = 3.28  # the track-3 benchmark: mean val loss under this at the last step
NOT_A_CONFIG = {"seed", "run_id", "log_dir", "resume", "save_every", "log_every", "compile", "target_val_loss",
                "train_files", "val_files", "micro_batch_size", "peak_tflops", "device", "allow_repeat", "hellaswag",
                "sample_tokens", "sample_prompt", "temperature", "top_k", "eval_only"}
HAS_A_COLUMN = {"tst_s", "tst_r", "tst_schedule", "tst_mode", "steps"}
BUDGET = {"steps", "val_every"}
TST_SETTINGS = {"tst_s", "tst_r", "tst_schedule", "tst_mode", "tst_weights", "mtp_k"}
SHAPE = {"n_layer", "n_embd", "n_head"}


class NotARecord(Exception):
    pass


def parse_log(path):
    """A run: its settings, validation points (step, loss, ms, tokens), phase switches and how it ended."""
    with open(path, errors="replace") as f:
        text = f.read()
    if "\n" + SEPARATOR + "\n" not in text:
        raise NotARecord(f"{path}: not a train_tst.py record log (no line of 100 '=' after the source)")
    lines = text.split("\n" + SEPARATOR + "\n", 1)[1].splitlines()
    settings = next((json.loads(l) for l in lines if l.startswith("{")), None)
    if not isinstance(settings, dict) or "tst_schedule" not in settings:
        raise NotARecord(f"{path}: not a train_tst.py record log (no hyperparameter JSON line)")
    vals = [(int(m[1]), float(m[3]), int(m[4]), int(m[6])) for m in map(VAL_LINE.match, lines) if m]
    vals = sorted({v[0]: v for v in vals}.values())  # a run resumed from an earlier checkpoint: its later points
    last = next((l for l in reversed(lines) if l.strip() and not l.startswith("note:")), "")  # a resume's note after done:
    ending = last if last.split(":")[0] in ("done", "interrupted", "failed") else "unfinished"
    if not vals and ending != "unfinished":  # a run that has just started has none yet: left out below, not refused
        raise NotARecord(f"{path}: record log without any validation line")
    hellaswag = next(((float(m[1]), float(m[2]), int(m[3])) for m in map(HELLASWAG_LINE.match, lines) if m), None)
    return dict(path=path, name=os.path.splitext(os.path.basename(path))[0], settings=settings, vals=vals,
                switches=[int(m[1]) for m in map(SWITCH_LINE.match, lines) if m], ending=ending, hellaswag=hellaswag)


def parse_reference(path):
    """The val curves of a modded-nanogpt track-3 record log: its source, a line of 100 '=', then lines such as
    `step:125/3600 val_loss:4.61126 train_time:22.160s step_avg:177.28ms`; a log of several trials starts over at
    step 0 for each. Returns [[(step, loss), ...] for each trial]."""
    trials = []
    with open(path, errors="replace") as f:
        for m in map(REFERENCE_VAL_LINE.search, f):
            if m and (int(m[1]) == 0 or not trials):
                trials.append([])
            if m:
                trials[-1].append((int(m[1]), float(m[3])))
    if not trials:
        raise NotARecord(f"{path}: no track-3 validation line (step:N/M val_loss:X train_time:Ys step_avg:Zms)")
    return trials


def reference_check(runs, trials, noise=TRACK3_NOISE):
    """At each validation step of the reference that our runs share: the reference's mean and run-to-run spread over
    its trials, each of our runs and their mean, and whether each is within the noise: a run within 3 standard
    deviations of one run (sd x sqrt(1 + 1/trials)) of the reference's mean, our mean within 3 standard deviations of
    a difference of two means (sd x sqrt(1/ours + 1/trials)). The spread is the trials' own at that step where there
    are 3 or more, else `noise` (a figure measured near the end of training: earlier steps vary more)."""
    theirs, ours = {}, {}
    for trial in trials:
        for step, loss in trial:
            theirs.setdefault(step, []).append(loss)
    baselines = reference_runs(runs, trials)
    for run in baselines:
        for step, loss, _, _ in run["vals"]:
            ours.setdefault(step, []).append(loss)
    rows = []
    for step in sorted(theirs.keys() & ours.keys()):
        ref, mine, ref_mean = theirs[step], ours[step], float(np.mean(theirs[step]))
        sigma, source = (float(np.std(ref, ddof=1)), f"{len(ref)} trials") if len(ref) >= 3 else (noise, "track-3 README")
        one_run = 3 * sigma * math.sqrt(1 + 1 / len(ref))
        inside = sum(abs(loss - ref_mean) <= one_run for loss in mine)
        diff = float(np.mean(mine)) - ref_mean
        of_mean = 3 * sigma * math.sqrt(1 / len(mine) + 1 / len(ref))
        rows.append(dict(step=step, ref=f"{ref_mean:.4f}", sigma=f"{sigma:.4f} ({source})",
                         ours=" ".join(f"{loss:.4f}" for loss in mine), runs_within=f"{inside} of {len(mine)} (±{one_run:.4f})",
                         diff=f"{diff:+.4f}", within="yes" if abs(diff) <= of_mean else f"no (3σ: {of_mean:.4f})"))
    return rows


def reference_runs(runs, trials):
    """Our baseline runs of the reference's length (a step number means another point of another schedule)."""
    lengths = {trial[-1][0] for trial in trials}
    return [run for run in runs if is_baseline(run) and run["settings"]["steps"] in lengths]


def reference_target_line(runs, trials, target=REFERENCE_TARGET):
    """The benchmark's line: the mean val loss of our baseline runs at their last step under the target."""
    finals = [run["vals"][-1][1] for run in reference_runs(runs, trials) if run["vals"][-1][0] == run["settings"]["steps"]]
    if not finals:
        return "target: no run of the reference's length reached its last step"
    verdict = "under" if np.mean(finals) < target else "not under"
    p = p_value_under(finals, target)
    return (f"target: mean val loss at the last step {np.mean(finals):.4f} over {len(finals)} run(s), {verdict} {target}"
            + (f" (p = {p:.3g} that it is not)" if not math.isnan(p) else ""))


REFERENCE_COLUMNS = [("step", "step"), ("ref", "reference mean"), ("sigma", "σ of one run"), ("ours", "our runs"),
                     ("runs_within", "runs within 3σ"), ("diff", "our mean − reference"), ("within", "mean within 3σ")]


def config(run):
    """The settings that make a run's configuration: not its seed, logging or paths, but its data, named by the
    shards' folder and pattern (the same shards sit under other paths on other machines)."""
    s = run["settings"]
    c = {k: v for k, v in s.items() if k not in NOT_A_CONFIG}
    for split in ("train", "val"):
        c[f"{split}_data"] = "/".join(s.get(f"{split}_files", "").replace(os.sep, "/").split("/")[-2:])
    return c


def config_key(run):
    return json.dumps(config(run), sort_keys=True)


def time_to_loss(vals, loss, axis=2):
    """First time (axis=2) or step (axis=0) at which the val curve reaches `loss`, linear between points."""
    for prev, cur in zip(vals, vals[1:]):
        if cur[1] <= loss:
            if prev[1] <= loss:
                return float(prev[axis])
            frac = (prev[1] - loss) / (prev[1] - cur[1])
            return prev[axis] + frac * (cur[axis] - prev[axis])
    return float(vals[0][axis]) if vals[0][1] <= loss else math.nan


def mean_curve(runs):
    """Val points averaged over seeds at the steps all of them share."""
    steps = sorted(set.intersection(*({v[0] for v in r["vals"]} for r in runs)))
    table = [{v[0]: v for v in r["vals"]} for r in runs]
    return [(s, *(float(np.mean([t[s][i] for t in table])) for i in (1, 2, 3))) for s in steps]


def speedup(base_vals, run_vals, axis=2):
    """Baseline time (or steps) to the loss both reach, over the run's."""
    loss = max(base_vals[-1][1], run_vals[-1][1])
    run_time = time_to_loss(run_vals, loss, axis)
    return time_to_loss(base_vals, loss, axis) / run_time if run_time > 0 else math.nan  # nan: not measurable


def student_t_sf(t, df):
    """P(T > t) for Student's t with df degrees of freedom (numerical, no scipy needed)."""
    theta = np.linspace(math.atan(t), math.pi / 2, 200_001)
    x = np.tan(theta[:-1])
    density = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    integrand = density * (1 + x ** 2 / df) ** (-(df + 1) / 2) / np.cos(theta[:-1]) ** 2
    return float(np.sum((integrand[1:] + integrand[:-1]) / 2 * np.diff(theta[:-1])))


def p_value_under(losses, target):
    """One-sided t-test p-value that the mean of `losses` is under `target` (the speedrun's rule: p < 0.01)."""
    n = len(losses)
    if n < 2:
        return math.nan
    std = float(np.std(losses, ddof=1))
    if std == 0:
        return 0.0 if np.mean(losses) < target else 1.0
    return student_t_sf((target - float(np.mean(losses))) / (std / math.sqrt(n)), n - 1)


def describe(run):
    s = run["settings"]
    return dict(schedule=s["tst_schedule"] or "1", mode=s["tst_mode"] if s["tst_schedule"] else "-",
                steps=run["vals"][-1][0], tokens=run["vals"][-1][3], val=run["vals"][-1][1], ms=run["vals"][-1][2])


def other_settings(run, base_run):
    """'key=value' for each setting of a run's configuration that differs from the baseline's and has no column."""
    c, b = config(run), config(base_run)
    return ", ".join(f"{k}={c[k]}" for k in sorted(c) if k not in HAS_A_COLUMN and c[k] != b.get(k))


def fmt(values, digits):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def compare(runs, baseline_key, target=None):
    """Rows of the table, one per configuration (seeds pooled), the baseline's first."""
    groups = {}
    for run in runs:
        groups.setdefault(config_key(run), []).append(run)
    base_vals = mean_curve(groups[baseline_key])
    base = describe(groups[baseline_key][0])
    base_step_ms = float(np.mean([describe(r)["ms"] / max(1, describe(r)["steps"]) for r in groups[baseline_key]]))
    rows = []
    for key in [baseline_key] + [k for k in groups if k != baseline_key]:
        group, d = groups[key], describe(groups[key][0])
        finals = [describe(r)["val"] for r in group]
        row = dict(name=group[0]["name"] if len(group) == 1 else f"{group[0]['name']} (+{len(group) - 1})",
                   seeds=len(group), s=d["schedule"], r="-", mode=d["mode"], steps=d["steps"], tokens=d["tokens"],
                   val=fmt(finals, 4), time=fmt([describe(r)["ms"] / 1000 for r in group], 1),
                   speedup=fmt([speedup(base_vals, r["vals"]) for r in group], 3),
                   step_speedup=fmt([speedup(base_vals, r["vals"], axis=0) for r in group], 3),
                   step_time=fmt([describe(r)["ms"] / max(1, describe(r)["steps"]) / base_step_ms for r in group], 3),
                   data=f"{d['tokens'] / max(1, base['tokens']):.2f}",
                   ended=",".join(sorted({r["ending"].split(":")[0] for r in group})))
        if d["steps"] != base["steps"]:  # an iso-loss speedup across budgets compares different schedules
            row["speedup"] += f" (budgets differ: {d['steps']} vs {base['steps']} steps)"
        other = other_settings(group[0], groups[baseline_key][0])
        if other:
            row["other"] = other
        if ":" in d["schedule"] and "," not in d["schedule"]:
            row["s"], row["r"] = d["schedule"].split(":")
        scored = [r["hellaswag"] for r in group if r["hellaswag"]]
        if scored:
            row["hellaswag"] = fmt([h[0] for h in scored], 4) + f" ({scored[0][2]} items)"
        if target is not None:
            row["to_target_s"] = fmt([time_to_loss(r["vals"], target) / 1000 for r in group], 1)
            row["p_under_target"] = f"{p_value_under(finals, target):.4f}" if len(group) > 1 else "n/a"
        rows.append(row)
    return rows


COLUMNS = [("name", "run"), ("seeds", "seeds"), ("s", "s"), ("r", "r"), ("mode", "mode"), ("other", "other settings"),
           ("steps", "steps"), ("tokens", "tokens"), ("val", "final val loss"), ("time", "train time (s)"),
           ("speedup", "speedup at iso-loss (time)"), ("step_speedup", "(steps)"), ("step_time", "step time ratio"),
           ("data", "data ratio"), ("hellaswag", "HellaSwag acc_norm"), ("to_target_s", "time to target (s)"), ("p_under_target", "p(mean < target)"),
           ("ended", "ended")]


def is_baseline(run):
    return not run["settings"]["tst_schedule"] and run["settings"].get("mtp_k", 1) <= 1


def settings_key(run, keep):
    return json.dumps({k: v for k, v in config(run).items() if keep(k)}, sort_keys=True)


def testbed_names(keys):
    """'layers x width' and whatever else differs between the testbeds (JSON keys)."""
    configs = [json.loads(k) for k in keys]
    varying = sorted({k for c in configs for k in c if k not in SHAPE and any(o.get(k) != c.get(k) for o in configs)})
    return {key: " ".join([f"{c.get('n_layer', '?')}x{c.get('n_embd', '?')}"] + [f"{k}={c.get(k)}" for k in varying])
            for key, c in zip(keys, configs)}


def crossover(runs):
    """The crossover map: per testbed (every setting but the budget, TST's and the seed), TST configuration and step
    budget, each TST run paired with the baseline run of the same seed and budget (a shuffled data order follows the
    seed, so the pair shares its data): final val losses, the paired gap, the one-sided p-value that TST ends ahead
    (paired t-test), and the iso-loss speedup of each pair."""
    testbed = {id(r): settings_key(r, lambda k: k not in BUDGET | TST_SETTINGS) for r in runs}
    pair_key = lambda run: (testbed[id(run)], run["settings"]["steps"], run["settings"].get("seed"))
    baselines = {pair_key(r): r for r in runs if is_baseline(r)}
    pairs = {}
    for run in runs:
        base = baselines.get(pair_key(run))
        if base is not None and not is_baseline(run):
            key = (testbed[id(run)], settings_key(run, lambda k: k in TST_SETTINGS), run["settings"]["steps"])
            pairs.setdefault(key, []).append((base, run))
    names = testbed_names(sorted({key[0] for key in pairs}))
    points = []
    for (bed, _, steps), group in sorted(pairs.items(), key=lambda item: (names[item[0][0]], item[0][1], item[0][2])):
        d = describe(group[0][1])
        mtp = group[0][1]["settings"].get("mtp_k", 1)
        base_val, tst_val = [base["vals"][-1][1] for base, _ in group], [run["vals"][-1][1] for _, run in group]
        gaps = [t - b for b, t in zip(base_val, tst_val)]
        shape = group[0][1]["settings"]
        points.append(dict(testbed=names[bed], steps=steps, seeds=len(group), size=12 * shape["n_layer"] * shape["n_embd"] ** 2,
                           tst=f"{d['schedule']}" + (f" {d['mode']}" if d["mode"] != "full" else "")
                           + (f" mtp_k={mtp}" if mtp > 1 else ""),
                           base_val=base_val, tst_val=tst_val, gap=gaps, p_ahead=p_value_under(gaps, 0.0),
                           step_speedup=[speedup(base["vals"], run["vals"], axis=0) for base, run in group],
                           speedup=[speedup(base["vals"], run["vals"]) for base, run in group]))
    return points


CROSSOVER_COLUMNS = [("testbed", "testbed"), ("tst", "TST s:r"), ("steps", "steps"), ("seeds", "seeds"),
                     ("base_val", "baseline val loss"), ("tst_val", "TST val loss"), ("gap", "gap (TST - baseline)"),
                     ("p_ahead", "p(TST ahead)"), ("step_speedup", "speedup at iso-loss (steps)"),
                     ("speedup", "(time)")]


# Public TST results at small scale, beside ours on the map: (label, blocks' parameters, steps, final-loss gap)
PUBLIC_POINTS = [("100M replication, 12 x 512, WSD, Muon-family", 12 * 12 * 512 ** 2, 3000, -0.073),
                 ("paper, 270M, WSD, AdamW", None, 20000, -0.067)]


def fit_gap(points):
    """Least squares over the map's points (each point's mean gap): gap = a + b ln N + c ln S, with N the blocks'
    parameters (12 x layers x width^2) and S the step budget; a term whose variable takes a single value is left out.
    A plane in log size and log budget is the simplest form that lets the gap change sign: the measured gaps shrink
    about linearly in log budget, and scaling-law differences are linear in log N over small ranges.
    Returns {term: (coefficient, standard error)}, the covariance, and the residual standard deviation; None where
    the points do not outnumber the terms (no residual is left to give the coefficients an error)."""
    terms = ["a"] + [name for name, key in (("b", "size"), ("c", "steps")) if len({p[key] for p in points}) > 1]
    if len(points) <= len(terms):
        return None
    X = np.array([plane_row(terms, p["size"], p["steps"]) for p in points])
    y = np.array([float(np.mean(p["gap"])) for p in points])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(y) - len(terms)
    sigma = float(np.sqrt(np.sum((y - X @ coef) ** 2) / dof))
    cov = sigma ** 2 * np.linalg.pinv(X.T @ X)
    return dict(terms=terms, coef=dict(zip(terms, coef)), se=dict(zip(terms, np.sqrt(np.diag(cov)))), cov=cov, sigma=sigma, dof=dof)


def plane_row(terms, size, steps):
    """The plane's regressors (1, ln N, ln S), those of `terms` only."""
    return [{"a": 1.0, "b": math.log(size), "c": math.log(steps)}[t] for t in terms]


def fitted_gap(fit, size, steps):
    """The fitted gap at (N, S) and its standard error (of the fitted mean, not of one more run)."""
    x = np.array(plane_row(fit["terms"], size, steps))
    return float(x @ np.array([fit["coef"][t] for t in fit["terms"]])), float(np.sqrt(x @ fit["cov"] @ x))


def zero_crossing_steps(fit, size):
    """The budget S at which the fitted gap of a model of `size` is 0, with a one-standard-error range (delta method
    in log S), or None where the fit has no budget term or the gap does not shrink with the budget."""
    c = fit["coef"]
    if "c" not in c or c["c"] >= 0:
        return None
    log_s = -(c["a"] + c.get("b", 0.0) * math.log(size)) / c["c"]
    grad = {"a": -1 / c["c"], "b": -math.log(size) / c["c"], "c": -log_s / c["c"]}
    g = np.array([grad[t] for t in fit["terms"]])
    se = float(np.sqrt(g @ fit["cov"] @ g))
    return math.exp(log_s), math.exp(log_s - se), math.exp(log_s + se)


def fit_lines(fit, points):
    names = {"a": "a", "b": "b ln N", "c": "c ln S"}
    spread = (", ".join(f"{t} = {fit['coef'][t]:+.4f} ± {fit['se'][t]:.4f}" for t in fit["terms"])
              + f"; residual sd {fit['sigma']:.4f} ({fit['dof']} degrees of freedom)")
    out = [f"fit over {len(points)} points, TST {points[0]['tst']}: gap = " + " + ".join(names[t] for t in fit["terms"])
           + " (N: the blocks' parameters, 12 x layers x width^2; S: steps); " + spread]
    for testbed, size in dict.fromkeys((p["testbed"], p["size"]) for p in points):
        crossing = zero_crossing_steps(fit, size)
        where = "no crossing (the fitted gap does not shrink with the budget)" if crossing is None else \
            f"crosses zero at {crossing[0]:,.0f} steps (one standard error: {crossing[1]:,.0f} to {crossing[2]:,.0f})"
        out.append(f"{testbed} (N = {size / 1e6:.2f}M): {where}")
    for label, size, steps, gap in PUBLIC_POINTS:
        if size is not None and "b" in fit["terms"] and "c" in fit["terms"]:
            value, se = fitted_gap(fit, size, steps)
            out.append(f"extrapolated to {label} (N = {size / 1e6:.2f}M, {steps:,} steps): {value:+.3f} ± {se:.3f}, measured there {gap:+.3f}")
    return out


def crossover_rows(points):
    digits = dict(base_val=4, tst_val=4, gap=4, step_speedup=3, speedup=3)
    return [dict(p, **{k: fmt(p[k], n) for k, n in digits.items()},
                 p_ahead="n/a" if math.isnan(p["p_ahead"]) else f"{p['p_ahead']:.4f}") for p in points]


def markdown_table(rows, columns=COLUMNS):
    cols = [(k, title) for k, title in columns if any(k in r for r in rows)]
    out = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |" for r in rows]
    return "\n".join(out)


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib")
    return plt


def plot(runs, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    configs = list(dict.fromkeys(config_key(r) for r in runs))  # one colour per configuration, seeds alike
    for run in runs:
        color = f"C{configs.index(config_key(run)) % 10}"
        steps, losses, ms, tokens = zip(*run["vals"])
        for ax, x in zip(axes, (np.array(ms) / 1000, steps, tokens)):
            ax.plot(x[1:], losses[1:], color=color, label=run["name"] if ax is axes[0] else None)
        for switch in run["switches"]:  # the phase switch, on the steps axis
            axes[1].axvline(switch, color=color, linestyle=":", alpha=0.6)
    for ax, label in zip(axes, ("training time (s)", "step", "tokens consumed")):
        ax.set_xlabel(label)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("val loss (dotted: phase switches)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_crossover(points, path, fits=None):
    """Speedup at iso-loss (steps) and the paired val-loss gap against the step budget: a line per testbed and TST
    configuration, seed means with one standard deviation as bars; with a fit, its line per testbed (dashed, out to
    the public points' budgets) and the public points on the gap panel."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 7))
    lines = list(dict.fromkeys((p["testbed"], p["tst"]) for p in points))
    for i, line in enumerate(lines):
        curve = [p for p in points if (p["testbed"], p["tst"]) == line]
        steps = [p["steps"] for p in curve]
        for ax, key in zip(axes, ("step_speedup", "gap")):
            values = [[v for v in p[key] if not math.isnan(v)] for p in curve]
            spread = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(steps, [np.mean(v) if v else math.nan for v in values], yerr=spread, color=f"C{i % 10}",
                        marker="o", capsize=3, label=f"{line[0]}, TST {line[1]}")
    budgets = sorted({p["steps"] for p in points})
    if fits:
        budgets = sorted(set(budgets) | {steps for _, _, steps, _ in PUBLIC_POINTS})
        span = np.geomspace(budgets[0], budgets[-1], 50)
        for i, line in enumerate(lines):
            if line[1] not in fits:
                continue
            size = next(p["size"] for p in points if (p["testbed"], p["tst"]) == line)
            axes[1].plot(span, [fitted_gap(fits[line[1]], size, s)[0] for s in span], color=f"C{i % 10}", linestyle="--",
                         alpha=0.7, label=f"fit, {line[0]}, TST {line[1]}")
        for j, (label, _, steps, gap) in enumerate(PUBLIC_POINTS):
            axes[1].plot(steps, gap, marker="*", markersize=12, linestyle="none", color=f"C{(j + 6) % 10}", label=label)
        axes[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    for ax, label, even in zip(axes, ("speedup at iso-loss (steps)", "final val loss, TST - baseline"), (1, 0)):
        ax.axhline(even, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("step budget")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below: the points fill the axes
    fig.suptitle("TST against its baseline by budget (above 1 / below 0: TST ahead)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def log_paths(items):
    """Files as given, folders as the *.txt in them, each path once."""
    paths = []
    for item in items:
        paths += sorted(glob.glob(os.path.join(item, "*.txt"))) if os.path.isdir(item) else [item]
    return list({os.path.realpath(p): p for p in paths}.values())  # a log named twice (or by two paths) is read once


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="record logs, or folders of them")
    p.add_argument("--baseline", default=None, help="log whose configuration is the baseline (default: the first)")
    p.add_argument("--target", type=float, default=None, help="target val loss: time to it, and p-value of a record claim")
    p.add_argument("--plot", default=None, help="write val loss curves (with --crossover: the map) to this PNG")
    p.add_argument("--crossover", action="store_true",
                   help="pair each TST run with the baseline of its seed and budget: a row per testbed, TST setting and budget")
    p.add_argument("--fit", action="store_true", help="with --crossover: fit the gap in log size and log budget, and where it crosses zero")
    p.add_argument("--include_unfinished", action="store_true", help="also pool runs whose log has no 'done:' line")
    p.add_argument("--reference", default=None, nargs="+",
                   help="modded-nanogpt track-3 record logs, or folders of them (e.g. result #36's ten): our baseline runs'"
                        " val loss against their mean and spread at each of their validation steps")
    p.add_argument("--noise", type=float, default=TRACK3_NOISE,
                   help="run-to-run standard deviation of one reference run, where its log has fewer than 3 trials")
    args = p.parse_args(argv)
    if args.plot:
        pyplot()  # says what to install before any table is printed
    try:
        runs = [parse_log(path) for path in log_paths(args.logs)]
        baseline = parse_log(args.baseline) if args.baseline else runs[0]
        trials = [t for path in log_paths(args.reference or []) for t in parse_reference(path)]
    except (NotARecord, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unfinished = [r["name"] for r in runs if not r["ending"].startswith("done")]
    if unfinished and not args.include_unfinished:
        print(f"left out, not finished: {', '.join(unfinished)} (--include_unfinished keeps them)", file=sys.stderr)
        runs = [r for r in runs if r["ending"].startswith("done")]
    runs = [r for r in runs if r["vals"]]  # started, not yet validated: nothing to show
    if not runs:
        print("error: no finished record logs given", file=sys.stderr)
        return 2
    if trials:
        rows = reference_check(runs, trials, args.noise)
        if not rows:
            print("error: no baseline run of the reference's length shares a validation step with it", file=sys.stderr)
            return 2
        print(markdown_table(rows, REFERENCE_COLUMNS))
        print(f"{sum(r['within'] == 'yes' for r in rows)} of {len(rows)} validation steps: our mean within 3σ of the reference's")
        print(reference_target_line(runs, trials, REFERENCE_TARGET if args.target is None else args.target))
        return 0
    if args.crossover:
        points = crossover(runs)
        if not points:
            print("error: no TST run has a baseline run of the same testbed, budget and seed", file=sys.stderr)
            return 2
        print(markdown_table(crossover_rows(points), CROSSOVER_COLUMNS))
        fits = {}
        if args.fit:  # one fit per TST setting: a plane through s = 4 and s = 8 points at once would describe neither
            for tst in dict.fromkeys(p["tst"] for p in points):
                group = [p for p in points if p["tst"] == tst]
                fit = fit_gap(group)
                if fit is None:
                    print(f"no fit for TST {tst}: {len(group)} point(s), no more than the plane's terms")
                    continue
                fits[tst] = fit
                print("\n".join(fit_lines(fit, group)))
        if args.plot:
            plot_crossover(points, args.plot, fits)
            print(f"plot: {args.plot}")
        return 0
    if args.baseline and config_key(baseline) not in {config_key(r) for r in runs}:
        runs.insert(0, baseline)
    print(markdown_table(compare(runs, config_key(baseline), args.target)))
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
