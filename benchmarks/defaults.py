"""How dynarank's default learning rates are chosen, and how they do on data they were not chosen on.

Every task of the quality study (quality.py: tweets-2, tweets-3 and topics on MiniLM; dialogs, sentiment-lm and
the Italian dialogs on SmolLM2) has, per method, a learning-rate grid at its middle budget, seed 0, scored on its
validation split (quality.py's tuning runs). A rate's score on a task is relative to the best rate of that task's grid
(accuracy / best accuracy; best loss / loss; a diverged run scores 0), so tasks with different metrics count
alike.

Defaults are per kind of task (dynarank.defaults: 'classify', 'causal-lm'), because the grids differ between
the kinds. Leave one task out: for each task, the rate with the best mean score over the OTHER tasks of its kind
is the rate the method would ship without having seen that task (a task alone of its kind gets the choice over
all other tasks, and the check says so). It is then run there (3 seeds, test split, the middle budget) against
stock LoRA and stock AdaLoRA at THEIR best rate on that task's validation split (3 seeds; LoRA's grid is
1e-3 / 3e-3 / 1e-2 / 3e-2), at equal final adapter parameters, paired by seed. The shipped default of a kind
(dynarank.defaults.DEFAULT_LR[kind]) is the rate best over that kind's tasks; ties go to the lower rate;
tests/test_defaults.py holds the two in agreement.

    python benchmarks/defaults.py                # choices from the grids on record, table (no training)
    python benchmarks/defaults.py --validate     # also run the left-out checks still missing (hours)
    python benchmarks/defaults.py --validate --check smollm2   # only the checks of one task
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

from dynarank.defaults import nearest_budget  # noqa: E402
from records import RecordStore, run_pool  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STUDY_TASKS = ["minilm", "minilm-tweets3", "minilm-topics", "smollm2", "smollm2-sentiment", "smollm2-italian"]
CHOSEN = ["ard", "elalora", "adalora-physical"]  # dynarank's methods whose default rate the study sets
# Methods whose configuration is chosen too, not only the rate: quality.py's "ard" is ARD's uniform start (every
# head at r0, pinned: what its records ran), "ard-data-scaled" its data start (the library's rank_init='auto' with a
# budget). Seed-0 grids tell rates apart, not two configurations whose best points lie within a percent of each
# other, so the configuration is chosen on the validation split over every seed run at the middle budget (each at
# its own rate choice, paired by seed), and the rate then among that configuration's candidates.
# tests/test_defaults.py holds the choice equal to what the library does.
# The SVD methods' configurations: with the orthogonality penalty at the papers' weight (0.1, quality.py's "elalora",
# "adalora-physical") or without it ("-ortho0"), E at the adapters' rate or 30 times it ("-e30"); the library's
# ortho_weight and values_lr_ratio defaults follow the choice; without the penalty, the adapters started as plain
# LoRA's with E = 1 ("-lora", svd_init='lora'; the library's svd_init default follows the choice too), for
# AdaLoRA-style also with lora_alpha at its start rank ("-lora-scale1": the update at plain LoRA's scale; run on the
# causal LMs only). A configuration is chosen among those the tasks of the choice ran.
CONFIGURATIONS = {
    "ard": ["ard", "ard-data-scaled"],
    "elalora": ["elalora", "elalora-ortho0", "elalora-e30", "elalora-ortho0-e30", "elalora-ortho0-lora"],
    "adalora-physical": [
        "adalora-physical",
        "adalora-physical-ortho0",
        "adalora-physical-e30",
        "adalora-physical-ortho0-e30",
        "adalora-physical-ortho0-lora",
        "adalora-physical-ortho0-lora-scale1",
    ],
}
BASELINES = ["lora", "adalora"]  # stock PEFT, each at its best rate per task
# Stock baselines get a default too (a user's `--method lora` untuned): the rate best over all tasks, no left-out
# check (they are what dynarank's methods are compared with, each at its best rate per task). dynarank-lora (fixed
# ranks, no controller) is plain LoRA in dynarank's layer, and eva stock LoRA with another init: both take LoRA's rate.
STOCK = ["lora", "dora", "adalora", "full"]
FOLLOWS = {"dynarank-lora": "lora", "eva": "lora"}
SEEDS = [0, 1, 2]


def store_of(task: str, results: Path = RESULTS) -> RecordStore:
    return RecordStore(results / f"quality_{task}.json", quality.record_key)


def grid(store: RecordStore, task: str, method: str) -> dict[float, float]:
    """Validation metric per rate of ``method``'s tuning runs on ``task`` (middle budget, seed 0)."""
    spec = quality.TASKS[task]
    budget = 0 if method == "full" else spec["tune_budget"]  # full fine-tuning has no budget
    runs = [
        r
        for r in store.runs
        if r["task"] == task
        and r["method"] == method
        and r["budget_r"] == budget
        and r["seed"] == 0
        and r["steps"] == spec["steps"]
    ]
    return {r["lr"]: r["val"][spec["metric"]] for r in runs}


def candidates(store: RecordStore, task: str, method: str) -> dict[tuple[str, float], float]:
    """Validation metric per (variant, rate) of ``method`` on ``task``."""
    return {
        (variant, lr): value
        for variant in CONFIGURATIONS.get(method, [method])
        for lr, value in grid(store, task, variant).items()
    }


