"""The project's GSM8K scorer (``evaluation.is_correct``, the fast in-loop signal of ``GSM8KEval``)
against lm-eval's ``gsm8k`` scoring, question by question, on the same generations.

lm-eval scores each generation twice: ``strict-match`` takes the number after the first ``#### `` (a
space, then digits, dots and commas), ``flexible-extract`` the last number-like run; either is then
compared as a string with the reference's final answer, after dropping commas, dollar signs, all
before ``#### `` and one trailing period. The project takes the number after the first ``####``
(spaces and a dollar sign allowed), else the last number, and compares numbers. So the project's
verdict is lm-eval's ``strict-match`` where that finds a ``#### N`` and ``flexible-extract`` where
it finds none, except where they differ by design (README, "Evaluate with lm-evaluation-harness"):

- the same number spelled differently: ``#### 41.0`` or ``5.00`` is the reference's ``41`` or ``5``
  to the project, a different string to lm-eval (both filters);
- punctuation after the last number: ``... is 41...`` is ``41.`` to lm-eval's flexible filter (it
  drops one period), 41 to the project.

Both sides run their real code: lm-eval's whole pipeline (task, filters, metric) through
``simple_evaluate`` with a language model that answers with canned generations; and, where a
committed ``eval`` result has them, the generations of SmolLM2-135M-Instruct on real GSM8K
questions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlora_lightning.evaluate.evaluation import extract_answer, is_correct, normalize_number
from tests.conftest import REPO

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from lm_eval.api.model import LM  # noqa: E402

from qlora_lightning.evaluate import lmeval  # noqa: E402

INVALID = "[invalid]"  # what lm-eval's regex filter answers when it finds nothing

# generation, reference's final number, then the verdicts: project, strict-match, flexible-extract,
# and why the project differs from lm-eval's verdict (strict where it matched, else flexible) if it
# does.
CASES = [
    (
        "He has 7 * 8 = 56 marbles.\nHe has 56 - 15 = 41 marbles left.\n#### 41",
        "41",
        True,
        True,
        True,
        None,
    ),
    ("56 - 15 = 41 left.\n#### 41.", "41", True, True, True, None),
    ("It costs 1,200 dollars.\n#### 1,200", "1200", True, True, True, None),
    ("#### -3", "-3", True, True, True, None),
    ("#### 41 marbles", "41", True, True, True, None),
    ("So he has 41 marbles left.", "41", True, False, True, None),  # no marker: the last number
    ("It costs $41.", "41", True, False, True, None),
    ("7 bags of 8 marbles make 56.", "41", False, False, False, None),
    ("####41", "41", True, False, True, None),  # strict wants "#### " (a space); flexible finds it
    (
        "#### $41",
        "41",
        True,
        False,
        True,
        None,
    ),  # strict wants digits after the space; flexible drops "$"
    (
        "#### 41\nThat is 3 more than 38.",
        "41",
        True,
        True,
        False,
        None,
    ),  # flexible takes the last number
    ("#### 40\n#### 41", "41", False, False, True, None),  # both take the first marked number
    ("#### 41.0", "41", True, False, False, "number spelling"),
    ("Each costs 5.00 dollars.\n#### 5.00", "5", True, False, False, "number spelling"),
    ("So the answer is 41...", "41", True, False, False, "punctuation after the number"),
    ("The answer is 12.50", "12.5", True, False, False, "number spelling"),
]


class CannedLM(LM):
    """Answers each gsm8k prompt with the canned generation of its question (0-shot: the prompt is
    ``Question: <question>\\nAnswer:``)."""

    def __init__(self, generations: dict[str, str]):
        super().__init__()
        self.generations = generations

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [
            self.generations[re.match(r"Question: (.*)\nAnswer:$", r.args[0], re.S).group(1)]
            for r in requests
        ]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def lm_eval_verdicts(generations: list[str], references: list[str], tmp_path: Path) -> list[dict]:
    """lm-eval's gsm8k (the shipped gsm8k_local) scoring of each generation: {filter: (taken,
    correct)}."""
    test = tmp_path / "test.jsonl"
    questions = [f"Question number {i}?" for i in range(len(generations))]
    test.write_text(
        "".join(
            json.dumps({"question": q, "answer": f"Some steps.\n#### {a}"}) + "\n"
            for q, a in zip(questions, references)
        )
    )
    manager = lmeval.task_manager(
        ["gsm8k_local"], metadata={"gsm8k_test": str(test), "gsm8k_train": str(test)}
    )
    results = lm_eval.simple_evaluate(
        model=CannedLM(dict(zip(questions, generations))),
        tasks=["gsm8k_local"],
        num_fewshot=0,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    verdicts = [{} for _ in generations]
    for sample in results["samples"]["gsm8k_local"]:
        verdicts[sample["doc_id"]][sample["filter"]] = (
            sample["filtered_resps"][0],
            sample["exact_match"] == 1.0,
        )
    return verdicts


def lm_eval_verdict(verdict: dict) -> bool:
    """lm-eval's verdict the project's rule matches: strict-match's where it found a ``#### N``,
    else flexible's."""
    taken, correct = verdict["strict-match"]
    return correct if taken != INVALID else verdict["flexible-extract"][1]


def test_the_two_scorers_agree_question_by_question(tmp_path):
    verdicts = lm_eval_verdicts([c[0] for c in CASES], [c[1] for c in CASES], tmp_path)
    for (generation, reference, project, strict, flexible, why), verdict in zip(CASES, verdicts):
        got = (
            is_correct(generation, f"#### {reference}"),
            verdict["strict-match"][1],
            verdict["flexible-extract"][1],
        )
        assert got == (project, strict, flexible), (generation, verdict)
        assert (project == lm_eval_verdict(verdict)) == (why is None), (generation, why, verdict)


def _clean(taken: str) -> str:
    """lm-eval's gsm8k ``regexes_to_ignore`` on an extracted answer: commas, dollar signs, a
    trailing period."""
    return re.sub(r"\.$", "", re.sub(r"[,$]", "", taken))


def designed_difference(generation: str, verdict: dict) -> bool:
    """Whether the project and lm-eval differ only by design: the number lm-eval took is the
    project's number, spelled otherwise (``41.0``) or followed by more punctuation (``41..``)."""
    taken = verdict[
        "strict-match" if verdict["strict-match"][0] != INVALID else "flexible-extract"
    ][0]
    number = re.match(r"-?[0-9][0-9.]*", _clean(taken))
    return number is not None and normalize_number(number.group(0).rstrip(".")) == extract_answer(
        generation
    )


RESULTS = sorted(REPO.glob("benchmarks/results/*_lmeval/*.samples.jsonl"))


@pytest.mark.skipif(not RESULTS, reason="no committed eval result with per-question samples")
@pytest.mark.parametrize("path", RESULTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_two_scorers_agree_on_a_real_models_generations(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_doc: dict[int, dict] = {}
    for row in rows:
        entry = by_doc.setdefault(
            row["doc_id"], {"generation": row["resps"][0][0], "target": row["target"]}
        )
        entry[row["filter"]] = (row["filtered_resps"][0], row["exact_match"] == 1.0)
    assert by_doc
    differ = []
    for doc_id, entry in by_doc.items():
        project = is_correct(entry["generation"], entry["target"])
        if project != lm_eval_verdict(entry):
            assert designed_difference(entry["generation"], entry), (doc_id, entry)
            differ.append(doc_id)
    # Rare: a real model writes "#### 41", not "#### 41.0".
    assert len(differ) <= len(by_doc) // 10, differ
