"""`bigasp dataset report`: what a dataset will teach, before anyone pays for training.

Tag frequencies (raw and with Danbooru aliases folded), caption n-grams, score / bucket /
resolution / length / chunk distributions, annotation coverage and rejects, as CSVs, PNG
plots and one self-contained HTML page. `collect` streams the manifest in Arrow batches
(memory independent of its size); `write_report` writes the folder.
"""

from bigasp.report.collect import Report, ReportOptions, collect
from bigasp.report.write import write_report

__all__ = ["Report", "ReportOptions", "collect", "write_report"]
