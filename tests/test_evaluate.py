"""Evaluation: statistics against known values, the problem-text parser, dataset layouts, the run (classic engine
and the tiny Qwen2.5-VL), resume after an interruption, parse failures, debiasing, reports and comparisons."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from oracle import PixelOracle, frame

from tpru_agent import TPRU, ConfigError
from tpru_agent.finetune.data.tpru_format import TPRURow, encode_png, write_parquet
from tpru_agent.finetune.eval.dataset import open_dataset, parse_options, question_from_problem
from tpru_agent.finetune.eval.report import compare_reports
from tpru_agent.finetune.eval.run import EvalConfig, run_eval
from tpru_agent.finetune.eval.statistics import calibration, mcnemar, percentile, wilson_interval
from tpru_agent.tasks import next_frame, ordering, previous

# ----------------------------------------------------------------------------------------------- statistics


# Published values (50/100: 0.4038-0.5962; 1/3: 0.0615-0.7923), the closed form z^2 / (n + z^2) at k = 0, and
# TPRU-7B's 75.9% on TPRU-test (the paper's "about 71.6-79.4"); digits checked by bisection on the defining
# quadratic (p_hat - p)^2 = z^2 p (1 - p) / n.
@pytest.mark.parametrize("k, n, lo, hi", [
    (50, 100, 0.403832, 0.596168),
    (0, 10, 0.0, 0.277533),
    (10, 10, 0.722467, 1.0),
    (1, 3, 0.061492, 0.792340),
    (350, 461, 0.718150, 0.796004),
])
def test_wilson_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=2e-6)


def test_wilson_rejects_impossible_counts_and_handles_empty():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ConfigError):
        wilson_interval(5, 3)


def _wilson_closed_form(k: int, n: int, z: float) -> tuple[float, float]:
    """The textbook Wilson score interval (no continuity correction), written out as the reference."""
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 100, 461, 5000])
@pytest.mark.parametrize("z", [1.959963984540054, 1.96, 2.5758293035489])
def test_wilson_matches_the_closed_form_on_a_table(n, z):
    from tpru_agent.finetune.eval.heldout import wilson_interval as heldout_wilson

    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        got = wilson_interval(k, n, z)
        assert got == pytest.approx(_wilson_closed_form(k, n, z), abs=1e-9), (k, n, z)
        assert all(type(x) is float for x in got)  # plain floats: report.json, not numpy scalars
        if z == 1.96:
            assert heldout_wilson(k, n) == pytest.approx(got, abs=1e-12)
    assert wilson_interval(0, n, z)[0] == 0.0 and wilson_interval(n, n, z)[1] == 1.0


def test_mcnemar_matches_binomial_sums_of_exact_integers():
    for b in range(0, 31, 3):
        for c in range(0, 41, 4):
            n, k = b + c, min(b, c)
            if n == 0:
                continue
            tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
            result = mcnemar(b, c)
            assert result.p_exact == pytest.approx(min(1.0, 2 * tail), rel=1e-9), (b, c)
            assert result.p_mid == pytest.approx(min(1.0, 2 * tail - math.comb(n, k) / 2 ** n), rel=1e-9), (b, c)
            assert type(result.p_exact) is float and type(result.p_mid) is float
    with pytest.raises(ConfigError, match="must be >= 0"):
        mcnemar(-1, 3)


@pytest.mark.parametrize("b, c, exact, mid", [
    (10, 2, 158 / 4096, 92 / 4096),    # P(X<=2 | n=12) = 79/4096; mid-p takes off half of P(X=2) = 66/4096
    (0, 5, 2 / 32, 1 / 32),
    (3, 3, 1.0, 1.0),                  # balanced discordance: no evidence at all
    (0, 0, 1.0, 1.0),
    (1, 0, 1.0, 0.5),
])
def test_mcnemar_on_hand_tables(b, c, exact, mid):
    result = mcnemar(b, c)
    assert result.p_exact == pytest.approx(exact, rel=1e-9)
    assert result.p_mid == pytest.approx(mid, rel=1e-9)
    assert mcnemar(c, b).p_mid == pytest.approx(mid, rel=1e-9)  # two-sided: symmetric


def test_calibration_and_percentile():
    ece, bins = calibration([0.95, 0.95, 0.65, 0.65, 0.15], [True, False, True, True, False], n_bins=10)
    # bins: 0.9-1.0 acc 0.5 conf 0.95 (2/5 of items), 0.6-0.7 acc 1 conf 0.65 (2/5), 0.1-0.2 acc 0 conf 0.15 (1/5)
    assert ece == pytest.approx(0.4 * 0.45 + 0.4 * 0.35 + 0.2 * 0.15)
    assert [b.n for b in bins] == [0, 1, 0, 0, 0, 0, 2, 0, 0, 2]
    assert calibration([1.0], [True], n_bins=4)[1][-1].n == 1  # confidence 1.0 falls in the last bin
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([], 50) is None and type(percentile([3, 1], 25)) is float
    with pytest.raises(ConfigError):
        calibration([1.2], [True])
    with pytest.raises(ConfigError, match="not a probability"):
        calibration([0.5, float("nan")], [True, False])
    with pytest.raises(ConfigError, match="0..100"):
        percentile([1.0], 101)


# ----------------------------------------------------------------------------------------------- parsing
OUR_QUESTIONS = [
    (ordering.build(4), "CABD"), (ordering.build(3, description="making coffee"), "BCA"),
    (ordering.build_mcq(4, ["ABCD", "DCBA", "BADC", "CABD"], none_position=2), "C"),
    (ordering.build_mcq(4, ["ABCD", "DCBA", "BADC", "CABD"], none_position=None), "A"),
    (next_frame.build(2, 4, with_goal=True, none_position=1), "B"),
    (next_frame.build(2, 4, with_goal=True, none_position=-1, description="opening the drawer"), "C"),
    (next_frame.build(3, 2, none_position=0), "B"),
    (previous.build(3, 4, none_position=0), "A"), (previous.build(2, 3, none_position=-1), "B"),
]


@pytest.mark.parametrize("built, answer", OUR_QUESTIONS, ids=lambda x: getattr(x, "task", x))
@pytest.mark.parametrize("with_task", [True, False])
def test_our_rendered_questions_round_trip(built, answer, with_task):
    got = question_from_problem(built.problem, answer, n_images=built.n_images, task=built.task if with_task else None)
    want = built.with_answer(answer, negative=answer == built.none_letter)
    for field in ("task", "labels", "options", "context_steps", "target_step", "answer", "negative", "problem"):
        assert getattr(got, field) == getattr(want, field), field


FOREIGN = [
    # (problem, answer, task, none letter, option values, context steps, target step)
    ("Here are frames 1, 2 and 4 of a task. Step 1: <image> Step 2: <image> Step 4: <image>\nWhich image is step 3?"
     "\n(A) <image>\n(B) <image>\n(C) None of the above\n(D) <image>\n(E) <image>", "D", "next", "C",
     (0, 1, None, 2, 3), (1, 2, 4), 3),
    ("Which frame happened before these? <image> <image> <image> Options: A: <image> B: <image> C: <image> "
     "D: <image> E: none of the choices provided.", "E", "previous", "E", (0, 1, 2, 3, None), (2, 3, 4), 1),
    ("These photos show the process of folding a towel. Image A: <image> Image B: <image> Image C: <image> "
     "Image D: <image> What is the correct order?", "BDCA", "ordering", None, (), (), None),
    ("Order the pictures:\n<image>\n<image>\n<image>\n<image>\nA. A -> B -> D -> C\nB. D, C, B, A\n"
     "C. None of the choices provided\nD. CABD", "A", "ordering_mcq", "C", ("ABDC", "DCBA", None, "CABD"), (), None),
]


@pytest.mark.parametrize("problem, answer, task, none, values, steps, target", FOREIGN)
def test_foreign_problem_texts_parse(problem, answer, task, none, values, steps, target):
    q = question_from_problem(problem, answer, n_images=problem.count("<image>"))
    assert (q.task, q.none_letter, q.context_steps, q.target_step) == (task, none, steps, target)
    assert tuple(o.value for o in q.options) == values
    assert q.problem == problem and q.answer == answer
    assert q.negative == (answer == none)


@pytest.mark.parametrize("problem, answer, n_images, match", [
    ("Image A: <image> Image B: <image>", "AB", 3, "placeholders"),
    ("Step 1: <image> Which is step 2? A. <image> B. <image>", "C", 3, "not a valid answer"),
    ("Image A: <image> Image B: <image> Which comes first?", "A", 2, "not a valid answer"),
    ("Which is next? <image> A. <image> B. A-B", "A", 2, "mix"),
])
def test_malformed_rows_raise_config_errors(problem, answer, n_images, match):
    with pytest.raises(ConfigError, match=match):
        question_from_problem(problem, answer, n_images=n_images)


def test_stray_letters_in_prose_are_not_options():
    text = "The 4 images are labelled A, B, C and D.\nImage A: <image>\nAnswer with a permutation such as D. C."
    assert parse_options(text) == []


# ----------------------------------------------------------------------------------------------- datasets
def oracle_rows(n_episodes: int, seed: int = 0) -> list[TPRURow]:
    """Rows of all four tasks over frames whose pixels encode their step (PixelOracle reads them)."""
    rng, rows = random.Random(seed), []
    for ep in range(n_episodes):
        domain = ("robot", "gui")[ep % 2]
        perm = rng.sample([1, 2, 3, 4], 4)
        q = ordering.build(4)
        truth = "".join(label for _, label in sorted(zip(perm, q.labels)))
        rows.append(TPRURow(q.problem, tuple(encode_png(frame(s)) for s in perm), truth, "ordering", domain, False,
                            f"e{ep}"))
        negative = ep % 3 == 0
        cands = rng.sample([5, 6, 7] + ([8] if negative else [3]), 4)
        q = next_frame.build(2, 4, with_goal=True, none_position=rng.randrange(5))
        answer = q.none_letter if negative else next(o.letter for o in q.options
                                                     if o.value is not None and cands[o.value] == 3)
        rows.append(TPRURow(q.problem, tuple(encode_png(frame(s)) for s in [1, 2, 4, *cands]), answer, "next", domain,
                            negative, f"e{ep}"))
        cands = rng.sample([5, 6, 7, 1], 4)
        q = previous.build(3, 4, none_position=rng.randrange(5))
        answer = next(o.letter for o in q.options if o.value is not None and cands[o.value] == 1)
        rows.append(TPRURow(q.problem, tuple(encode_png(frame(s)) for s in [2, 3, 4, *cands]), answer, "previous",
                            domain, False, f"e{ep}"))
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    write_parquet(oracle_rows(4), root / "test" / "part-0.parquet")
    write_parquet(oracle_rows(2, seed=1), root / "train" / "part-0.parquet")
    return root


def test_layouts_and_ids(dataset, tmp_path):
    test = open_dataset(dataset)
    assert test.describe()["files"] == ["test/part-0.parquet"] and len(test) == 12
    assert len(open_dataset(dataset, split="all")) == 18 and len(open_dataset(dataset, split="train")) == 6
    with pytest.raises(ConfigError, match="split"):
        open_dataset(dataset, split="validation")
    ids = [r.id for r in test]
    assert len(set(ids)) == 12 and ids == [r.id for r in open_dataset(dataset)]  # stable, distinct
    # Hub-style file names, duplicated rows, and an explicit id column
    rows = oracle_rows(1)
    write_parquet(rows + rows[:1], tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    hub = [r.id for r in open_dataset(tmp_path / "hub")]
    assert len(hub) == 4 and hub[3] == hub[0] + "~2"
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(dataset / "test" / "part-0.parquet").slice(0, 3)
    table = table.append_column("id", pa.array(["q1", "q2", "q3"]))
    pq.write_table(table.drop(["task", "negative"]), tmp_path / "ids.parquet")
    got = list(open_dataset(tmp_path / "ids.parquet"))
    assert [r.id for r in got] == ["q1", "q2", "q3"]
    assert [r.question().task for r in got] == ["ordering", "next", "previous"]  # inferred: no task column


def test_saved_datasets_folder(dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = {"test": str(dataset / "test" / "part-0.parquet"), "train": str(dataset / "train" / "part-0.parquet")}
    datasets.load_dataset("parquet", data_files=files).save_to_disk(str(tmp_path / "saved"))
    saved = open_dataset(tmp_path / "saved")
    assert saved.split == "test" and len(saved) == 12
    assert [r.id for r in saved] == [r.id for r in open_dataset(dataset)]  # same content, same ids
    assert len(next(iter(saved)).images()) == 4


# ----------------------------------------------------------------------------------------------- runs
def _comparable(report: dict) -> dict:
    keep = ("accuracy", "per_task", "per_domain", "negatives", "positives", "parse_failures", "position_bias")
    out = {k: report[k] for k in keep}
    out["calibration"] = {k: report["calibration"][k] for k in ("n", "ece", "brier")}
    return out


def test_classic_run_report_and_files(dataset, tmp_path):
    report = run_eval(EvalConfig(model="classic", data=str(dataset), out=str(tmp_path / "run"), mode="fast"))
    acc = report["accuracy"]
    assert acc["n"] == 12 and acc["ci95"] == pytest.approx(list(wilson_interval(acc["correct"], 12)))
    assert set(report["per_task"]) == {"ordering", "next", "previous"} and set(report["per_domain"]) == {"gui", "robot"}
    assert report["negatives"]["n"] == 2 and report["engine"] == "classic"
    lines = (tmp_path / "run" / "items.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    assert len(items) == 12 and sum(i["correct"] for i in items) == acc["correct"]
    assert all(0.0 <= i["confidence"] <= 1.0 and i["prediction"] and i["raw"] for i in items)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["accuracy"] == acc
    for name in ("accuracy.png", "reliability.png"):
        assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(report["position_bias"]["choice"]["truth"].values()) == 8


def test_resume_after_interrupt_gives_the_same_report(dataset, tmp_path):
    config = EvalConfig(model="classic", data=str(dataset), out=str(tmp_path / "full"), mode="fast", plots=False)
    full = run_eval(config)

    def stop_after(k):
        def progress(done, total, record):
            if record is not None and done >= k:
                raise KeyboardInterrupt
        return progress

    config.out = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        run_eval(config, progress=stop_after(5))
    items = tmp_path / "cut" / "items.jsonl"
    assert len(items.read_text().splitlines()) == 5
    with open(items, "a") as fh:  # a write torn by a kill
        fh.write('{"id": "torn", "corr')
    seen = []
    resumed = run_eval(config, progress=lambda d, t, r: seen.append(r and r["id"]))
    assert seen[0] is None and len([s for s in seen if s]) == 7  # only the 7 missing items ran
    assert _comparable(resumed) == _comparable(full)
    assert len(items.read_text().splitlines()) == 12
    # the classic engine has no reasoning mode: mode="reason" is the fast run already there, nothing re-runs
    seen.clear()
    as_reason = run_eval(EvalConfig(model="classic", data=str(dataset), out=config.out, mode="reason", plots=False),
                         progress=lambda d, t, r: seen.append(r and r["id"]))
    assert as_reason["mode"] == "fast" and not any(seen) and _comparable(as_reason) == _comparable(full)
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["mode"] == "fast"
    with pytest.raises(ConfigError, match="debias"):
        run_eval(EvalConfig(model="classic", data=str(dataset), out=config.out, mode="fast", debias=2, plots=False))
    again = run_eval(EvalConfig(model="classic", data=str(dataset), out=config.out, mode="fast", debias=2,
                                plots=False), overwrite=True)
    assert again["debias"] == 2 and again["accuracy"]["n"] == 12


def test_debias_maps_shifted_answers_back(dataset, tmp_path):
    oracle = PixelOracle()
    report = run_eval(EvalConfig(model="oracle", data=str(dataset), out=str(tmp_path / "o"), mode="fast", debias=4,
                                 plots=False), model=TPRU(engine=oracle))
    assert report["accuracy"]["value"] == 1.0
    items = [json.loads(x) for x in (tmp_path / "o" / "items.jsonl").read_text().splitlines()]
    # The oracle scores the right letter 0 and the 4 others -4 under every shift: the average keeps that.
    want = 1 / (1 + 4 * math.exp(-4))
    assert all(i["confidence"] == pytest.approx(want) for i in items if i["task"] != "ordering")
    # the report counts the scoring passes the model really made (4 orderings once, 8 choices over 4 shifts each)
    assert oracle.score_calls >= 4 + 8 * 4 and sum(i["calls"] for i in items) == oracle.score_calls
    assert report["latency"]["calls_per_item"] == pytest.approx(oracle.score_calls / 12)


def test_parse_failures_count_as_wrong_and_keep_the_raw_text(dataset, tmp_path):
    report = run_eval(EvalConfig(model="oracle", data=str(dataset), out=str(tmp_path / "p"), mode="reason", limit=4,
                                 plots=False), model=TPRU(engine=PixelOracle(reply="I think it is the second one")))
    assert report["parse_failures"] == {"count": 4, "rate": 1.0} and report["accuracy"]["correct"] == 0
    items = [json.loads(x) for x in (tmp_path / "p" / "items.jsonl").read_text().splitlines()]
    assert all(i["status"] == "parse_error" and i["raw"] == "I think it is the second one" for i in items)
    assert report["calibration"]["n"] == 0 and report["calibration"]["ece"] is None


def test_tiny_qwen_fast_and_reason(dataset, tmp_path, tiny_checkpoint):
    model = TPRU(str(tiny_checkpoint), engine="hf", device="cpu", max_new_tokens=6)
    fast = run_eval(EvalConfig(model=str(tiny_checkpoint), data=str(dataset), out=str(tmp_path / "f"), mode="fast",
                               limit=6, plots=False), model=model)
    assert fast["accuracy"]["n"] == 6 and fast["engine"] == "hf" and fast["parse_failures"]["count"] == 0
    assert fast["calibration"]["n"] == 6 and fast["latency"]["p50_s"] > 0
    reason = run_eval(EvalConfig(model=str(tiny_checkpoint), data=str(dataset), out=str(tmp_path / "r"),
                                 mode="reason", limit=3, plots=False), model=model)
    items = [json.loads(x) for x in (tmp_path / "r" / "items.jsonl").read_text().splitlines()]
    assert reason["parse_failures"]["count"] == sum(i["status"] == "parse_error" for i in items)
    assert all(not i["correct"] for i in items if i["status"] == "parse_error")


def test_compare_runs_with_mcnemar(dataset, tmp_path):
    run_eval(EvalConfig(model="classic", data=str(dataset), out=str(tmp_path / "a"), mode="fast", plots=False))
    run_eval(EvalConfig(model="oracle", data=str(dataset), out=str(tmp_path / "b"), mode="fast", plots=False),
             model=TPRU(engine=PixelOracle()))
    diff = compare_reports(tmp_path / "a" / "report.json", tmp_path / "b")
    lines = (tmp_path / "a" / "items.jsonl").read_text().splitlines()
    a = {json.loads(x)["id"]: json.loads(x)["correct"] for x in lines}
    only_b = sum(not ok for ok in a.values())  # the oracle is always right
    overall = diff["overall"]
    assert overall["n"] == 12 and overall["a_only_right"] == 0 and overall["b_only_right"] == only_b
    assert overall["p_mid"] == pytest.approx(mcnemar(0, only_b).p_mid) and diff["changed_count"] == only_b
    from tpru_agent.cli.main import cli

    result = CliRunner().invoke(cli, ["eval", "compare", str(tmp_path / "a" / "report.json"),
                                      str(tmp_path / "b" / "report.json"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["overall"]["b_only_right"] == only_b
    # a rerun over fewer rows keeps the older items in items.jsonl; the comparison covers only the report's items
    run_eval(EvalConfig(model="classic", data=str(dataset), out=str(tmp_path / "a"), mode="fast", plots=False,
                        limit=4))
    assert compare_reports(tmp_path / "a", tmp_path / "b")["overall"]["n"] == 4


def test_cli_eval_run(dataset, tmp_path):
    from tpru_agent.cli.main import cli

    args = ["eval", "run", "-m", "classic", "-d", str(dataset), "-o", str(tmp_path / "c"), "--mode", "fast",
            "--limit", "3", "--no-plots"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy"]["n"] == 3
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and "overall" in table.output and "95% interval" in table.output
    bad = CliRunner().invoke(cli, ["eval", "run", "-m", "classic", "-d", str(dataset), "-o", str(tmp_path / "c"),
                                   "--mode", "fast", "--debias", "2", "--limit", "3"])
    assert bad.exit_code == 1 and "other settings" in bad.output and "debias" in bad.output
    # classic has no reasoning mode: --mode reason runs (and is recorded as) fast, so it resumes the fast run above
    reason = CliRunner().invoke(cli, [*args[:-4], "reason", "--limit", "3", "--no-plots", "--json"])
    assert reason.exit_code == 0, reason.output
    assert json.loads(reason.stdout)["mode"] == "fast"
    warnings = [line for line in reason.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no reasoning mode" in warnings[0] and "fast" in warnings[0]
    short = CliRunner().invoke(cli, ["eval", *args[2:], "--json"])  # `tpru eval --model ...` means `eval run`
    assert short.exit_code == 0, short.output
    assert json.loads(short.output)["accuracy"]["n"] == 3


@pytest.mark.parametrize("bad", [dict(data=""), dict(mode="slow"), dict(limit=0), dict(debias=2, mode="reason"),
                                 dict(bins=0)])
def test_config_checks_name_the_problem(bad):
    with pytest.raises(ConfigError):
        EvalConfig(**{"data": "somewhere", **bad}).check()


def test_engine_classic_alone_runs_and_pixel_budget_is_an_option(dataset, tmp_path):
    from tpru_agent.cli.main import cli

    args = ["eval", "run", "--engine", "classic", "-d", str(dataset), "--mode", "fast", "--limit", "2", "--no-plots",
            "--json"]
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy"]["n"] == 2
    missing = CliRunner().invoke(cli, ["eval", "run", "-d", str(dataset)])
    assert missing.exit_code == 2 and "--engine classic" in missing.output
    with CliRunner().isolated_filesystem(temp_dir=tmp_path) as cwd:  # the default folder names the mode that ran
        default = CliRunner().invoke(cli, ["eval", "run", "--engine", "classic", "-d", str(dataset), "--limit", "1",
                                           "--no-plots", "--json"])
        assert default.exit_code == 0, default.output
        assert json.loads(default.stdout)["mode"] == "fast" and "warning" not in default.stderr  # reason by default
        assert (Path(cwd) / "runs" / "eval" / "classic-fast" / "report.json").is_file()
    from tpru_agent.finetune.eval.run import open_model

    tpru = open_model(EvalConfig(model="classic", data=str(dataset), engine="classic", max_pixels=12544))
    assert tpru.budget.max_pixels == 12544 and tpru.budget.min_pixels == 12544


def test_compare_refuses_a_dataset_manifest(dataset, tmp_path):
    from tpru_agent.cli.main import cli

    run_eval(EvalConfig(model="classic", data=str(dataset), out=str(tmp_path / "a"), mode="fast", plots=False,
                        limit=2))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": "tpru-data/1", "content_hash": "abc", "samples": {}}))
    result = CliRunner().invoke(cli, ["eval", "compare", str(manifest), str(tmp_path / "a" / "report.json")])
    assert result.exit_code == 1 and "dataset manifest" in result.stderr and "not a report" in result.stderr
