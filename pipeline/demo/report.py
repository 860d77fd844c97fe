"""The demo's `report.html`: the three arms first (AP by arm on the whole test split and on its
base and tail kinds, as a bar chart), then the pseudo-labels' precision-recall curves per
preset against the web split's hidden gold, then the tables, throughput and the gallery.
Charts are matplotlib PNGs embedded as data URIs, so the page is one self-contained file
(plus the gallery folder beside it). The page, its tables and its charts are the pieces of
`pipeline report` (`pipeline.report.page`, `pipeline.report.figures`); the arms' loss curves
are that report's training curves, one line per arm.
"""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np

from pipeline.demo.world import TAIL_KINDS
from pipeline.report import figures
from pipeline.report.page import document, image, key_value_rows

ARMS = ("teacher", "student", "control")
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
AP_SUMMARY = ("AP", "AP50", "AP_base", "AP_tail")  # per arm and round in the rounds table
DEMO_GENERATOR = "glip-data-engine demo"  # not `pipeline report`'s: it never overwrites this page
PR_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


def pr_curve(gold, predictions: Sequence[dict], thresholds: Sequence[float] = PR_THRESHOLDS) -> list[dict]:
    """Class-agnostic precision and recall at IoU 0.5 of `predictions` kept above each score
    threshold (what a filter at that threshold would give), against pycocotools `gold`."""
    from pipeline.evaluation.evaluate import class_agnostic_gold, precision_recall_at

    agnostic = class_agnostic_gold(gold)
    points = []
    for threshold in thresholds:
        kept = [{**p, "category_id": 1} for p in predictions if p["score"] >= threshold]
        precision, recall = precision_recall_at(agnostic, kept, class_agnostic=True)
        points.append({"threshold": float(threshold), "precision": round(precision, 4), "recall": round(recall, 4), "boxes": len(kept)})
    return points


def ap_chart(models: dict[str, dict]) -> str:
    """Grouped bars: AP of each arm on the whole test split, its base and its tail kinds."""
    groups = (("whole", "AP"), ("base kinds", "AP_base"), ("tail kinds", "AP_tail"))
    arms = [a for a in ARMS if a in models]
    with figures.axes(6.4, 3.4) as axes:
        width = 0.8 / len(arms)
        for index, arm in enumerate(arms):
            values = [100 * max(models[arm].get(key, 0.0), 0.0) for _, key in groups]
            bars = axes.bar(np.arange(len(groups)) + (index - (len(arms) - 1) / 2) * width, values, width, label=arm)
            axes.bar_label(bars, fmt="%.1f", fontsize=8)
        axes.set_xticks(np.arange(len(groups)), [name for name, _ in groups])
        axes.set_ylabel("AP (test split)")
        axes.legend(frameon=False)
        return figures.png(axes)


def loss_chart(arm_folders: dict[str, str]) -> str:
    """The total loss of each arm's training run over its steps (`pipeline report`'s reader:
    the arm's TensorBoard events, or its metrics.jsonl)."""
    from pipeline.report.training import read_scalars

    series = {}
    for arm, folder in arm_folders.items():
        points = read_scalars(folder)[0].get("loss/total", [])
        series[arm] = ([step for step, _ in points], [value for _, value in points])
    return figures.lines(series, xlabel="step (each arm's own run)", ylabel="total loss", width=5.2)


