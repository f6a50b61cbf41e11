"""The pipeline that builds what a node runs: teacher outputs → distil → export → shift routing → report.

Installed as ``darl_lite.pipeline``; it needs the ``distill`` and ``export`` extras (imported inside
:func:`~darl_lite.pipeline.quickstart.run_quickstart`), and no search node imports it.
"""