def relative(scores: dict, higher_is_better: bool) -> dict:
    """Each rate's score relative to the task's best rate (1 = the best; a non-finite result scores 0)."""
    finite = {lr: v for lr, v in scores.items() if math.isfinite(v)}
    if not finite:
        return {lr: 0.0 for lr in scores}
    best = max(finite.values()) if higher_is_better else min(finite.values())
    return {
        lr: (0.0 if not math.isfinite(v) else (v / best if higher_is_better else best / v)) for lr, v in scores.items()
    }


def common(scores: dict[str, dict], tasks: list[str]) -> set:
    """The candidates every one of ``tasks`` ran."""
    return set.intersection(*(set(scores[t]) for t in tasks)) if tasks else set()


def choose(scores: dict[str, dict], tasks: list[str], allowed: set | None = None) -> tuple[tuple | None, dict]:
    """The (variant, rate) with the best mean relative score over ``tasks`` (among those every one of them ran, and
    ``allowed``); a tie goes to the lower rate."""
    found = common(scores, tasks) if allowed is None else common(scores, tasks) & allowed
    means = {lr: statistics.mean(scores[t][lr] for t in tasks) for lr in sorted(found)}
    return (max(means, key=means.get) if means else None), means


def kind(task: str) -> str:
    """The table of defaults a task's runs belong to ('classify' or 'causal-lm')."""
    return quality.TASKS[task]["kind"]


def left_out_tasks(task: str, tasks: list[str]) -> tuple[list[str], bool]:
    """The tasks a rate for ``task`` is chosen on without it: the others of its kind, else (alone of its kind) all
    others; and whether they are of its kind."""
    same = [u for u in tasks if u != task and kind(u) == kind(task)]
    return (same, True) if same else ([u for u in tasks if u != task], False)


def seed_values(store: RecordStore, task: str, variant: str, lr: float, seeds: list[int]) -> list[float]:
    """Validation metric of ``variant`` at ``lr``, middle budget, one per seed of ``seeds`` (in their order)."""
    spec = quality.TASKS[task]
    return [store.get((task, variant, spec["tune_budget"], lr, s, spec["steps"]))["val"][spec["metric"]] for s in seeds]


def common_seeds(store: RecordStore, task: str, runs: list[tuple[str, float]]) -> set[int]:
    """The seeds every (variant, rate) of ``runs`` ran at ``task``'s middle budget."""
    spec = quality.TASKS[task]
    found = [
        {
            r["seed"]
            for r in store.runs
            if (r["task"], r["method"], r["lr"], r["budget_r"], r["steps"])
            == (task, v, lr, spec["tune_budget"], spec["steps"])
        }
        for v, lr in runs
    ]
    return set.intersection(*found) if found else set()


def candidates_of(configuration: str, scores: dict[str, dict], tasks: list[str]) -> set:
    """The (variant, rate) candidates of one configuration that any of ``tasks`` scored."""
    return {k for t in tasks for k in scores[t] if k[0] == configuration}


def penalised(configuration: str) -> bool:
    """Whether an SVD configuration trains with the orthogonality penalty: its gradient is work every step (the
    decoder's step-time records: ElaLoRA's hooks 14.6 ms a step with it, 8.4 without), so a configuration with it
    must win its vote by more than the vote's noise (``choose_configuration``)."""
    base, changed = quality.ABLATIONS.get(configuration, (configuration, {}))
    if callable(changed):  # settings that depend on the budget: the penalty's weight does not
        changed = changed(1, 0)
    weight = changed.get("ortho_weight", quality.ORTHO_WEIGHT)
    return base in ("elalora", "adalora-physical", "adalora") and weight > 0


