"""The ``mllm-ref`` command line.

    mllm-ref tour [--json] [--only FAMILY]       every model-level technique on the tiny VLM, accuracy vs cost
    mllm-ref eval [--json] [--variant NAME] [--technique ID] [--question-after-image]
                                                 held-out accuracy of the bundled model (or a connector variant,
                                                 or a model-level technique's default setting)
    mllm-ref list [--json]                       the coverage table of the registry
    mllm-ref check ID --impl numba|torch|module:function [--json]
    mllm-ref vectors ID --out DIR                golden test vectors
    mllm-ref bench [ID] [--json] [--quick]       reference vs fast paths, against this machine's limits
    mllm-ref grade EXERCISE SUBMISSION [--json] [--timeout S] [--csv scores.csv]
    mllm-ref exercise EXERCISE --out DIR [--blank]

Each command is one ``_add_*`` function (its arguments) and one ``_run_*`` function, listed in :data:`COMMANDS`.
"""

from __future__ import annotations

import os

# The references run many small matrix products (one token at a time when decoding); a multi-threaded BLAS is
# slower on those and stalls badly when another process holds the other core. One BLAS thread, unless the user
# chose otherwise; this must happen before NumPy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _progress_bar(label: str):
    """A progress callback ``(done, total)`` drawing a bar on stderr."""
    last = [-1]

    def update(done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if pct == last[0] and done != total:
            return
        last[0] = pct
        bar = "#" * (pct // 4) + "." * (25 - pct // 4)
        sys.stderr.write(f"\r{label[:32]:32s} [{bar}] {done}/{total}" + ("\n" if done == total else ""))
        sys.stderr.flush()

    return update


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- list


def _add_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list")


def coverage() -> list[dict]:
    """One row per technique: ``{id, family, paper, reference, numba, torch, chapter, exercise}``."""
    from mllm_ref.oracle import registry

    rows = []
    for t in registry.all_techniques():
        row = {"id": t.id, "family": t.family, "paper": t.paper, "reference": t.reference_path}
        for backend in registry.BACKENDS:
            row[backend] = t.fast_path_path(backend) if t.fast_path(backend) is not None else None
        row.update({"chapter": t.chapter, "exercise": t.exercise, "model_level": t.model_level, "notes": t.notes})
        rows.append(row)
    return rows


def _run_list(args: argparse.Namespace) -> int:
    rows = coverage()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    def mark(path):
        return "yes" if path else "-"

    print(
        _table(
            ["technique", "reference", "numba", "torch", "chapter", "exercise"],
            [[r["id"], r["reference"], mark(r["numba"]), mark(r["torch"]), r["chapter"] or "-", r["exercise"] or "-"] for r in rows],
        )
    )
    fast = sum(1 for r in rows if r["numba"] or r["torch"])
    print(f"\n{len(rows)} techniques, {fast} with a fast path")
    return 0


# ---------------------------------------------------------------- check


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="technique id, e.g. nn.attention")
    p.add_argument("--impl", required=True, help="numba, torch, module:function or path/file.py:function")
    p.add_argument("--seed", type=int, default=0, help="seed of the cases (default 0)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")


def _run_check(args: argparse.Namespace) -> int:
    from mllm_ref.oracle.check import check

    verdict = check(args.id, args.impl, seed=args.seed)
    if args.json:
        out = {"id": args.id, "impl": args.impl}
        out.update(verdict.to_json())
        print(json.dumps(out, indent=2))
    else:
        print(("PASS " if verdict.passed else "FAIL ") + verdict.message)
    return 0 if verdict.passed else 1


# ---------------------------------------------------------------- vectors


def _add_vectors(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="technique id")
    p.add_argument("--out", required=True, help="folder to write the vectors into")
    p.add_argument("--seed", type=int, default=0, help="seed of the cases (default 0)")


def _run_vectors(args: argparse.Namespace) -> int:
    from mllm_ref.oracle.vectors import write_vectors

    path = write_vectors(args.id, args.out, seed=args.seed)
    cases = json.loads(path.read_text())["cases"]
    print(f"wrote {len(cases)} cases ({', '.join(c['file'] for c in cases)}) and {path}")
    return 0


# ---------------------------------------------------------------- bench


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", nargs="?", default=None, help="one technique (default: all)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quick", action="store_true", help="shorter timings (a smoke run)")


def _run_bench(args: argparse.Namespace) -> int:
    from mllm_ref.oracle import registry
    from mllm_ref.oracle.bench import bench, format_rows
    from mllm_ref.oracle.machine import machine_limits, threads

    if args.id is not None:
        registry.get(args.id)  # an unknown id fails before the machine is measured

    def say(message: str) -> None:
        sys.stderr.write(f"\r{message[:70]:70s}")
        sys.stderr.flush()

    say("measuring this machine's memory bandwidth and matmul speed")
    limits = machine_limits(args.quick)
    rows = bench(args.id, quick=args.quick, limits=limits, progress=lambda m: say(f"timing {m}"))
    say("")  # clear the progress line
    sys.stderr.write("\r")
    if args.json:
        print(json.dumps({"limits": limits, "threads": threads(), "rows": rows}, indent=2))
    else:
        print(format_rows(rows, limits))
    return 0


# ---------------------------------------------------------------- eval


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--n", type=int, default=100, help="held-out questions per type (6 types)")
    p.add_argument("--captions", type=int, default=100, help="held-out images to caption")
    p.add_argument("--weights", default=None, help="folder with tinyvlm.npz and manifest.json (default: shipped)")
    p.add_argument("--variant", default=None, help="a shipped connector variant (e.g. qformer16) on the shipped model")
    p.add_argument("--technique", default=None,
                   help="a model-level technique id (e.g. kvcache.kivi): evaluate with its default setting")
    p.add_argument("--question-after-image", action="store_true",
                   help="prefill the image and <bos> only, then read the question through the cache "
                        "(on by default for the KV-cache techniques)")


def _run_eval(args: argparse.Namespace) -> int:
    from mllm_ref.tinyvlm.evaluate import evaluate
    from mllm_ref.tinyvlm.model import load
    from mllm_ref.tinyvlm.plugs import NONE
    from mllm_ref.tinyvlm.variants import available, load_variant

    model = load(args.weights)
    if args.variant is not None:
        if args.variant not in available():
            print(f"error: no connector variant {args.variant!r}; shipped: {', '.join(available()) or 'none'}",
                  file=sys.stderr)  # fmt: skip
            return 2
        model = load_variant(args.variant, model)
    plugs, after = NONE, bool(args.question_after_image)
    if args.technique is not None:
        from mllm_ref.oracle import registry

        tech = registry.get(args.technique)
        if not tech.model_level or not ({"plugs", "rows", "model_rows"} & set(tech.extra)):
            print(f"error: {args.technique} does not plug into the tiny VLM", file=sys.stderr)
            return 2
        if "plugs" in tech.extra:
            plugs = tech.extra["plugs"](model)
        elif "rows" in tech.extra:
            plugs = tech.extra["rows"](model)[0][1]
        else:
            _, model, plugs = tech.extra["model_rows"](model)[0]
        after = after or bool(tech.extra.get("question_after_image", False))
    result = evaluate(model, args.n, n_captions=args.captions, plugs=plugs, question_after_image=after,
                      progress=None if args.json else _progress_bar("eval"))  # fmt: skip
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(f"held-out VQA accuracy: {result.accuracy:.3f} (n={result.n}, mean over question types)")
    for qtype, acc in result.by_type.items():
        print(f"  {qtype:9s} {acc:.3f}")
    if result.caption_exact_match is not None:
        print(f"caption exact match: {result.caption_exact_match:.3f} (n={result.n_captions})")
    if result.decode_layers is not None:
        print(f"decoder layers per decode step: {result.decode_layers:.2f} of {model.config.layers}")
    return 0


# ---------------------------------------------------------------- tour


def _add_tour(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--only", default=None, help="only the techniques of this family")
    p.add_argument("--n", type=int, default=30, help="held-out questions per type")
    p.add_argument("--captions", type=int, default=20, help="held-out images to caption")
    p.add_argument("--out", default="build/tour", help="folder for tour.json and tour.png")


def _run_tour(args: argparse.Namespace) -> int:
    from mllm_ref.oracle import registry
    from mllm_ref.tinyvlm.model import load
    from mllm_ref.tinyvlm.tour import format_table, run_tour

    if args.only is not None and args.only not in registry.FAMILIES:
        print(f"error: unknown family {args.only!r}; families: {', '.join(registry.FAMILIES)}", file=sys.stderr)
        return 2
    model = load()
    bars: dict[str, object] = {}

    def progress(tid: str, done: int, total: int) -> None:
        bars.setdefault(tid, _progress_bar(tid))(done, total)

    rows = run_tour(model, only=args.only, n_per_type=args.n, n_captions=args.captions, progress=None if args.json else progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tour.json").write_text(json.dumps(rows, indent=2) + "\n")
    try:
        from mllm_ref.viz import tour_plot

        tour_plot(rows, out / "tour.png")
        note = f"wrote {out / 'tour.json'} and {out / 'tour.png'}"
    except ImportError:
        note = f"wrote {out / 'tour.json'} (matplotlib is not installed: no plot)"
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        if len(rows) == 1:
            print("\n(only the baseline: no model-level technique is registered yet)")
        others = [t for t in registry.all_techniques(args.only) if not t.model_level]
        if others and args.only is not None and len(rows) > 1:
            print("\nnot run on the tiny VLM (references with tests; see their notes):")
            for t in others:
                print(f"  {t.id:24s} {t.notes}")
        print(note)
    return 0


# ---------------------------------------------------------------- speculate


def _add_speculate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], help="draft lengths to try")
    p.add_argument("--captions", type=int, default=30, help="held-out images to caption")
    p.add_argument("--repeats", type=int, default=3, help="runs per method and image (the fastest counts)")
    p.add_argument("--all", action="store_true",
                   help="also the text-only drafter, the token tree, Medusa and self-speculation")


def speculate_strategies(ks, with_others: bool) -> dict:
    """The strategies ``mllm-ref speculate`` times: plain greedy decoding through the strategies' own cache code
    (one target forward per token), greedy speculative decoding with the drafter that sees the image, one per
    ``k``, and with ``with_others`` the other greedy strategies at their tour settings."""
    from mllm_ref.decoding.medusa import MedusaDecoding, load_heads
    from mllm_ref.decoding.multimodal import load_drafter
    from mllm_ref.decoding.self_speculative import SelfSpeculative, load_exit_heads
    from mllm_ref.decoding.speculative import SpeculativeDecoding
    from mllm_ref.decoding.tree import TreeSpeculative

    from mllm_ref.decoding.sampling import PlainDecoding

    drafter = load_drafter(True)
    out = {"plain greedy, strategies' cache code": PlainDecoding().plugs()}
    out.update({f"speculative k={k}": SpeculativeDecoding(drafter, k=k).plugs() for k in ks})
    if with_others:
        out["speculative text-only k=4"] = SpeculativeDecoding(load_drafter(False), k=4).plugs()
        out["tree 2-2-1-1"] = TreeSpeculative(drafter, (2, 2, 1, 1)).plugs()
        out["medusa 3 heads"] = MedusaDecoding(load_heads()).plugs()
        heads = load_exit_heads()
        out["self-speculative E=4 k=4"] = SelfSpeculative(heads, 4, 4).plugs()
        out["self-speculative E=6 k=4"] = SelfSpeculative(heads, 6, 4).plugs()
    return out


def _run_speculate(args: argparse.Namespace) -> int:
    from mllm_ref.decoding._speedup import caption_speedup, format_rows
    from mllm_ref.tinyvlm.model import load

    if any(k < 1 for k in args.k):
        print("error: --k values must be >= 1", file=sys.stderr)
        return 2
    rows = caption_speedup(load(), speculate_strategies(args.k, args.all), n_captions=args.captions,
                           repeats=args.repeats, progress=None if args.json else _progress_bar("speculate"))  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_rows(rows))
    greedy = [r for r in rows if r["name"].startswith("speculative k=")]
    if greedy:
        best = max(greedy, key=lambda r: r["decode_speedup"])
        print(f"best k: {best['name']}: decode x{best['decode_speedup']:.2f}, end to end x{best['end_to_end_speedup']:.2f}, "
              f"identical to plain greedy: {'yes' if best['identical'] else 'no'}")  # fmt: skip
    return 0


