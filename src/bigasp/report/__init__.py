"""`bigasp dataset report`: what a dataset will teach, before anyone pays for training.

Tag frequencies (raw and with Danbooru aliases folded), caption n-grams, score / bucket /
resolution / length / chunk distributions, annotation coverage and rejects, as CSVs, PNG
plots and one self-contained HTML page. `collect` streams the manifest in Arrow batches
(memory independent of its size); `write_report` writes the folder. Exports are lazy so
`bigasp --help` (which imports `bigasp.report.commands`) stays free of torch.
"""

from bigasp._lazy import lazy_getattr

__all__ = ["Report", "ReportOptions", "collect", "write_report"]

__getattr__ = lazy_getattr(
    __name__, {"Report": "compute", "ReportOptions": "compute", "collect": "compute", "write_report": "write"}
)