def gap_standard_error(per_seed: dict[str, dict[str, list[float]]], a: str, b: str) -> float:
    """The standard error of the vote gap between configurations ``a`` and ``b``: per voting task, the paired
    per-seed differences' standard error; the vote is the mean over tasks, so the errors add in quadrature / tasks."""
    errors = []
    for by_configuration in per_seed.values():
        gaps = [x - y for x, y in zip(by_configuration[a], by_configuration[b], strict=True)]
        errors.append(statistics.stdev(gaps) / math.sqrt(len(gaps)))
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def choose_configuration(
    scores: dict[str, dict], stores: dict[str, RecordStore], configurations: list[str], tasks: list[str]
) -> tuple[str, dict]:
    """The configuration with the best mean relative validation score over ``tasks``, each configuration at its
    rate choice on ``tasks`` (none that failed there), averaged over the seeds all of them ran (at least 2; a task
    with fewer does not vote). A configuration run at fewer than 2 seeds (at its rate) on a task where another ran
    at 2 or more is not yet weighed and does not vote: a grid at seed 0 alone neither wins nor silences the tasks'
    votes of the configurations run in full. A tie, or no task that votes, goes to the first configuration.

    A configuration with the orthogonality penalty (``penalised``: a cost every step) wins only by more than one
    standard error of its vote gap (over the seeds, paired) to the best configuration without it; within that, the
    best one without it is chosen. Returns the choice and the vote: {"votes": configuration -> mean relative score,
    "standard_error": configuration -> standard error of its gap to the best vote, "chosen": the choice} (empty when
    no task votes)."""
    rates = {
        c: choose(scores, tasks, safe(scores, stores, tasks, candidates_of(c, scores, tasks)))[0]
        for c in configurations
    }
    ran = {c: rate for c, rate in rates.items() if rate is not None}  # the configurations the tasks ran (not failed)
    if len(ran) >= 2:  # one configuration needs no seeds counted (nor records: a study run on given scores)
        under_run = set()
        for task in tasks:
            seeds = {c: len(common_seeds(stores[task], task, [rate])) for c, rate in ran.items()}
            if any(n >= 2 for n in seeds.values()):
                under_run |= {c for c, n in seeds.items() if n < 2}
        ran = {c: rate for c, rate in ran.items() if c not in under_run} or ran
    if len(ran) < 2:
        return next(iter(ran or rates)), {}
    configurations, rates = list(ran), ran
    votes: dict[str, list[float]] = {c: [] for c in configurations}
    per_seed: dict[str, dict[str, list[float]]] = {}  # voting task -> configuration -> relative score per seed
    for task in tasks:
        seeds = sorted(common_seeds(stores[task], task, list(rates.values())))
        if len(seeds) < 2:
            continue
        higher = quality.TASKS[task]["higher_is_better"]
        values = {c: seed_values(stores[task], task, *rates[c], seeds) for c in configurations}
        means = {c: statistics.mean(v) for c, v in values.items()}
        for c, score in relative(means, higher).items():
            votes[c].append(score)
        # each seed relative to the best mean, as the vote is (non-finite: 0, as in relative)
        best = max(means.values()) if higher else min(means.values())
        per_seed[task] = {
            c: [0.0 if not math.isfinite(v) else (v / best if higher else best / v) for v in vs]
            for c, vs in values.items()
        }
    means = {c: statistics.mean(v) for c, v in votes.items() if v}
    if not means:
        return configurations[0], {}
    best = max(configurations, key=lambda c: means.get(c, -1.0))
    errors = {c: gap_standard_error(per_seed, best, c) for c in configurations if c != best}
    chosen = best
    if penalised(best):
        level = [c for c in configurations if not penalised(c) and means[best] - means[c] <= errors[c]]
        chosen = max(level, key=lambda c: means[c], default=best)
    return chosen, {"votes": means, "standard_error": errors, "chosen": chosen}


def configuration_candidates(
    scores: dict, stores: dict, configurations: list[str] | None, tasks: list[str], votes: dict
) -> set | None:
    """The candidates of the configuration chosen on ``tasks`` (None: no configuration to choose, every candidate);
    the votes are kept in ``votes`` under the tasks' names."""
    if configurations is None:
        return None
    chosen, votes[",".join(tasks)] = choose_configuration(scores, stores, configurations, tasks)
    return candidates_of(chosen, scores, tasks)


# A run "failed" when its validation score is below this share of the best one recorded at its task, budget and seed
# (any method; the best at any seed when no other method ran that seed): a diverged classifier sits at the accuracy
# of one class (0.50 of 0.87 on the binary tweets), a diverged LM's loss is several times the best, and a rate far
# too low for the run ends below it too. The seed's own best, as every comparison of the study is paired by seed: a
# seed whose split or draw is hard for every method (plain LoRA's sentiment-LM seed 1 reaches 0.83 of the best seed's
# loss) fails no run by being hard (docs/defaults.md, "A failure is judged within its seed"). A rate that failed
# anywhere on a kind's tasks does not ship for it, however it scores at the middle budget: the grids are run there,
# and a rate can diverge at two or three times that budget (docs/defaults.md).
FAILED_BELOW = 0.7


def failed_references(group: list[dict], metric: str, higher: bool) -> dict[int, float] | None:
    """Seed -> the score a run of ``group`` (one task and budget) is measured against: the best finite one at its
    seed when another method ran that seed too, else the best at any seed (None: no finite score at all)."""
    finite = [r for r in group if math.isfinite(r["val"][metric])]
    if not finite:
        return None
    pick = max if higher else min
    overall = pick(r["val"][metric] for r in finite)
    out = {}
    for seed in {r["seed"] for r in group}:
        at_seed = [r for r in finite if r["seed"] == seed]
        compared = len({r["method"] for r in at_seed}) >= 2
        out[seed] = pick(r["val"][metric] for r in at_seed) if compared else overall
    return out


def failed(
    stores: dict[str, RecordStore], tasks: list[str], budget: int | None = None
) -> dict[tuple[str, float], list[str]]:
    """(variant, rate) -> the runs of ``tasks`` (any seed; any budget, or only ``budget``) where it failed."""
    out: dict[tuple[str, float], list[str]] = {}
    for task in tasks:
        if stores.get(task) is None:  # no records (a study run on given scores)
            continue
        spec = quality.TASKS[task]
        metric, higher = spec["metric"], spec["higher_is_better"]
        by_budget: dict[int, list[dict]] = {}
        for r in stores[task].runs:
            if r["task"] == task and r["steps"] == spec["steps"]:
                by_budget.setdefault(r["budget_r"], []).append(r)
        for at, group in by_budget.items():
            if budget is not None and at != budget:
                continue
            best = failed_references(group, metric, higher)
            if best is None:
                continue
            for r in group:
                v = r["val"][metric]
                share = 0.0 if not math.isfinite(v) else (v / best[r["seed"]] if higher else best[r["seed"]] / v)
                if share < FAILED_BELOW:
                    out.setdefault((r["method"], r["lr"]), []).append(f"{task} r={at} seed {r['seed']}")
    return out


