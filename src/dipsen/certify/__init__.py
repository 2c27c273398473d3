"""Certified robustness: randomized smoothing (``Smooth``) and the PixelDP certificate of a noise layer
(``pixeldp_certify``). Each method's docstring states exactly what it certifies."""

from .pixeldp import PixelDPCertificate, largest_epsilon, pixeldp_certify
from .smoothing import ABSTAIN, Certificate, Smooth, linf_radius, lower_confidence_bound

__all__ = [
    "ABSTAIN",
    "Certificate",
    "PixelDPCertificate",
    "Smooth",
    "largest_epsilon",
    "linf_radius",
    "lower_confidence_bound",
    "pixeldp_certify",
]
