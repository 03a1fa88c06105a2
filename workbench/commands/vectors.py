"""``workbench vectors``: run ds4's test vectors against a model, with the fixture of its checkpoint.

A fixture belongs to one checkpoint (the vectors README): a GGUF whose file name or
``general.*`` metadata carries ``0731`` is checked against ``flash-0731/``, any other
against the pre-0731 files at the top of the test-vectors folder (``--checkpoint``
overrides). Each fixture has two parts, both run:

* **official** (``official.vec``, captured from the DeepSeek API at temperature 0),
  ds4's criteria (ds4-architecture §6.4), per case: prompt =
  ``⟨BOS⟩⟨User⟩text⟨Assistant⟩</think>`` (ds4's ``encode_chat_prompt``); a session
  with the case's context; prefill; at each step the greedy token's bytes must equal the
  official token's, and each official top token must be among the local top 20 with
  ``|local logprob - official logprob| <= 4``; then the greedy token is fed.
  ``long_memory_archive`` is disabled in ds4's test on pre-0731 (off here unless ``--all``).
* **local golden** (``local-golden.vec``, ds4's own top-64 logits): the prompt file
  tokenized as plain text (``text`` mode: no BOS, no template), the first ``frontier``
  tokens prefilled in a session of the case's context; the next-token logits must have
  ds4's top-1, at least 4 of its top 5 among the local top 5, 15 of 20 among 20, 40 of 64
  among 64, and ``|logit - ds4's|`` at most 8 on each of ds4's top 20.

Paths inside ``.vec`` files are relative to ds4's repository; they are mapped onto the
test-vectors folder. Passing needs the real model; on a synthetic one the harness reports
the failures.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.chat import encode_single
from workbench.commands.common import number
from workbench.errors import WorkbenchError
from workbench.sampling import log_softmax
from workbench.session import Session, load
from workbench.tokenizer import Tokenizer

HELP = "check a model against ds4's test vectors of its checkpoint (official top-20 log-probs, local-golden top-64)"
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "ds4" / "test-vectors"
LOCAL_TOP = 20
LOGPROB_TOL = 4.0
# disabled in ds4_test on the pre-0731 fixture only
DISABLED = {"long_memory_archive":
            "disabled in ds4_test on pre-0731 (official fixture disagrees after the Hadamard+FP4 indexer)"}
CHECKPOINT_0731, CHECKPOINT_PRE = "0731", "pre-0731"
FIXTURE_DIRS = {CHECKPOINT_0731: "flash-0731", CHECKPOINT_PRE: "."}
# ds4's local-golden thresholds: top-n overlap minimums and the largest logit difference on ds4's top 20
GOLDEN_OVERLAP = {5: 4, 20: 15, 64: 40}
GOLDEN_MAX_ABS = 8.0
# the API spells EOS like this in top_logprobs (§6.2); it means the EOS token
API_EOS = "<｜｜end▁of▁sentence｜｜>".encode()
EOS = "<｜end▁of▁sentence｜>".encode()


class VectorsError(WorkbenchError):
    """A vectors directory or file that cannot be read."""


@dataclass
class Step:
    index: int
    selected: bytes
    top: list[tuple[bytes, float]]


@dataclass
class Case:
    id: str
    ctx: int
    prompt_file: Path
    steps: list[Step] = field(default_factory=list)


def map_path(ds4_path: str, root: Path) -> Path:
    """A path from a ``.vec`` file (relative to ds4's repository) inside the test-vectors
    folder ``root``: ``tests/test-vectors/flash-0731/`` -> ``root/flash-0731/``,
    ``tests/test-vectors/flash-pre-0731/`` and ``tests/test-vectors/`` -> ``root/``,
    ``tests/`` -> ``root/``."""
    for prefix, sub in (("tests/test-vectors/flash-0731/", "flash-0731"), ("tests/test-vectors/flash-pre-0731/", "."),
                        ("tests/test-vectors/", "."), ("tests/", ".")):
        if ds4_path.startswith(prefix):
            return (root / sub / ds4_path[len(prefix):]).resolve()
    return (root / ds4_path).resolve()


def parse_vec(path: Path, root: Path | None = None) -> list[Case]:
    """Cases of an ``official.vec`` file; prompt paths mapped into ``root`` (the test-vectors
    folder; default: the prompt's file name in ``prompts/`` next to the file)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise VectorsError(f"{path}: cannot read: {err.strerror or err}") from None
    cases: list[Case] = []
    case: Case | None = None
    for n, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            if words[0] == "case":
                prompt = path.parent / "prompts" / Path(words[4]).name if root is None else map_path(words[4], root)
                case = Case(words[1], int(words[2]), prompt)
                cases.append(case)
            elif words[0] == "step" and case is not None:
                case.steps.append(Step(int(words[1]), bytes.fromhex(words[2]), []))
            elif words[0] == "top" and case is not None and case.steps:
                case.steps[-1].top.append((bytes.fromhex(words[1]), float(words[2])))
            elif words[0] == "end":
                case = None
            else:
                raise ValueError(words[0])
        except (IndexError, ValueError):
            raise VectorsError(f"{path}:{n}: malformed line {line!r}") from None
    return cases


def _show(b: bytes) -> str:
    return repr(b.decode("utf-8", errors="replace"))


@dataclass
class StepResult:
    step: int
    expected: str
    got: str
    got_id: int
    passed: bool
    problems: list[str]


@dataclass
class CaseResult:
    id: str
    status: str  # "pass", "fail" or "skip"
    prompt_tokens: int = 0
    reason: str = ""
    steps: list[StepResult] = field(default_factory=list)


def check_step(step: Step, logits: Any, tok: Tokenizer) -> StepResult:
    """ds4's two criteria for one step, on next-token logits ``[n_vocab]``."""
    lp = log_softmax(logits)
    order = np.lexsort((np.arange(lp.size), -lp))[:LOCAL_TOP]
    local = {tok.token_bytes(int(i)): float(lp[i]) for i in reversed(order)}  # best wins on duplicates
    best = int(order[0])
    got = tok.token_bytes(best)
    problems = []
    if got != step.selected:
        problems.append(f"greedy token {_show(got)} != official {_show(step.selected)}")
    for want, official in step.top:
        key = EOS if want == API_EOS else want
        if key not in local:
            problems.append(f"official top {_show(want)} not in the local top {LOCAL_TOP}")
        elif abs(local[key] - official) > LOGPROB_TOL:
            problems.append(f"official top {_show(want)}: local logprob {local[key]:.3f} vs official "
                            f"{official:.3f} (tolerance {LOGPROB_TOL})")
    return StepResult(step.index, _show(step.selected), _show(got), best, not problems, problems)


def run_case(base: Session, tok: Tokenizer, case: Case, ctx_cap: int | None) -> CaseResult:
    """Prefill the case's prompt in a fresh session of the case's ctx and check every step."""
    try:
        text = case.prompt_file.read_text(encoding="utf-8")
    except OSError as err:
        return CaseResult(case.id, "fail", reason=f"{case.prompt_file}: cannot read: {err.strerror or err}")
    ids = encode_single(tok, text)
    ctx = case.ctx if ctx_cap is None else min(case.ctx, ctx_cap)
    if len(ids) + len(case.steps) > ctx:
        return CaseResult(case.id, "fail", len(ids),
                          f"{len(ids)} prompt tokens + {len(case.steps)} steps exceed ctx {ctx}")
    s = Session(base.model, ctx)
    s.prefill(ids)
    res = CaseResult(case.id, "pass", len(ids))
    for k, step in enumerate(case.steps):
        r = check_step(step, s.logits, tok)
        res.steps.append(r)
        if k + 1 < len(case.steps):
            s.step(r.got_id)
    if not all(r.passed for r in res.steps):
        res.status = "fail"
    return res


# --- the fixture of a checkpoint -------------------------------------------------------------

def checkpoint_of(model: Path, metadata: dict[str, Any]) -> tuple[str, str]:
    """(checkpoint, why): "0731" when the file name or a ``general.*`` string of the GGUF
    metadata contains ``0731``, else "pre-0731"."""
    if CHECKPOINT_0731 in model.name:
        return CHECKPOINT_0731, f"file name {model.name!r} carries 0731"
    for key, value in metadata.items():
        if key.startswith("general.") and isinstance(value, str) and CHECKPOINT_0731 in value:
            return CHECKPOINT_0731, f"metadata {key} = {value!r} carries 0731"
    return CHECKPOINT_PRE, "neither the file name nor the general.* metadata carries 0731"


def fixture_dir(root: Path, checkpoint: str) -> Path:
    """The folder holding ``checkpoint``'s ``official.vec`` and ``local-golden.vec``; raises
    VectorsError when it lacks ``official.vec``."""
    d = (root / FIXTURE_DIRS[checkpoint]).resolve()
    if not (d / "official.vec").is_file():
        raise VectorsError(f"{d}: no official.vec for checkpoint {checkpoint} (--vectors is the test-vectors folder)")
    return d


# --- local golden --------------------------------------------------------------------------------

@dataclass
class GoldenCase:
    id: str
    mode: str  # "text", "rendered" or "chat"
    ctx: int
    frontier: int  # prompt tokens prefilled
    prompt_file: Path
    top: list[tuple[int, float]] = field(default_factory=list)  # ds4's (token id, logit), best first


@dataclass
class GoldenResult:
    id: str
    status: str  # "pass", "fail" or "skip"
    reason: str = ""
    top1: int = -1
    ref_top1: int = -1
    overlap: dict[int, int] = field(default_factory=dict)  # n -> ds4's top n found in the local top n
    top20_max_abs: float = 0.0
    problems: list[str] = field(default_factory=list)


def parse_golden(path: Path, root: Path) -> list[GoldenCase]:
    """Cases of a ``local-golden.vec`` file (``case <id> <mode> <ctx> <frontier> <prompt>
    <n>``, then n ``top <rank> <id> <logit>`` lines, ranks 0..n-1, then ``end``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise VectorsError(f"{path}: cannot read: {err.strerror or err}") from None
    cases: list[GoldenCase] = []
    want = 0
    for n, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            if words[0] == "case" and len(words) == 7:
                cases.append(GoldenCase(words[1], words[2], int(words[3]), int(words[4]), map_path(words[5], root)))
                want = int(words[6])
                if not 0 < cases[-1].frontier < cases[-1].ctx or want <= 0:
                    raise ValueError("frontier/ctx/top count")
            elif words[0] == "top" and len(words) == 4 and cases and int(words[1]) == len(cases[-1].top) < want:
                cases[-1].top.append((int(words[2]), float(words[3])))
            elif words[0] == "end" and cases and len(cases[-1].top) == want:
                want = 0
            else:
                raise ValueError(words[0])
        except ValueError:
            raise VectorsError(f"{path}:{n}: malformed line {line!r}") from None
    if want:
        raise VectorsError(f"{path}: case {cases[-1].id} has {len(cases[-1].top)} of {want} top lines and no end")
    return cases


def golden_prompt(tok: Tokenizer, mode: str, text: str) -> list[int]:
    """The token ids ds4's local-golden test builds for ``mode``."""
    if mode == "text":
        return tok.encode(text)
    if mode == "rendered":
        return tok.encode_rendered(text)
    if mode == "chat":
        return encode_single(tok, text)
    raise VectorsError(f"unknown local-golden prompt mode {mode!r} (text, rendered or chat)")


def check_golden(case: GoldenCase, logits: Any) -> GoldenResult:
    """ds4's local-golden criteria on next-token logits ``[n_vocab]``."""
    x = np.asarray(logits, dtype=np.float64)
    n_top = min(len(case.top), x.size)
    local = np.lexsort((np.arange(x.size), -x))[:n_top]
    ref = [i for i, _ in case.top]
    res = GoldenResult(case.id, "pass", top1=int(local[0]), ref_top1=ref[0])
    for n in GOLDEN_OVERLAP:
        if n <= n_top:
            res.overlap[n] = len(set(ref[:n]) & set(local[:n].tolist()))
    res.top20_max_abs = max(abs(float(x[i]) - v) if 0 <= i < x.size else float("inf") for i, v in case.top[:20])
    if res.top1 != res.ref_top1:
        res.problems.append(f"top-1 token {res.top1} != ds4's {res.ref_top1}")
    for n, got in res.overlap.items():
        if got < GOLDEN_OVERLAP[n]:
            res.problems.append(f"top-{n} overlap {got}/{n} < {GOLDEN_OVERLAP[n]}")
    if res.top20_max_abs > GOLDEN_MAX_ABS:
        res.problems.append(f"top-20 max |logit difference| {res.top20_max_abs:.3f} > {GOLDEN_MAX_ABS}")
    res.status = "fail" if res.problems else "pass"
    return res


def run_golden(base: Session, tok: Tokenizer, case: GoldenCase, ctx_cap: int | None) -> GoldenResult:
    """Prefill the case's first ``frontier`` prompt tokens in a fresh session and check the logits."""
    try:
        text = case.prompt_file.read_text(encoding="utf-8")
    except OSError as err:
        return GoldenResult(case.id, "fail", reason=f"{case.prompt_file}: cannot read: {err.strerror or err}")
    ids = golden_prompt(tok, case.mode, text)
    ctx = case.ctx if ctx_cap is None else min(case.ctx, ctx_cap)
    if len(ids) < case.frontier:
        return GoldenResult(case.id, "fail",
                            reason=f"{len(ids)} prompt tokens, fewer than the frontier {case.frontier}")
    if case.frontier > ctx:
        return GoldenResult(case.id, "fail", reason=f"frontier {case.frontier} exceeds ctx {ctx}")
    s = Session(base.model, ctx)
    s.prefill(ids[: case.frontier])
    return check_golden(case, s.logits)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="ds4 GGUF file")
    parser.add_argument("--vectors", default=str(DEFAULT_DIR),
                        help="test-vectors folder (pre-0731 files at its top, flash-0731/ below it)")
    parser.add_argument("--checkpoint", choices=("auto", CHECKPOINT_0731, CHECKPOINT_PRE), default="auto",
                        help="which checkpoint's fixture to use (default auto: 0731 when the file name or "
                             "general.* metadata carries 0731)")
    parser.add_argument("--only", action="append", default=[], metavar="ID",
                        help="run only this case, official or local-golden (repeatable)")
    parser.add_argument("--skip-long", action="store_true", help="skip cases whose prompt file exceeds 4 KiB")
    parser.add_argument("--skip-golden", action="store_true", help="run only the official vectors")
    parser.add_argument("--all", action="store_true", help="also run the case ds4_test disables")
    parser.add_argument("--ctx", type=number(int, 1), default=None,
                        help="cap every case's context (default: the case's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


LONG_PROMPT_BYTES = 4096


def _skip_reason(case_id: str, prompt: Path, checkpoint: str, args: argparse.Namespace) -> str:
    if case_id in DISABLED and checkpoint == CHECKPOINT_PRE and not args.all and case_id not in args.only:
        return DISABLED[case_id]
    if args.skip_long and prompt.is_file() and prompt.stat().st_size > LONG_PROMPT_BYTES:
        return "long prompt (--skip-long)"
    return ""


def select(cases: list[Case], golden: list[GoldenCase], checkpoint: str,
           args: argparse.Namespace) -> tuple[list[tuple[Case, str]], list[tuple[GoldenCase, str]]]:
    """The official and local-golden cases to run, each with its skip reason ("" to run), in file order."""
    wanted = lambda case_id: not args.only or case_id in args.only  # noqa: E731
    unknown = set(args.only) - {c.id for c in cases} - {g.id for g in golden}
    if unknown:
        raise VectorsError(f"no such case: {', '.join(sorted(unknown))}")
    return ([(c, _skip_reason(c.id, c.prompt_file, checkpoint, args)) for c in cases if wanted(c.id)],
            [(g, _skip_reason(g.id, g.prompt_file, checkpoint, args)) for g in golden if wanted(g.id)])


def print_case(r: CaseResult) -> None:
    head = f"{r.status.upper():4} {r.id}"
    if r.prompt_tokens:
        head += f" ({r.prompt_tokens} prompt tokens)"
    print(head + (f": {r.reason}" if r.reason else ""))
    for st in r.steps:
        mark = "ok  " if st.passed else "FAIL"
        print(f"  step {st.step} {mark} expected {st.expected}, got {st.got}")
        for p in st.problems:
            print(f"       - {p}")


def print_golden(r: GoldenResult) -> None:
    head = f"{r.status.upper():4} local golden {r.id}"
    if r.reason:
        print(f"{head}: {r.reason}")
        return
    overlaps = " ".join(f"top{n} {k}/{n}" for n, k in r.overlap.items())
    print(f"{head}: top-1 {r.top1} (ds4 {r.ref_top1}), {overlaps}, top-20 max |dlogit| {r.top20_max_abs:.3f}")
    for p in r.problems:
        print(f"       - {p}")


def _counts(statuses: list[str]) -> dict[str, int]:
    return {k: sum(s == k for s in statuses) for k in ("pass", "fail", "skip")}


def run(args: argparse.Namespace) -> int:
    from workbench.gguf.reader import GGUFFile

    root, model = Path(args.vectors), Path(args.model)
    with GGUFFile(model) as f:
        found, why = checkpoint_of(model, f.metadata)
    checkpoint, why = (found, why) if args.checkpoint == "auto" else (args.checkpoint, "--checkpoint")
    fixture = fixture_dir(root, checkpoint)
    golden_vec = fixture / "local-golden.vec"
    golden = [] if args.skip_golden or not golden_vec.is_file() else parse_golden(golden_vec, root)
    cases, goldens = select(parse_vec(fixture / "official.vec", root), golden, checkpoint, args)
    if not args.json:
        print(f"fixture {fixture} (checkpoint {checkpoint}: {why})")
    ctx = max([c.ctx for c, _ in cases] + [g.ctx for g, _ in goldens] + [1]) if args.ctx is None else args.ctx
    base = load(args.model, ctx=ctx)
    try:
        tok = Tokenizer.from_gguf(base.file)
        results, golden_results = [], []
        for case, skip in cases:
            r = CaseResult(case.id, "skip", reason=skip) if skip else run_case(base, tok, case, args.ctx)
            results.append(r)
            if not args.json:
                print_case(r)
        for g, skip in goldens:
            gr = GoldenResult(g.id, "skip", reason=skip) if skip else run_golden(base, tok, g, args.ctx)
            golden_results.append(gr)
            if not args.json:
                print_golden(gr)
    finally:
        base.close()
    counts = _counts([r.status for r in results])
    golden_counts = _counts([r.status for r in golden_results])
    if args.json:
        print(json.dumps({"model": args.model, "checkpoint": checkpoint, "checkpoint_reason": why,
                          "fixture": str(fixture), "vectors": str(fixture / "official.vec"), **counts,
                          "cases": [asdict(r) for r in results],
                          "golden": {**golden_counts, "vectors": str(golden_vec) if golden else None,
                                     "cases": [asdict(r) for r in golden_results]}}, ensure_ascii=False))
    else:
        print(f"official: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped; "
              f"local golden: {golden_counts['pass']} passed, {golden_counts['fail']} failed, "
              f"{golden_counts['skip']} skipped")
    return 1 if counts["fail"] or golden_counts["fail"] else 0
