"""Graders: declared checks that score a model's answers 0-1 (GRPO's reward, evaluate's grader_score, test_grader).

`specs` holds the declarations (import-light: the config schema reads them), `scoring` runs them."""

from lmtuner_core.graders.specs import GRADER_TYPES, Grader, GraderList, check_python_opt_in

__all__ = ["GRADER_TYPES", "Grader", "GraderList", "check_python_opt_in"]