# ---------------------------------------------------------------- grade


def _add_grade(p: argparse.ArgumentParser) -> None:
    p.add_argument("exercise", help="exercise folder name under exercises/ (or its number, or a path)")
    p.add_argument("submission", help="a .py or .ipynb submission, or with --csv a folder of them")
    p.add_argument("--json", action="store_true", help="print {exercise, score, max_score, tasks} as JSON")
    p.add_argument("--timeout", type=float, default=60.0, help="wall-clock limit per submission, seconds (default 60)")
    p.add_argument("--memory-mb", type=int, default=2048, help="address-space limit of the grader process (default 2048)")
    p.add_argument("--csv", default=None, help="grade every .py/.ipynb of the SUBMISSION folder into this CSV")


def _run_grade(args: argparse.Namespace) -> int:
    from mllm_ref.oracle.grade import format_result, grade, grade_folder

    if args.csv is not None:
        results = grade_folder(args.exercise, args.submission, csv_path=args.csv, timeout=args.timeout, memory_mb=args.memory_mb)
        if args.json:
            print(json.dumps([{k: r[k] for k in ("submission", "score", "max_score")} for r in results], indent=2))
        else:
            print(_table(["submission", "score"], [[Path(r["submission"]).name, f"{r['score']}/{r['max_score']}"] for r in results]))
            print(f"\nwrote {args.csv} ({len(results)} submissions)")
        return 0
    result = grade(args.exercise, args.submission, timeout=args.timeout, memory_mb=args.memory_mb)
    if args.json:
        tasks = [{"name": t["name"], "passed": t["passed"], "points": t["points"], "max_points": t["max_points"], "message": t["message"]} for t in result["tasks"]]
        print(json.dumps({"exercise": result["exercise"], "score": result["score"], "max_score": result["max_score"], "tasks": tasks}, indent=2))
    else:
        print(format_result(result))
    return 0 if result["score"] == result["max_score"] else 1


