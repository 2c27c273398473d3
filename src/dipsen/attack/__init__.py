"""Adversarial evaluation of trained global models (ART attacks, threat models, EOT).

Entry point: :class:`RobustnessEvaluation` (one deployed model, fixed examples) and
:class:`AttackSetup` (one attack configuration); :mod:`.study` runs the paper's protocol and the
adaptive one side by side.
"""

from .attacks import ADAPTIVE_BUDGET, ATTACKS, GRADIENT_ATTACKS, PAPER_BUDGET, QUERY_ATTACKS, Budget
from .domain import FeasibleDomain, feasible_domain
from .evaluate import RULES, AttackResult, AttackSetup, RobustnessEvaluation, worst_case_accuracy
from .target import TrainedRun
from .threat import THREAT_MODELS
from .views import GRADIENT_VIEWS, ExpectedSoftmax, attacker_view

__all__ = [
    "ADAPTIVE_BUDGET",
    "ATTACKS",
    "GRADIENT_ATTACKS",
    "GRADIENT_VIEWS",
    "PAPER_BUDGET",
    "QUERY_ATTACKS",
    "RULES",
    "AttackResult",
    "AttackSetup",
    "Budget",
    "ExpectedSoftmax",
    "FeasibleDomain",
    "RobustnessEvaluation",
    "THREAT_MODELS",
    "TrainedRun",
    "attacker_view",
    "feasible_domain",
    "worst_case_accuracy",
]
