"""The run directory, named once: every path a stage reads or writes under `runs/<run id>/`.

Stages, runners, tests and benchmarks take paths from :class:`RunLayout` instead of spelling
`run_dir / "eval" / "gate.json"` themselves, so a path can change in one place. The gate decision has
one reader (:func:`read_gate`) with one strictness: export, register, the pipeline and the DAG all refuse
a missing, malformed or failed gate the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json
from tasks.core.errors import UserError

EFFECTIVE_PARAMS = "params.effective.yaml"


class GateFailed(UserError):
    """The candidate did not pass the regression gate: nothing is merged, exported or registered."""


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory (what each stage writes is listed by the stage that writes it)."""

    root: Path

    @classmethod
    def of(cls, run_dir: Path | str) -> RunLayout:
        """The layout of `run_dir` (made absolute, so it survives a change of working directory)."""
        return cls(Path(run_dir).resolve())

    # prepare
    @property
    def effective_params(self) -> Path:
        return self.root / EFFECTIVE_PARAMS

    # validate
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_split(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def eval_split(self) -> Path:
        return self.data_dir / "eval.jsonl"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def data_quality(self) -> Path:
        return self.reports_dir / "data_quality.json"

    @property
    def data_docs(self) -> Path:
        return self.reports_dir / "data_docs"

    # version
    @property
    def version_file(self) -> Path:
        return self.root / "version.json"

    # train
    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def adapter_dir(self) -> Path:
        return self.train_dir / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.train_dir / "checkpoints"

    @property
    def tokenized_dir(self) -> Path:
        """The splits as tokenized, memory-mapped Arrow datasets, cached by fingerprint (retries reuse them)."""
        return self.train_dir / "tokenized"

    @property
    def train_summary(self) -> Path:
        return self.train_dir / "train_summary.json"

    @property
    def loss_csv(self) -> Path:
        return self.train_dir / "loss.csv"

    # evaluate
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def gate_file(self) -> Path:
        return self.eval_dir / "gate.json"

    @property
    def eval_metrics(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def eval_report(self) -> Path:
        return self.eval_dir / "eval_report.md"

    # export
    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def merged_dir(self) -> Path:
        return self.export_dir / "merged"

    @property
    def onnx_dir(self) -> Path:
        return self.export_dir / "onnx"

    @property
    def export_summary(self) -> Path:
        return self.export_dir / "export_summary.json"

    @property
    def model_card(self) -> Path:
        return self.export_dir / "README.md"

    # register
    @property
    def register_dir(self) -> Path:
        return self.root / "register"

    @property
    def registration(self) -> Path:
        return self.register_dir / "registration.json"


def read_gate(run_dir: Path | str, *, require_pass: bool = False) -> dict[str, Any]:
    """The evaluate stage's gate decision for this run: the one reader of gate.json.

    Args:
        run_dir: the run directory.
        require_pass: raise :class:`GateFailed` when the gate did not pass.

    Returns:
        The gate.json object; it has a boolean "passed" and a list of "reasons".

    Raises:
        UserError: gate.json is missing (evaluate has not run) or is not an object with a boolean "passed".
        GateFailed: `require_pass` and the gate failed; the message lists the gate's reasons.
    """
    path = RunLayout.of(run_dir).gate_file
    if not path.is_file():
        raise UserError(f"{path}: not found; the evaluate stage writes the gate decision (run it first)")
    try:
        gate = read_json(path)
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); re-run the evaluate stage") from None
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        raise UserError(f"{path}: expected a JSON object with a boolean 'passed'; re-run the evaluate stage")
    passed = gate["passed"] and gate.get("decision", "pass") == "pass"
    gate["passed"] = passed
    gate["reasons"] = [str(r) for r in gate.get("reasons") or []]
    if require_pass and not passed:
        why = "; ".join(gate["reasons"]) or "no reason given"
        raise GateFailed(f"gate failed: {why}. Nothing merged, exported or registered ({path}).")
    return gate


# What each gate rule protects, one sentence each (the eval report and the model card print them).
RULE_PURPOSES = {
    "beats_base": "The fine-tuning taught the task: the candidate answers held-out questions better than its base.",
    "no_regression": "A new model never answers worse than the one serving now, overall or in a large category.",
    "min_eos_rate": "Answers end: a model that never writes its end-of-turn token rambles to the token budget.",
    "max_empty_rate": "The model answers at all: empty answers can hide behind averaged metrics.",
    "max_top_answer_share": "Answers fit their questions: one answer for many questions (collapse) can beat a weak base.",
    "max_general_ppl_increase": "Fine-tuning did not cost the base its general language ability (forgetting).",
    "max_harness_regression": "The skills the base had on standard tasks (lm-evaluation-harness) are still there.",
    "serving": "Serving the model does not get slower or larger than the champion by more than the margins.",
}


def gate_rule(gate: dict[str, Any], name: str) -> dict[str, Any]:
    """The rule called `name` in a gate decision (gate.json's `rules`), or {} when it did not run."""
    return next((r for r in gate.get("rules") or () if r.get("name") == name), {})


def rule_purpose(name: str) -> str:
    """The sentence saying what the rule named `name` (e.g. `no_regression:token_f1[os]`) protects."""
    return RULE_PURPOSES.get(name.split(":", 1)[0].split("[", 1)[0], "")
