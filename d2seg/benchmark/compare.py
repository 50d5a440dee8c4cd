"""Compare two benchmark JSONs (``tools/benchmark.py --compare OLD.json``): did a change make
d2seg slower, against the references or in absolute terms?

Two kinds of numbers are compared:

* **Ratios from one run** (d2seg against each reference, the train_net loop against the step
  alone, the issue's targets). Both sides of a ratio were measured in the same process,
  interleaved, so a ratio can be compared between runs on different days, loads and even
  machines of the same kind.
* **Absolute numbers** (img/s, latency, peak memory, host syncs per step) only when both runs
  name the same machine (``machine.summary``: CPU or GPU model, torch threads, torch build).

Either kind is compared only when the runs measured the same experiment: the same device type,
precision, batch, input size, torch threads, warm-up steps and config overrides
(:data:`SAME_EXPERIMENT`).
Otherwise the rows are listed as "settings differ" and never count as regressions.

A row is a *regression* when it got worse by more than ``tolerance`` (relative) and by more
than the spread of the repeated measurements behind it in either run (:func:`_spread`: the
train step's rounds, the latency calls); for host syncs when their count rose at all; for a
target when it went from pass to FAIL or to "not measured" (what it needs failed or is gone).
A reference's own absolute numbers are the yardstick, not d2seg: their changes are shown ("reference moved") and never counted (a slower or faster
yardstick shows in the ratios). Where references measured the same thing in the run, d2seg's
own img/s and latency count only if its ratio to them moved too ("ratio held" otherwise: the
machine, not d2seg, changed). A reference's inference numbers are compared only when both runs
gave it the same weights (its own, or d2seg's: see ``harness._inference_weights``). The CPU's
peak memory is a sampled approximation (it measured 194 and 293 MB for the same Mask R-CNN
step on two days), so its changes (and those of the d2seg / reference memory ratio on a CPU)
are shown, not counted.
"""
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .harness import Settings, _median

__all__ = ["SAME_EXPERIMENT", "compare_results", "format_comparison"]

#: settings that must agree for two runs' numbers to measure the same thing (the trailing
#: ``opts`` are compared per case, with the case's own options: see :func:`_effective_opts`)
SAME_EXPERIMENT = ("precision", "batch", "size", "threads", "ref_backend",
                   "instances_per_image", "statistic",
                   # warm-up steps: with torch.compile / CUDA graphs, too few put compiling
                   # or graph recording inside the timed rounds
                   "warmup")
#: settings that only the inference rows (``INFERENCE``) or the loop row (``LOOP``) depend on
INFERENCE_SETTINGS = ("infer_batch",)
LOOP_SETTINGS = ("loop_iters", "loop_warmup")

# (metric name, key in a case's ratios{ref: {...}}, which way is better)
_RATIOS = (("train step speed-up", "train_step_speedup", "higher"),
           ("inference throughput speed-up", "inference_throughput_speedup", "higher"),
           ("latency speed-up", "latency_speedup", "higher"),
           ("train memory ratio", "train_memory_ratio", "lower"))


def _device_type(settings: Dict) -> str:
    return str(settings.get("device", "")).split(":")[0]


def _setting_differences(old: Dict, new: Dict, keys: Sequence[str] = SAME_EXPERIMENT
                         ) -> Dict[str, Tuple[object, object]]:
    so, sn = old.get("settings", {}), new.get("settings", {})
    # a JSON written before a setting existed ran with its default
    defaults = dataclasses.asdict(Settings())
    diff = {}
    if keys is SAME_EXPERIMENT and _device_type(so) != _device_type(sn):
        diff["device"] = (so.get("device"), sn.get("device"))
    for key in keys:
        a, b = so.get(key, defaults.get(key)), sn.get(key, defaults.get(key))
        if key == "infer_batch":  # 0 = the train batch
            a = a or so.get("batch", defaults["batch"])
            b = b or sn.get("batch", defaults["batch"])
        if isinstance(a, tuple):
            a = list(a)
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            diff[key] = (a, b)
    return diff


def _effective_opts(result: Dict, case: Dict) -> List[str]:
    """The config options a case ran with: the case's own (a preset's) + the run's trailing
    ``KEY VALUE`` pairs, so that a ``--config-file`` run given a preset case's options as
    trailing pairs compares with that case."""
    return [str(x) for x in list(case.get("case_opts") or []) +
            list((result.get("settings") or {}).get("opts") or [])]


