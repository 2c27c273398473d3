"""Reports: the paper's tables and figures next to ours. ``reproduce`` runs the study end to end;
``build_report`` renders measured results to Markdown, HTML, PNG and JSON."""

from .build import build_report
from .reproduce import paper_config, reproduce

__all__ = ["build_report", "paper_config", "reproduce"]