def pr_chart(curves: dict[str, list[dict]], chosen: dict[str, dict], calibration: dict | None = None) -> str:
    """Precision against recall of each preset's teacher boxes over score thresholds; a marker
    for what each preset actually kept; and, when given, the calibrated policy: its precision
    target, the interval its sample gave and what it reached on the rest of the web split."""
    with figures.axes(5.2, 3.8) as axes:
        for name, points in curves.items():
            line = axes.plot([p["recall"] for p in points], [p["precision"] for p in points], marker=".", label=f"{name} (score sweep)")
            if name in chosen:
                axes.scatter([chosen[name]["recall50"]], [chosen[name]["precision50"]], s=80, marker="*", color=line[0].get_color(),
                             zorder=3, label=f"{name} as filtered")
        if calibration and "calibrated_on_rest" in calibration:
            rest, (low, high) = calibration["calibrated_on_rest"], calibration["sample"]["precision_interval"]
            axes.axhline(calibration["settings"]["target_precision"], color="grey", linewidth=0.8, linestyle=":", label="calibration target")
            axes.errorbar([rest["recall50"]], [rest["precision50"]], yerr=[[max(rest["precision50"] - low, 0)], [max(high - rest["precision50"], 0)]],
                          fmt="D", color="black", capsize=3, zorder=4, label="calibrated, on the rest (sample's interval)")
        axes.set_xlabel("recall (IoU 0.5)")
        axes.set_ylabel("precision")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.legend(frameon=False, fontsize=8)
        return figures.png(axes)


def _pct(value: float) -> str:
    return "n/a" if value < 0 else f"{100 * value:.1f}"


def _headline(gaps: dict) -> str:
    teacher = f"student - teacher: <b>{gaps['student_minus_teacher']:+.1f} AP</b>"
    if gaps["student_minus_control"] is None:  # run with --no-control
        return teacher[0].upper() + teacher[1:] + "."
    return (f"Student - control: <b>{gaps['student_minus_control']:+.1f} AP</b>; {teacher} "
            f"(tail kinds: student - control {gaps['tail_student_minus_control']:+.1f} AP).")


def _decontamination_html(clean: dict) -> str:
    kinds = ", ".join(f"{kind} {v['found']}/{v['injected']}" for kind, v in clean["by_kind"].items() if v["injected"])
    missed = ", ".join(f"{m['key']} ({m['kind']} of {m['test_image']})" for m in clean["missed"]) or "none"
    false = ", ".join(f"{m['web_key']} (like {m['eval_image']}, {m['distances'][0]}/{m['distances'][1]} bits)" for m in clean["false_match_list"])
    return (
        "<h2>Decontamination: test images in the web split</h2>"
        f"<p>The web split hides <b>{clean['injected']}</b> copies of test images (resized, recompressed, 10%-cropped, mirrored). "
        f"<code>pipeline decontaminate</code> (pHash + dHash, at most {clean['max_distance']} bits apart on both) against the "
        f"{clean['eval_images'] or 'test'} test images found <b>{clean['found']}</b> of them before pseudo-labelling ({html.escape(kinds)}) "
        f"and dropped <b>{clean['false_matches']}</b> other web images by mistake"
        f"{' (' + html.escape(false) + ')' if false else ''}; {clean['kept']} of {clean['web_samples']} web samples went on. "
        f"Copies left in (pseudo-labelled with the rest): {html.escape(missed)}. The world's flat images are the hashes' weak "
        "case: see the README for the distance chosen.</p>"
    )


def _calibration_html(calibration: dict, presets: dict) -> str:
    settings = calibration["settings"]
    head = (f"<h2>Calibrated filter: <code>pipeline calibrate</code> on {100 * settings['fraction']:.0f}% of the web gold</h2>"
            f"<p>Target: precision <b>{settings['target_precision']}</b> (box scope, class-agnostic, IoU 0.5), the sample to "
            f"support +-{settings['margin']}. ")
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{r['boxes']}</td><td>{_pct(r['precision50'])}</td><td>{_pct(r['recall50'])}</td></tr>"
        for name, r in calibration["rest"].items()
    )
    if "refused" in calibration:
        return head + f"Calibration <b>refused</b>: {html.escape(calibration['refused'])}</p>" + (
            "<p>The presets on the same held-out images:</p><table><tr><th>preset</th><th>boxes</th><th>precision</th>"
            f"<th>recall</th></tr>{rows}</table>")
    sample, rest, policy = calibration["sample"], calibration["calibrated_on_rest"], calibration["policy"]
    nms = "none" if policy["nms_iou"] is None else f"{policy['nms_scope']}:{policy['nms_iou']}"
    low, high = sample["precision_interval"]
    verdict = "inside" if calibration["inside_interval"] else "<b>outside</b>"
    return head + (
        f"Chosen on {sample['images']} images: min_score {policy['min_score']}, NMS {nms}; precision there "
        f"{_pct(sample['precision'])} (95% bootstrap interval {_pct(low)}-{_pct(high)}), recall {_pct(sample['recall'])}. "
        f"On the other {rest['gold_images']} web images: precision <b>{_pct(rest['precision50'])}</b>, {verdict} the interval, "
        f"recall {_pct(rest['recall50'])}.</p>"
        "<table><tr><th>policy (on the held-out images)</th><th>boxes</th><th>precision</th><th>recall</th></tr>"
        f"<tr><th>calibrated</th><td>{rest['boxes']}</td><td>{_pct(rest['precision50'])}</td><td>{_pct(rest['recall50'])}</td></tr>"
        f"{rows}</table><p>(The student trains on its preset's pseudo-labels; `--preset calibrated` trains it on this policy's.)</p>"
    )


