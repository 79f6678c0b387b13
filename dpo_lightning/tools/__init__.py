"""Tools around runs, each a function the `dpo-lightning` command calls and Python can call too: training curves
(`plots`), TRL arguments to a config (`migrate`, with TRL's names and defaults in
`trl_names`), and the quickstart's assets (`quickstart`). They may import any
wing below the CLI.
"""
