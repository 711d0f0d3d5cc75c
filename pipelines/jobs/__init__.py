"""Training jobs: one skeleton (`base.run_job`) and the domains that fill it in.

`config` holds the config dataclasses (the single source of defaults, light to import);
`rossmann` and `ratings` hold the domain parts and the `train_rossmann` / `train_ratings`
entry points. Import those modules directly: this package imports nothing, so the CLI starts
without torch or MLflow.
"""
