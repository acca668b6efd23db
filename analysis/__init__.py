"""Run records -> tables, figures and the Markdown report; reads only ``results/runs``.

- ``analysis.aggregate``: ``load_runs``, ``tidy``, ``summarize``, ``leaderboard``,
  ``glue_average``, ``write_tables`` (``python -m analysis.aggregate RESULTS_DIR`` -> ``tables/``)
- ``analysis.plots``: ``variant_style``, ``score_vs_params``, ``cost_vs_full``, ``write_figures``
  (``python -m analysis.plots RESULTS_DIR`` -> ``figures/``)
- ``analysis.extraction``: the parasitic-extraction tables and figures
- ``analysis.report``: ``build_report`` (``python -m analysis.report RESULTS_DIR [--no-rebuild]``
  -> ``report.md``)
"""