def safe(scores: dict, stores: dict, tasks: list[str], allowed: set | None) -> set:
    """``allowed`` (None: every candidate the tasks all ran) without what failed on them."""
    bad = failed(stores, tasks)
    return {c for c in (common(scores, tasks) if allowed is None else allowed) if c not in bad}


def study(stores: dict[str, RecordStore]) -> dict:
    """Per method: relative scores per task, the left-out choices and the shipped rate of each kind (and, for a
    method in CONFIGURATIONS, the configuration)."""
    out = {}
    for method in CHOSEN + STOCK:
        scores = {}
        for task, store in stores.items():
            found = candidates(store, task, method)
            if found:
                scores[task] = relative(found, quality.TASKS[task]["higher_is_better"])
        tasks = sorted(scores)
        configurations = CONFIGURATIONS.get(method)
        left_out, same_kind, configuration_votes = {}, {}, {}
        for t in tasks:
            # What could ship for t's kind: the candidates all its tasks ran (a variant tried on one task alone
            # cannot be a kind's default, so it is not a left-out choice either).
            others, same_kind[t] = left_out_tasks(t, tasks)
            shippable = common(scores, [u for u in tasks if kind(u) == kind(t)] if same_kind[t] else tasks)
            allowed = configuration_candidates(scores, stores, configurations, others, configuration_votes)
            allowed = safe(scores, stores, others, shippable if allowed is None else shippable & allowed)
            left_out[t] = choose(scores, others, allowed)[0]
        shipped, means = {}, {}
        for k in sorted({kind(t) for t in tasks}):
            of_kind = [t for t in tasks if kind(t) == k]
            allowed = configuration_candidates(scores, stores, configurations, of_kind, configuration_votes)
            shipped[k], means[k] = choose(scores, of_kind, safe(scores, stores, of_kind, allowed))
        out[method] = {
            "scores": scores,
            "left_out": left_out,
            "left_out_same_kind": same_kind,
            "shipped": shipped,
            "mean_relative": means,
            "configuration_votes": configuration_votes,
        }
    return out


def shipped_rates(choices: dict) -> dict[str, dict[str, float]]:
    """The tables dynarank.defaults.DEFAULT_LR should hold: per kind, each method's rate best over its tasks."""
    tables: dict[str, dict[str, float]] = {}
    for method, found in choices.items():
        for k, candidate in found["shipped"].items():
            if candidate is not None:
                shippable = CONFIGURATIONS.get(method, [method])
                assert candidate[0] in shippable, f"{candidate} cannot ship as {method}'s default"
                tables.setdefault(k, {})[method] = candidate[1]
    for rates in tables.values():
        rates.update({m: rates[source] for m, source in FOLLOWS.items() if source in rates})
    return tables


def middle_budget(k: str) -> int:
    """The study's middle budget of kind ``k`` (plain LoRA's rank): every task of the kind tunes at the same one."""
    found = {spec["tune_budget"] for spec in quality.TASKS.values() if spec["kind"] == k}
    assert len(found) == 1, f"the {k} tasks tune at different budgets: {sorted(found)}"
    return found.pop()


def budget_grid(store: RecordStore, task: str, variant: str, budget: int) -> dict[tuple[str, float], float]:
    """Validation metric per (variant, rate) of ``variant``'s seed-0 runs on ``task`` at ``budget``."""
    steps = quality.TASKS[task]["steps"]
    return {
        (variant, r["lr"]): r["val"][quality.TASKS[task]["metric"]]
        for r in store.runs
        if (r["task"], r["method"], r["budget_r"], r["seed"], r["steps"]) == (task, variant, budget, 0, steps)
    }


def budget_study(choices: dict, stores: dict[str, RecordStore]) -> dict:
    """Per kind and method: the rates chosen at budgets other than the middle one, where every task of the kind ran
    a grid (two rates or more, seed 0) of the method's shipped configuration there. The same procedure as the
    middle budget's: relative validation scores, the best mean over the kind's tasks among the rates all of them ran
    and none failed at that budget (ties to the lower rate), and each task's choice without it."""
    out: dict = {}
    for method, found in choices.items():  # dynarank's methods and the stock baselines (study())
        for k, shipped in found["shipped"].items():
            if shipped is None:
                continue
            variant = shipped[0]
            tasks = sorted(t for t in stores if kind(t) == k)
            budgets = {
                r["budget_r"] for t in tasks for r in stores[t].runs if r["method"] == variant and r["seed"] == 0
            } - {middle_budget(k), 0}  # 0: full fine-tuning, which has no budget
            for budget in sorted(budgets):
                grids = {t: budget_grid(stores[t], t, variant, budget) for t in tasks}
                if not tasks or any(len(g) < 2 for g in grids.values()):
                    continue  # not every task of the kind ran a grid here
                scores = {t: relative(g, quality.TASKS[t]["higher_is_better"]) for t, g in grids.items()}
                bad = failed(stores, tasks, budget)
                allowed = {c for c in common(scores, tasks) if c not in bad}
                chosen, means = choose(scores, tasks, allowed)
                left_out = {}
                for t in tasks:  # chosen on the others alone: what failed on t itself is not known there
                    others = [u for u in tasks if u != t]
                    bad_elsewhere = failed(stores, others, budget)
                    allowed_elsewhere = {c for c in common(scores, others) if c not in bad_elsewhere}
                    left_out[t] = choose(scores, others, allowed_elsewhere)[0]
                out.setdefault(k, {}).setdefault(method, {})[budget] = {
                    "scores": scores,
                    "mean_relative": means,
                    "failed": {c: bad[c] for c in sorted(common(scores, tasks)) if c in bad},
                    "shipped": chosen,
                    "left_out": left_out,
                }
    return out