# ---------------------------------------------------------------- exercise


def _add_exercise(p: argparse.ArgumentParser) -> None:
    p.add_argument("exercise", help="exercise folder name under exercises/ (or its number, or a path)")
    p.add_argument("--out", required=True, help="folder to write the handout into")
    p.add_argument("--blank", action="store_true", help="write only the blank submission (student.py as is)")


def _run_exercise(args: argparse.Namespace) -> int:
    from mllm_ref.oracle.grade import write_handout

    written = write_handout(args.exercise, args.out, blank=args.blank)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


COMMANDS = {
    "tour": (_add_tour, _run_tour, "run every model-level technique on the bundled tiny VLM"),
    "eval": (_add_eval, _run_eval, "held-out accuracy of the bundled tiny VLM"),
    "list": (_add_list, _run_list, "the registered techniques and their coverage"),
    "check": (_add_check, _run_check, "judge an implementation against the reference"),
    "vectors": (_add_vectors, _run_vectors, "write golden test vectors"),
    "bench": (_add_bench, _run_bench, "time the reference and the fast paths"),
    "speculate": (_add_speculate, _run_speculate, "time speculative decoding against plain decoding on captions"),
    "grade": (_add_grade, _run_grade, "grade a student's submission to an exercise (sandboxed)"),
    "exercise": (_add_exercise, _run_exercise, "write an exercise's handout (statement.md, student.py)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mllm-ref", description="References and oracle for efficient multimodal LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError) as exc:
        # What the user asked for is wrong: an unknown technique id (the message lists the known ones), an
        # implementation that cannot be found, weights that do not match their manifest. No traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
