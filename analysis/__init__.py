"""Run records -> tables, figures and the Markdown report; reads only ``results/runs``.

- ``analysis.aggregate``: ``load_runs``, ``tidy``, ``summarize``, ``leaderboard``,
  ``glue_average``, ``write_tables`` (``python -m analysis.aggregate RESULTS_DIR`` -> ``tables/``)
- ``analysis.plots``: ``variant_style``, ``score_vs_params``, ``cost_vs_full``, ``write_figures``
  (``python -m analysis.plots RESULTS_DIR`` -> ``figures/``)
- ``analysis.significance``: every variant against LoRA, full fine-tuning and the floors
  (majority class, untrained model), from the records' per-example evaluations
- ``analysis.extraction``: the parasitic-extraction tables and figures
- ``analysis.headline``: the study's variant x task table for the docs
  (``python -m analysis.headline RESULTS_DIR [--write FILE ...]``)
- ``analysis.report``: ``build_report`` (``python -m analysis.report RESULTS_DIR [--no-rebuild]``
  -> ``report.md``)
"""