def budget_rates(by_budget: dict) -> dict[str, dict[str, dict[int, float]]]:
    """The tables dynarank.defaults.BUDGET_LR should hold: per kind and method, the rate chosen at each budget (the
    methods that take another's rate, FOLLOWS, take its rates per budget too)."""
    tables = {
        k: {m: {b: found["shipped"][1] for b, found in budgets.items()} for m, budgets in methods.items()}
        for k, methods in by_budget.items()
    }
    for rates in tables.values():
        rates.update({m: dict(rates[source]) for m, source in FOLLOWS.items() if source in rates})
    return tables


def shipped_rate_at(choices: dict, by_budget: dict, method: str, task: str, budget: int) -> tuple[str, float] | None:
    """(variant, rate) ``method`` ships with on ``task``'s kind at ``budget``: the rate chosen at the studied budget
    nearest on a log scale (a tie: the middle one), as dynarank.defaults.default_lr takes it."""
    shipped = choices[method]["shipped"].get(kind(task))
    if shipped is None:
        return None
    middle = middle_budget(kind(task))
    studied = {middle: shipped, **{b: f["shipped"] for b, f in by_budget.get(kind(task), {}).get(method, {}).items()}}
    return studied[nearest_budget(studied, middle, budget)]


def budget_markdown(by_budget: dict) -> list[str]:
    if not by_budget:
        return []
    lines = [
        "## Rates at other budgets (relative validation score per rate, seed 0; 1 = the task's best rate there)",
        "",
        "Where every task of a kind ran a grid of a method's shipped configuration at a budget other than the middle "
        "one (r: plain LoRA's rank), its rate there is chosen as at the middle budget: the best mean relative score "
        "over the kind's tasks among the rates all ran and none failed at that budget; the left-out choice is each "
        "task's without it. dynarank.defaults.BUDGET_LR holds these; a run takes the rate of the studied budget "
        "nearest its own on a log scale.",
        "",
    ]
    for k, methods in by_budget.items():
        for method, budgets in methods.items():
            for budget, found in budgets.items():
                keys = sorted({c for sc in found["scores"].values() for c in sc})
                lines += [
                    f"### {method}, {k}, r={budget}",
                    "",
                    "| task | " + " | ".join(_name(c) for c in keys) + " | left-out choice |",
                    "|---|" + "---|" * (len(keys) + 1),
                ]
                for task, scores in found["scores"].items():
                    cells = [f"{scores[c]:.3f}" if c in scores else "-" for c in keys]
                    lines.append(f"| {task} | " + " | ".join(cells) + f" | {_name(found['left_out'][task])} |")
                means = ", ".join(f"{_name(c)} {v:.3f}" for c, v in found["mean_relative"].items())
                lines += ["", f"Mean over the tasks: {means}. Chosen: **{_name(found['shipped'])}**"]
                if found["failed"]:
                    lines.append(
                        "Failed there: "
                        + "; ".join(f"{_name(c)} ({', '.join(where)})" for c, where in found["failed"].items())
                    )
                lines.append("")
    return lines


def baseline_rate(store: RecordStore, task: str, method: str) -> float | None:
    """A stock baseline's rate on ``task``: the best of its grid on the validation split (quality.chosen_lr)."""
    return quality.chosen_lr(store, task, method, quality.TASKS[task]["steps"])


def validation_jobs(choices: dict, stores: dict[str, RecordStore]) -> dict[str, list[tuple]]:
    """Per task, the (method, budget, lr, seed) runs of the left-out checks (recorded or not)."""
    return _check_jobs(choices, stores, lambda found, task: found["left_out"].get(task))


def shipped_jobs(choices: dict, stores: dict[str, RecordStore]) -> dict[str, list[tuple]]:
    """Per task, the (method, budget, lr, seed) runs of each method's shipped configuration and rate for the task's
    kind (chosen with the task among the others: not a left-out check) and of the stock baselines."""
    return _check_jobs(choices, stores, lambda found, task: found["shipped"].get(kind(task)))


def _check_jobs(choices: dict, stores: dict[str, RecordStore], pick) -> dict[str, list[tuple]]:
    """Per task, the runs of ``pick(choices[method], task)`` (a (variant, rate) or None) for every chosen method and of
    each stock baseline at its best validation rate, at the middle budget, seeds SEEDS."""
    jobs: dict[str, list[tuple]] = {}
    for task, store in stores.items():
        budget = quality.TASKS[task]["tune_budget"]
        wanted = [pick(choices[m], task) for m in CHOSEN]
        wanted += [(b, baseline_rate(store, task, b)) for b in BASELINES]
        jobs[task] = [
            (c[0], budget, c[1], seed) for c in wanted if c is not None and c[1] is not None for seed in SEEDS
        ]
    return jobs