def _mix_words(mix: dict) -> str:
    """How the student's batches were composed, in words."""
    if mix.get("pseudo_per_step"):
        return (f"each step: the control's {mix['gold_per_step']} gold images per worker, the same ones, plus "
                f"{mix['pseudo_per_step']} pseudo-labelled images")
    return f"mixing weights {html.escape(str(mix['weights']))}"


def _names_html(names: dict, preset: str) -> str:
    """The student's pseudo-labels per kind: is the name right (`evaluation.label_names`)."""
    if not names:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(kind)}</th><td>{'tail' if kind in TAIL_KINDS else 'base'}</td><td>{n['labels']}</td>"
        f"<td>{_pct(n['precision']) if n['precision'] is not None else '-'}</td><td>{n['gold']}</td>"
        f"<td>{_pct(n['recall']) if n['recall'] is not None else '-'}</td></tr>"
        for kind, n in names.items()
    )
    return (
        f"<h2>The student's pseudo-labels ({html.escape(preset)}) by kind: is the name right?</h2>"
        "<p>A label names a kind when its phrase holds the kind's word (\"two blue rings\" names ring); it is right when it lies "
        "on a hidden gold box of that kind (IoU 0.5). The gold never names a tail kind: every right tail label was found "
        "through the rest of its caption (colours, counts, the phrase the base objects leave).</p>"
        "<table><tr><th>kind</th><th>part</th><th>labels naming it</th><th>name precision</th><th>gold objects (web)</th>"
        f"<th>named right (recall)</th></tr>{rows}</table>"
    )


def _rounds_html(rounds: list[dict], preset: str) -> str:
    rows = ""
    for entry in rounds:
        models = entry["models"]
        for name in ARMS:
            if name not in models:
                continue
            m = models[name]
            rows += f"<tr><th>{entry['round']}</th><th>{name}</th>" + "".join(f"<td>{_pct(m[k])}</td>" for k in AP_SUMMARY)
            if name == "teacher":
                labels = entry["pseudo_labels"].get(preset) or entry["calibration"].get("calibrated_on_rest") or {"precision50": -1, "recall50": -1}
                calibrated = entry["calibration"].get("calibrated_on_rest")
                rows += (f"<td>{_pct(labels['precision50'])} / {_pct(labels['recall50'])}</td>"
                         f"<td>{_pct(calibrated['precision50']) + ' / ' + _pct(calibrated['recall50']) if calibrated else 'refused'}</td>")
            else:
                rows += "<td></td><td></td>"
            rows += "</tr>"
    return (
        "<h2>Rounds: each round's student is the next round's teacher</h2>"
        f"<table><tr><th>round</th><th>model</th>{''.join(f'<th>{k}</th>' for k in AP_SUMMARY)}"
        f"<th>its pseudo-labels ({html.escape(preset)}): precision / recall</th><th>calibrated, on the rest</th></tr>{rows}</table>"
        "<p>Round k's student and control start from round k's teacher, with the same steps, augmentation and gold; "
        "round k (k &gt; 1) is in <code>round_k/</code>.</p>"
    )


