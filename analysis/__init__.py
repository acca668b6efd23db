"""Run records -> tables, figures and the Markdown report; reads only ``results/runs``.

- ``analysis.aggregate``: ``load_runs``, ``tidy``, ``summarize``, ``write_tables``
  (``python -m analysis.aggregate RESULTS_DIR`` -> ``tables/``)
- ``analysis.plots``: ``variant_style``, ``score_vs_params``, ``write_figures``
  (``python -m analysis.plots RESULTS_DIR`` -> ``figures/``)
- ``analysis.report``: ``build_report`` (``python -m analysis.report RESULTS_DIR [--no-rebuild]``
  -> ``report.md``)
"""