def mean_and_stderr(diffs: list[float]) -> dict[str, float]:
    """{'n', 'mean', 'stderr'} of paired differences (stderr: the sample deviation over sqrt(n))."""
    return {"n": len(diffs), "mean": statistics.mean(diffs), "stderr": statistics.stdev(diffs) / len(diffs) ** 0.5}


def paired(store: RecordStore, task: str, jobs: list[tuple]) -> list[dict]:
    """Each chosen method at its rate in ``jobs`` minus each baseline at its best rate, paired by seed (test split)."""
    spec = quality.TASKS[task]
    sign = 1 if spec["higher_is_better"] else -1
    runs = {}
    for method, budget, lr, seed in jobs:
        record = store.get((task, method, budget, lr, seed, spec["steps"]))
        if record is not None:
            runs[quality.base_method(method), seed] = record  # a variant stands for its method
    rows = []
    for method in CHOSEN:
        for base in BASELINES:
            diffs = [
                sign * (runs[method, s]["test"][spec["metric"]] - runs[base, s]["test"][spec["metric"]])
                for s in SEEDS
                if (method, s) in runs and (base, s) in runs
            ]
            if len(diffs) >= 2:
                rows.append(
                    {
                        "task": task,
                        "method": method,
                        "baseline": base,
                        **mean_and_stderr(diffs),
                        "params": statistics.mean(
                            runs[method, s]["adapter_parameters"] for s in SEEDS if (method, s) in runs
                        ),
                        "baseline_params": statistics.mean(
                            runs[base, s]["adapter_parameters"] for s in SEEDS if (base, s) in runs
                        ),
                    }
                )
    return rows


def baseline_rate_at(store: RecordStore, task: str, method: str, budget: int) -> tuple[float | None, list[float]]:
    """(a stock baseline's rate at ``budget``, the rates it was chosen from): at the middle budget its grid's choice
    (baseline_rate); at another budget the best validation score of seed 0 among the rates run there (the grid was
    run at the middle budget only: the rates tried at another budget are listed beside the result)."""
    steps = quality.TASKS[task]["steps"]
    if budget == quality.TASKS[task]["tune_budget"]:
        rate = baseline_rate(store, task, method)
        return rate, [] if rate is None else ["grid"]
    sign = 1 if quality.TASKS[task]["higher_is_better"] else -1
    metric = quality.TASKS[task]["metric"]
    key = (task, method, budget, 0, steps)
    tried = [r for r in store.runs if (r["task"], r["method"], r["budget_r"], r["seed"], r["steps"]) == key]
    if not tried:
        return None, []
    best = max(tried, key=lambda r: sign * r["val"][metric])
    return best["lr"], sorted(r["lr"] for r in tried)


def auto_comparisons(
    choices: dict, stores: dict[str, RecordStore], fixed: bool = False, by_budget: dict | None = None
) -> list[dict]:
    """``lr='auto'`` (quality.py's '+auto' runs of each method's shipped configuration, searched around its shipped
    rate) against the same configuration at the shipped rate, and against stock LoRA and stock AdaLoRA at their best
    rate on the task (baseline_rate_at): paired by seed at every budget where auto ran on at least two seeds (test
    split; positive = auto is better).

    ``fixed``: the shipped configuration at its shipped rate instead, against the baselines, at the budgets other
    than the middle one (the middle budget's are the left-out checks) where it ran on at least two seeds.

    The shipped rate at a budget (auto's centre there) is the one the library takes there (shipped_rate_at, with
    ``by_budget``: budget_study's choices; without it, the middle budget's rate everywhere)."""
    rows = []
    for task, store in stores.items():
        spec = quality.TASKS[task]
        sign, metric, steps = (1 if spec["higher_is_better"] else -1), spec["metric"], spec["steps"]
        for method in CHOSEN:
            if choices[method]["shipped"].get(kind(task)) is None:
                continue
            variant = choices[method]["shipped"][kind(task)][0]
            subject = variant if fixed else variant + quality.AUTO
            rate_at = {
                b: shipped_rate_at(choices, by_budget or {}, method, task, b)[1]
                for b in {r["budget_r"] for r in store.runs if r["method"] == subject}
            }
            budgets = sorted(
                b for b in rate_at if any(store.has((task, subject, b, rate_at[b], s, steps)) for s in SEEDS)
            )
            budgets.sort(key=lambda b: b != spec["tune_budget"])  # the middle budget first
            if fixed:
                budgets = [b for b in budgets if b != spec["tune_budget"]]
            for budget in budgets:
                rate = rate_at[budget]
                runs = {s: store.get((task, subject, budget, rate, s, steps)) for s in SEEDS}
                runs = {s: r for s, r in runs.items() if r is not None}
                if len(runs) < 2:
                    continue
                against = [] if fixed else [(f"{variant} {rate:g} (the default)", variant, rate, [])]
                against += [(b, b, *baseline_rate_at(store, task, b, budget)) for b in BASELINES]
                for label, other, other_rate, tried in against:
                    pairs = [(runs[s], store.get((task, other, budget, other_rate, s, steps))) for s in runs]
                    pairs = [(a, b) for a, b in pairs if b is not None]
                    if len(pairs) < 2:
                        continue
                    diffs = [sign * (a["test"][metric] - b["test"][metric]) for a, b in pairs]
                    row = {
                        "task": task,
                        "budget": budget,
                        "middle_budget": budget == spec["tune_budget"],
                        "method": method,
                        "vs": label if not tried or tried == ["grid"] else f"{label} {other_rate:g}",
                        "vs_rates_tried": tried,
                        **mean_and_stderr(diffs),
                        "params": statistics.mean(a["adapter_parameters"] for a, _ in pairs),
                        "other_params": statistics.mean(b["adapter_parameters"] for _, b in pairs),
                    }
                    if fixed:
                        row["rate"] = rate
                    else:
                        row["chosen"] = [a["lr_used"] for a, _ in pairs]
                        # the range test's share of the auto run's own time (the same process, the same load)
                        row["search_share"] = statistics.mean(
                            a["lr_search"]["seconds"] / a["seconds"] for a, _ in pairs
                        )
                    rows.append(row)
    return rows


