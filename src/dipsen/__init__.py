"""dipsen: federated CNN and DiPSeN training with honest adversarial-robustness evaluation.

Pipeline, one package per stage: ``data`` -> ``partition`` -> ``models`` -> ``federated``
-> (attack / certify) -> ``report``; ``cli`` is a thin layer on top.
"""

__version__ = "0.1.0"