def render_html(report: dict) -> str:
    models = report["models"]
    keys = (*AP_KEYS, "AP_base", "AP_tail")
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{_pct(m.get(k, -1.0))}</td>" for k in keys) + "</tr>"
        for name, m in models.items()
    )
    presets = "".join(
        f"<tr><th>{html.escape(name)}{' (student)' if name == report['preset'] else ''}</th><td>{p['images']}</td><td>{p['boxes']}</td>"
        f"<td>{_pct(p['precision50'])}</td><td>{_pct(p['recall50'])}</td><td>{_pct(p['AP50'])}</td></tr>"
        for name, p in report["pseudo_labels"].items()
    )
    world = report["world_description"]
    gaps = report["gaps"]
    no_pseudo = ""
    if not report.get("student_pseudo_images", 1):
        no_pseudo = (f"<p><b>The {html.escape(report['preset'])} preset kept no pseudo-label</b> (every teacher score is under "
                     "its threshold): the student trained on gold only, like the control.</p>")
    mix = report["student_mix"]
    recipe = html.escape(", ".join(f"{k} {v}" for k, v in report["student_recipe"].items()))
    return document("GLIP data engine demo", generator=DEMO_GENERATOR, body=f"""<h1>GLIP self-training demo</h1>
<p class="big">{_headline(gaps)}</p>
<p>World <b>{html.escape(report['size'])}</b>, seed {report['seed']}, student preset <b>{html.escape(report['preset'])}</b>,
total {report['total_seconds']} s. Every number below comes from pycocotools on this run's outputs.</p>
<div class="charts"><img alt="AP by arm" src="{report['charts']['ap']}"><img alt="pseudo-label precision-recall" src="{report['charts']['pr']}">{image(report['charts'].get('loss', ''), 'loss by arm')}</div>
<h2>The three arms (test split: zero-shot detection, every kind's name in the prompt)</h2>
<table><tr><th>model</th>{''.join(f'<th>{k}</th>' for k in keys)}</tr>{rows}</table>
<p><b>teacher</b>: trained on the gold split only; <b>student</b>: the teacher's weights + {report['schedule']['student_steps']} steps on
gold + the teacher's pseudo-labels of the web split; <b>control</b>: the teacher's weights + the same steps, the same
augmentation and the same gold, without the pseudo-labels. Student recipe: {recipe}. Student samples:
{mix['pseudo_fraction'] * 100:.0f}% pseudo-labelled web images, {(1 - mix['pseudo_fraction']) * 100:.0f}% gold
({_mix_words(mix)}).</p>{no_pseudo}
<h2>What the world's gold lacks</h2><p>{html.escape(world)}</p>
<h2>Pseudo-labels vs the web split's hidden gold (class-agnostic, IoU 0.5)</h2>
<table><tr><th>preset</th><th>images</th><th>boxes</th><th>precision</th><th>recall</th><th>AP50</th></tr>{presets}</table>
{_names_html(report.get('pseudo_label_names', {}), report['preset'])}
{_decontamination_html(report['decontamination'])}
{_calibration_html(report['calibration'], report['pseudo_labels'])}
{_rounds_html(report['rounds'], report['preset'])}
<h2>Throughput</h2><table>{key_value_rows(report['throughput'].items())}</table>
<h2>Stage times (s)</h2><table>{key_value_rows(report['stage_seconds'].items())}</table>
<h2>Pseudo-labelled images</h2><p><a href="gallery/index.html">gallery/index.html</a></p>
<iframe src="gallery/index.html"></iframe>
<p>Every stage's counts, throughput, labels and curves: <code>pipeline report</code> on this folder (<code>--out</code> a file
of its own: this page is the demo's), and <code>tensorboard --logdir</code> on it compares the arms' training curves.</p>""")
