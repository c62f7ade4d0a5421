"""The tutorial's bookkeeping: what the notebook measures, saves, tells and draws, on top of everything else.

Side-by-side training on CPU cores (``side_by_side``), the inference benchmark and its row names
(``benchmark``, ``benchmark_rows``), per-run records and sentences computed from them (``results``), the
notebook's one bookkeeping module (``report``, reached as ``dst.report``), what DST did to the masks
(``topology``) and the figures (``plots``, ``mask_plots``, ``sweep_figure``). The top of the package: it may
import every other part (``dst.core``, ``dst.engine``, ``dst.csr``, ``dst.methods``), and none of them imports it.
"""