def fixed_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## The shipped default away from the middle budget (test split, paired by seed; positive = the default is "
        "better)",
        "",
        "Each method's shipped configuration at its shipped rate, at the budgets other than the study's middle one "
        "where it ran on two seeds or more, against stock LoRA and stock AdaLoRA at their best rate there (as in the "
        "lr='auto' table below: seed 0's best validation score among the rates run at that budget).",
        "",
        "| task | r | method (rate) | vs | vs rates tried | difference (mean ± s.e.) | params (default / other) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tried = ", ".join(f"{lr:g}" for lr in r["vs_rates_tried"]) or "-"
        lines.append(
            f"| {r['task']} | {r['budget']} | {r['method']} ({r['rate']:g}) | {r['vs']} | {tried} | "
            f"{r['mean']:+.4f} ± {r['stderr']:.4f} (n={r['n']}) | {r['params']:,.0f} / {r['other_params']:,.0f} |"
        )
    return [*lines, ""]


def _name(candidate: tuple | None) -> str:
    return "-" if candidate is None else f"{candidate[0]} {candidate[1]:g}"


def auto_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## lr='auto' (test split, paired by seed; positive = auto is better)",
        "",
        "The range test (dynarank/training/lr_search.py) around the shipped default, against the shipped default "
        "itself and against stock LoRA and stock AdaLoRA each at its best rate on the task (quality.py's '+auto' "
        "runs), at every budget where auto ran on two seeds or more (r: the budget as plain LoRA's rank; the middle "
        "budget is the study's). At the middle budget a baseline's rate is its grid's choice; at another budget the "
        "best validation score of seed 0 among the rates run there, which the row names (and the 'vs rates tried' "
        "column lists). Rates chosen: per seed. Search: the range test's share of the auto run's time (its probes, "
        "before training; the run's time includes its evaluation).",
        "",
        "| task | r | method | vs | vs rates tried | difference (mean ± s.e.) | rates chosen | params (auto / other) "
        "| search |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chosen = ", ".join(f"{lr:g}" for lr in r["chosen"])
        tried = "grid" if r["vs_rates_tried"] == ["grid"] else ", ".join(f"{lr:g}" for lr in r["vs_rates_tried"]) or "-"
        lines.append(
            f"| {r['task']} | {r['budget']} | {r['method']} | {r['vs']} | {tried} | {r['mean']:+.4f} ± "
            f"{r['stderr']:.4f} (n={r['n']}) | {chosen} | {r['params']:,.0f} / {r['other_params']:,.0f} | "
            f"{r['search_share']:.0%} |"
        )
    return [*lines, ""]


