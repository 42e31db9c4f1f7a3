"""The visual report of a run: attention maps, embedding map, prototype usage, curves, one page."""

from msn.report.report import PAGE, REPORT_DIR, ReportEvaluation, log_report_images, run_dir_of

__all__ = ["PAGE", "REPORT_DIR", "ReportEvaluation", "log_report_images", "run_dir_of"]