def _match_case(old: Dict, new: Dict, case: Dict) -> Optional[Dict]:
    """The case of ``old`` that ran what ``case`` (of ``new``) ran: the same config with the
    same effective options, preferring the same name."""
    if "error" in case and "case_opts" not in case:  # a failed case of an older JSON
        return next((c for c in old.get("cases", []) if c.get("name") == case.get("name")
                     and c.get("config") == case.get("config")), None)
    key = (case.get("config"), _effective_opts(new, case))
    same = [c for c in old.get("cases", [])
            if (c.get("config"), _effective_opts(old, c)) == key]
    for c in same:
        if c.get("name") == case.get("name"):
            return c
    return same[0] if same else None


def _subjects(case: Dict) -> Iterator[Tuple[str, Dict]]:
    if "d2seg" in case:
        yield "d2seg", case["d2seg"]
    for r in case.get("references", []):
        yield r["name"], r


def _spread(xs: Optional[Sequence[float]]) -> Optional[float]:
    """How far the median of repeated measurements of one number lies from the best one,
    relative (the harness reports either); None below two measurements. The full range
    would let one round slowed by another process on a shared machine hide any change."""
    xs = [float(x) for x in (xs or []) if isinstance(x, (int, float)) and x > 0]
    return _median(xs) / min(xs) - 1.0 if len(xs) >= 2 else None


def _add(*spreads: Optional[float]) -> Optional[float]:
    known = [x for x in spreads if x is not None]
    return sum(known) if known else None


def _rounds(sub: Dict) -> List[float]:
    return list((sub.get("train_step") or {}).get("round_seconds") or [])


def _latencies(sub: Dict) -> List[float]:
    return list((sub.get("inference") or {}).get("latency_ms_all") or [])


def _per_call(sub: Dict) -> List[float]:
    """Seconds per inference call of each timed throughput block (since session 19)."""
    blocks = (sub.get("inference") or {}).get("throughput_blocks") or []
    return [b["seconds"] / b["calls"] for b in blocks if b.get("calls")]


def _ratio_noise(key: str, ratio: Dict, d2: Dict, ref: Dict) -> Optional[float]:
    """The spread of one within-run ratio: for the train step, between its value from the
    median rounds and from the best rounds (both in the JSON); for the latency and the
    inference throughput (its two timed blocks), the two subjects' spreads added."""
    if key == "train_step_speedup":
        a, b = ratio.get("train_step_speedup_median"), ratio.get("train_step_speedup_best")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0:
            return abs(a / b - 1.0)
        return None
    if key == "latency_speedup":
        return _add(_spread(_latencies(d2)), _spread(_latencies(ref)))
    if key == "inference_throughput_speedup":
        return _add(_spread(_per_call(d2)), _spread(_per_call(ref)))
    return None


_INFERENCE_RATIOS = ("inference_throughput_speedup", "latency_speedup")
# d2seg's absolute time -> the within-run ratio that measures the same thing against the
# references (when that ratio held, the absolute change was the machine's)
_RATIO_OF = {"train img/s": "train step speed-up", "latency b1 ms": "latency speed-up",
             "infer img/s": "inference throughput speed-up"}
_INFERENCE_ABSOLUTE = ("latency b1 ms", "infer img/s")


def _weights(sub: Dict) -> str:
    """Whose weights the subject's inference ran with: "own" (every JSON before session 20)
    or "d2seg's" (a reference with d2seg's layout, since session 20). A detector's inference
    time depends on its detections, so numbers measured the two ways are not compared."""
    return str((sub.get("inference") or {}).get("weights", "own"))


def _cpu_memory(sub: Dict) -> bool:
    """Whether the subject's peak memory is the sampled CPU resident-set size (approximate),
    not CUDA's allocator statistics (exact)."""
    mem = sub.get("train_memory") or {}
    return "peak_allocated_delta_mb" not in mem and "peak_rss_delta_mb" in mem


def _absolute(sub: Dict) -> Iterator[Tuple[str, Optional[float], str, Optional[float], bool]]:
    """(metric, value, better, spread of its measurements, approximate) of one subject."""
    ts = sub.get("train_step") or {}
    yield "train img/s", ts.get("img_per_s"), "higher", _spread(_rounds(sub)), False
    inf = sub.get("inference") or {}
    yield "latency b1 ms", inf.get("latency_batch1_ms"), "lower", _spread(_latencies(sub)), \
        False
    yield "infer img/s", inf.get("throughput_img_per_s"), "higher", _spread(_per_call(sub)), \
        False
    mem = sub.get("train_memory") or {}
    yield "train peak MB", mem.get("peak_allocated_delta_mb", mem.get("peak_rss_delta_mb")), \
        "lower", None, _cpu_memory(sub)
    syncs = sub.get("host_syncs") or {}
    yield "host syncs/step", syncs.get("per_step"), "lower", None, False