def markdown(
    choices: dict,
    jobs: dict,
    comparisons: list[dict],
    commands: list[str],
    auto: list[dict] = (),
    fixed: list[dict] = (),
    by_budget: dict | None = None,
    shipped_rows: list[dict] = (),
) -> str:
    lines = [
        "# Default learning rates: chosen on some tasks, checked on the others",
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in commands],
        "",
        "## Relative validation score per rate (1 = the task's best rate), seed 0, middle budget",
        "",
    ]
    for method, found in choices.items():
        keys = sorted({key for s in found["scores"].values() for key in s})
        lines += [f"### {method}", "", "| task | " + " | ".join(_name(k) for k in keys) + " | left-out choice |"]
        lines.append("|---|" + "---|" * (len(keys) + 1))
        for task, scores in found["scores"].items():
            cells = [f"{scores[k]:.3f}" if k in scores else "-" for k in keys]
            choice = found["left_out"].get(task)
            lines.append(f"| {task} | " + " | ".join(cells) + f" | {_name(choice)} |")
        shipped = "; ".join(f"{k}: **{_name(c)}**" for k, c in found["shipped"].items())
        lines += ["", f"Shipped defaults: {shipped}", ""]
        if found.get("configuration_votes"):
            lines += [
                "Configuration, chosen on the validation split over the seeds every configuration ran at the middle "
                "budget (each at its rate choice on the same tasks; relative, 1 = the better):",
                "",
                *(_vote_line(on, vote) for on, vote in sorted(found["configuration_votes"].items())),
                "",
            ]
    lines += budget_markdown(by_budget or {})
    lines += [
        "## Left-out checks (test split, 3 seeds, paired by seed; positive = the method is better)",
        "",
        "| task | method (left-out rate) | vs | difference (mean ± s.e.) | params (method / baseline) |",
        "|---|---|---|---|---|",
    ]
    for c in comparisons:
        choice = _name(choices[c["method"]]["left_out"][c["task"]])
        if not choices[c["method"]]["left_out_same_kind"][c["task"]]:
            choice += ", chosen on the other kind"
        lines.append(
            f"| {c['task']} | {c['method']} ({choice}) | {c['baseline']} | {c['mean']:+.4f} ± {c['stderr']:.4f} "
            f"(n={c['n']}) | {c['params']:,.0f} / {c['baseline_params']:,.0f} |"
        )
    lines += [
        "",
        "## The shipped defaults at the middle budget (test split, paired by seed; positive = the method is better)",
        "",
        "Each method at the configuration and rate shipped for the task's kind, chosen with this task among the "
        "others (not a left-out check); only where every seed ran.",
        "",
        "| task | method (shipped) | vs | difference (mean ± s.e.) | params (method / baseline) |",
        "|---|---|---|---|---|",
    ]
    for c in shipped_rows:
        choice = _name(choices[c["method"]]["shipped"][kind(c["task"])])
        lines.append(
            f"| {c['task']} | {c['method']} ({choice}) | {c['baseline']} | {c['mean']:+.4f} ± {c['stderr']:.4f} "
            f"(n={c['n']}) | {c['params']:,.0f} / {c['baseline_params']:,.0f} |"
        )
    lines += ["", *fixed_markdown(list(fixed)), *auto_markdown(list(auto))]
    return "\n".join(lines).rstrip("\n") + "\n"


def _vote_line(on: str, vote: dict) -> str:
    """One configuration vote: each configuration's mean relative score, the standard error of its gap to the best,
    and the choice (when the penalty's cost moved it off the best vote, why)."""
    if not vote:
        return f"- on {on.replace(',', ', ')}: no task with 2+ seeds (the first)"
    best = max(vote["votes"], key=vote["votes"].get)
    cells = ", ".join(
        f"{c} {v:.4f}"
        + (f" (gap {vote['votes'][best] - v:.4f} ± {vote['standard_error'][c]:.4f})" if c != best else "")
        for c, v in vote["votes"].items()
    )
    why = "" if vote["chosen"] == best else " (without the penalty, within one standard error of the best)"
    return f"- on {on.replace(',', ', ')}: {cells}; chosen **{vote['chosen']}**{why}"


def _jsonable(value):
    """Tuple keys ((variant, rate) candidates) as 'variant@rate' strings."""
    if isinstance(value, dict):
        return {(f"{k[0]}@{k[1]:g}" if isinstance(k, tuple) else k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validate", action="store_true", help="run the left-out checks still missing")
    parser.add_argument("--tasks", nargs="+", default=STUDY_TASKS, choices=STUDY_TASKS)
    parser.add_argument(
        "--check", nargs="+", choices=STUDY_TASKS, help="with --validate: run the left-out checks of these tasks only"
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the quality records (and outputs)")
    args = parser.parse_args()
    stores = {t: store_of(t, args.results) for t in args.tasks if (args.results / f"quality_{t}.json").is_file()}
    choices = study(stores)
    jobs = validation_jobs(choices, stores)
    command = "python benchmarks/defaults.py " + shlex.join(sys.argv[1:])
    if args.validate:
        for task, wanted in jobs.items():
            if args.check and task not in args.check:
                continue
            store, steps = stores[task], quality.TASKS[task]["steps"]
            todo = [j for j in wanted if not store.has((task, *j, steps))]
            store.note_command(command)
            print(f"{task}: {len(todo)} runs to do", flush=True)
            run_pool(
                quality.run_one,
                [(task, *j, steps, 1, command) for j in todo],
                args.jobs,
                lambda job, record, store=store: store.add(record),
            )
    comparisons = [row for task, wanted in jobs.items() for row in paired(stores[task], task, wanted)]
    shipped = [
        row for task, wanted in shipped_jobs(choices, stores).items() for row in paired(stores[task], task, wanted)
    ]
    by_budget = budget_study(choices, stores)
    auto = auto_comparisons(choices, stores, by_budget=by_budget)
    fixed = auto_comparisons(choices, stores, fixed=True, by_budget=by_budget)
    record = {
        "shipped": shipped_rates(choices),
        "middle_budget": {k: middle_budget(k) for k in sorted({kind(t) for t in stores})},
        "shipped_by_budget": budget_rates(by_budget),
        "budgets": _jsonable(by_budget),
        "choices": _jsonable(choices),
        "jobs": jobs,
        "comparisons": comparisons,
        "shipped_comparisons": shipped,
        "auto": auto,
        "default_away_from_the_middle": fixed,
        "commands": [command],
    }
    (args.results / "defaults.json").write_text(json.dumps(record, indent=1))
    text = markdown(choices, jobs, comparisons, [command], auto, fixed, by_budget, shipped)
    (args.results / "defaults.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