def _status(metric: str, old: Optional[float], new: Optional[float], better: str,
            tolerance: float, noise: Optional[float] = None,
            approximate: bool = False) -> Tuple[Optional[float], str]:
    """(relative change new/old - 1, status) of one row. A change beyond ``tolerance`` is a
    regression / improvement unless the repeated measurements behind the numbers spread
    wider than the change ("within noise"), or the number is an approximation
    ("approximate")."""
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)) or old != old \
            or new != new:
        return None, "not measured"
    if metric == "host syncs/step":  # a count: any increase is a new synchronisation
        change = new / old - 1.0 if old else None
        return change, "regression" if new > old else ("improvement" if new < old else "ok")
    if old == 0:
        return None, "ok" if new == 0 else "not measured"
    change = new / old - 1.0
    worse = -change if better == "higher" else change
    if abs(worse) <= tolerance:
        return change, "ok"
    if approximate:
        return change, "approximate"
    if noise is not None and abs(worse) <= noise:
        return change, "within noise"
    return change, "regression" if worse > 0 else "improvement"


def _max(*xs: Optional[float]) -> Optional[float]:
    known = [x for x in xs if x is not None]
    return max(known) if known else None


def _run_info(result: Dict) -> Dict[str, object]:
    m = result.get("machine", {})
    return {"summary": m.get("summary"), "date": m.get("date"), "command": result.get("command")}


def compare_results(old: Dict, new: Dict, tolerance: float = 0.05) -> Dict[str, object]:
    """Compare two results of :func:`d2seg.benchmark.harness.run_benchmark`.

    Args:
        old, new: the two JSON objects (``old`` the baseline).
        tolerance: relative change beyond which a row counts as a regression or an
            improvement (0.05 = 5 %).

    Returns:
        ``{"old", "new": {summary, date, command}, "same_machine", "unmatched_cases" (names
        of this run's cases with nothing to compare), "settings_differ":
        {key: [old, new]}, "tolerance", "rows": [{case, subject, metric, kind ("ratio",
        "absolute", "target" or "case": whether a case or reference ran, or what its config
        and options were), old, new, change (new / old - 1), better ("higher" or
        "lower"), noise (the wider relative spread of the repeated measurements behind the
        number in either run, None where it was measured once), status}], "regressions": n,
        "improvements": n}``. ``status`` is "ok", "regression", "improvement", "within
        noise", "approximate" (the CPU's sampled peak memory), "not measured", "settings
        differ", "other machine", "method changed" (a reference's inference ran on its own
        weights in one run and on d2seg's in the other) or "reference moved" (a reference's
        own number changed beyond tolerance and noise: the machine or torch, not d2seg) or
        "ratio held" (d2seg's img/s or latency changed, but its ratio to every reference
        measuring the same thing in the run did not: the machine moved) or "missing
        reference" (it ran in the baseline, not now: counted in ``missing_references``) or
        "not run" (a baseline case this run, of another preset, did not run); only
        "regression" and "improvement" are counted. A case that ran in the baseline and
        fails now, or is missing from a run of the same preset, is a regression. Cases are matched by config and effective
        options (the case's own + the trailing ``KEY VALUE`` pairs), preferring the same
        name (a namesake with the same config and other options, e.g. a switch's A/B, is
        shown side by side as "settings differ"); ``infer_batch`` differences block the
        inference rows only, ``loop_iters`` /
        ``loop_warmup`` differences the loop row only.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance {tolerance}: must be >= 0")
    m_old, m_new = old.get("machine", {}), new.get("machine", {})
    same_machine = bool(m_old.get("summary")) and m_old.get("summary") == m_new.get("summary")
    differ = _setting_differences(old, new)
    rows: List[Dict[str, object]] = []

    def add(case, subject, metric, kind, a, b, better, blocked="", noise=None,
            approximate=False, yardstick=False):
        if not isinstance(a, (int, float)) and not isinstance(b, (int, float)):
            return None  # measured in neither run (e.g. --no-inference)
        change, status = _status(metric, a, b, better, tolerance, noise, approximate)
        if blocked and status != "not measured":
            status = blocked
        elif yardstick and status in ("regression", "improvement"):
            status = "reference moved"
        row = {"case": case, "subject": subject, "metric": metric, "kind": kind, "old": a,
               "new": b, "change": change, "better": better, "noise": noise, "status": status}
        rows.append(row)
        return row

    blocked_all = "settings differ" if differ else ""
    blocked_inf = "settings differ" if _setting_differences(old, new, INFERENCE_SETTINGS) \
        else ""
    blocked_loop = "settings differ" if _setting_differences(old, new, LOOP_SETTINGS) else ""
    matched = set()
    for c in new.get("cases", []):
        o = _match_case(old, new, c)
        case_blocked = ""
        if o is None:
            namesake = next((x for x in old.get("cases", []) if x.get("name") == c["name"]),
                            None)
            if namesake is not None:  # same name, another config or other options
                rows.append({"case": c["name"], "subject": "d2seg", "metric": "config + options",
                             "kind": "case",
                             "old": " ".join([str(namesake.get("config"))]
                                             + _effective_opts(old, namesake)),
                             "new": " ".join([str(c.get("config"))] + _effective_opts(new, c)),
                             "change": None, "better": "higher", "noise": None,
                             "status": "settings differ"})
                if namesake.get("config") != c.get("config"):
                    continue
                # the same config with other options (an A/B of a switch): side by side,
                # nothing counted
                o, case_blocked = namesake, "settings differ"
            else:
                continue
        matched.add(id(o))
        if "error" in c or "error" in o:
            # a case that ran before and fails now is a regression; failing before is shown
            rows.append({"case": c["name"], "subject": "d2seg", "metric": "case ran",
                         "kind": "case", "old": "error" if "error" in o else "ok",
                         "new": "error" if "error" in c else "ok", "change": None,
                         "better": "higher", "noise": None,
                         "status": case_blocked or blocked_all or (
                             "regression" if "error" in c and "error" not in o
                             else ("improvement" if "error" in o and "error" not in c
                                   else "not measured"))})
            continue
        old_subs, new_subs = dict(_subjects(o)), dict(_subjects(c))
        blocked_case = blocked_all or case_blocked
        for ref in old_subs:
            if ref != "d2seg" and ref not in new_subs:
                why = str((c.get("skipped_references") or {}).get(ref, ""))
                rows.append({"case": c["name"], "subject": ref, "metric": "reference ran",
                             "kind": "case", "old": "ok", "new": why or "missing",
                             "change": None, "better": "higher", "noise": None,
                             "status": "missing reference"})
        for ref, r_new in (c.get("ratios") or {}).items():
            r_old = (o.get("ratios") or {}).get(ref)
            if r_old is None or ref not in old_subs or ref not in new_subs:
                continue
            for metric, key, better in _RATIOS:
                if key in r_new or key in r_old:
                    noise = _max(_ratio_noise(key, r_old, old_subs["d2seg"], old_subs[ref]),
                                 _ratio_noise(key, r_new, new_subs["d2seg"], new_subs[ref]))
                    approx = key == "train_memory_ratio" and _cpu_memory(new_subs["d2seg"])
                    blocked = blocked_case or (blocked_inf if key in _INFERENCE_RATIOS else "")
                    if not blocked and key in _INFERENCE_RATIOS and \
                            _weights(old_subs[ref]) != _weights(new_subs[ref]):
                        blocked = "method changed"
                    add(c["name"], f"vs {ref}", metric, "ratio", r_old.get(key),
                        r_new.get(key), better, blocked, noise, approx)
        lo, ln = o.get("loop") or {}, c.get("loop") or {}
        if "fraction_of_step" in lo or "fraction_of_step" in ln:
            add(c["name"], "d2seg", "loop / step", "ratio", lo.get("fraction_of_step"),
                ln.get("fraction_of_step"), "higher", blocked_case or blocked_loop)
        # the statuses of this case's ratio rows, by metric
        held: Dict[str, List[str]] = {}
        for r in rows:
            if r["case"] == c["name"] and r["kind"] == "ratio":
                held.setdefault(str(r["metric"]), []).append(str(r["status"]))
        for name, sub in new_subs.items():
            if name not in old_subs:
                continue
            before = {m: (v, sp) for m, v, _, sp, _ in _absolute(old_subs[name])}
            for metric, value, better, sp, approx in _absolute(sub):
                a, sp_old = before.get(metric, (None, None))
                blocked = blocked_case or ("" if same_machine else "other machine") or \
                    (blocked_inf if metric in _INFERENCE_ABSOLUTE else "")
                if not blocked and metric in _INFERENCE_ABSOLUTE and \
                        _weights(old_subs[name]) != _weights(sub):
                    blocked = "method changed"
                row = add(c["name"], name, metric, "absolute", a, value, better, blocked,
                          _max(sp_old, sp), approx, yardstick=name != "d2seg")
                ratio_rows = held.get(_RATIO_OF.get(metric, ""), [])
                if row is not None and name == "d2seg" \
                        and row["status"] in ("regression", "improvement") \
                        and ratio_rows and all(st in ("ok", "within noise")
                                               for st in ratio_rows):
                    row["status"] = "ratio held"
    old_targets = {t["name"]: t for t in old.get("targets", [])}
    for t in new.get("targets", []):
        ot = old_targets.get(t["name"])
        if ot is None:
            continue
        status = "ok"
        if ot.get("status") == "pass" and t.get("status") in ("FAIL", "not measured"):
            status = "regression"  # not measured any more: what it needs failed or is gone
        elif ot.get("status") == "FAIL" and t.get("status") == "pass":
            status = "improvement"
        elif t.get("status") == "not measured" or ot.get("status") == "not measured":
            status = "not measured"
        if differ and status != "not measured":
            status = "settings differ"
        a, b = ot.get("value"), t.get("value")
        change = b / a - 1.0 if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and a else None
        rows.append({"case": t.get("case", ""), "subject": t["name"], "metric":
                     f"target ({ot.get('status')} -> {t.get('status')})", "kind": "target",
                     "old": a, "new": b, "change": change,
                     "better": "lower" if t.get("kind") == "step_time_ratio" else "higher",
                     "noise": None, "status": status})
    # a case the baseline ran that this run of the same preset lacks: a regression (another
    # preset or a --config-file run is a subset by design: "not run", shown only)
    same_preset = bool(old.get("preset")) and old.get("preset") == new.get("preset")
    for o in old.get("cases", []):
        if id(o) not in matched and "error" not in o and \
                o.get("name") not in {c.get("name") for c in new.get("cases", [])}:
            status = "not run" if not same_preset else (
                "settings differ" if differ else "regression")
            rows.append({"case": o["name"], "subject": "d2seg", "metric": "case ran",
                         "kind": "case", "old": "ok", "new": "missing", "change": None,
                         "better": "higher", "noise": None, "status": status})
    unmatched = [c["name"] for c in new.get("cases", [])
                 if c["name"] not in {r["case"] for r in rows}]
    return {
        "old": _run_info(old), "new": _run_info(new), "same_machine": same_machine,
        "unmatched_cases": unmatched,
        "settings_differ": {k: list(v) for k, v in differ.items()},
        "tolerance": tolerance, "rows": rows,
        "regressions": sum(r["status"] == "regression" for r in rows),
        "improvements": sum(r["status"] == "improvement" for r in rows),
        "missing_references": sum(r["status"] == "missing reference" for r in rows),
    }


def _num(x) -> str:
    if isinstance(x, str):  # "ok" / "error" / "missing" of the "case ran" rows
        return x[:60]
    if not isinstance(x, (int, float)) or x != x:
        return "-"
    return f"{x:.4g}"


def format_comparison(cmp: Dict[str, object]) -> str:
    """Markdown: what was compared with what, then one row per number."""
    lines = [f"### Compared with {cmp['old']['summary']} ({cmp['old']['date']})", ""]
    if not cmp["same_machine"]:
        lines.append("Other machine: only the ratios measured within each run are compared.")
    if cmp["settings_differ"]:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in cmp["settings_differ"].items())
        lines.append(f"The settings differ ({what}): nothing is counted as a regression.")
    if cmp.get("unmatched_cases"):
        lines.append(f"Not in the old run (no case there ran the same config with the same "
                     f"options): {', '.join(cmp['unmatched_cases'])}.")
    if lines[-1]:
        lines.append("")
    lines += ["| case | subject | metric | old | new | change | noise | status |",
              "|---|---|---|---|---|---|---|---|"]
    for r in cmp["rows"]:
        ch = "-" if r["change"] is None else f"{100 * r['change']:+.1f}%"
        noise = "-" if r.get("noise") is None else f"{100 * r['noise']:.1f}%"
        st = f"**{r['status']}**" if r["status"] == "regression" else r["status"]
        lines.append(f"| {r['case']} | {r['subject']} | {r['metric']} | {_num(r['old'])} | "
                     f"{_num(r['new'])} | {ch} | {noise} | {st} |")
    lines += ["", f"{cmp['regressions']} regression(s), {cmp['improvements']} improvement(s) "
                  f"beyond {100 * cmp['tolerance']:.0f}%"]
    return "\n".join(lines)
