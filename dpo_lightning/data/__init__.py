"""The data wing: preference rows (or online prompts) in, batches out.

`sources` reads every kind of source (local files through `files`) into `rows`' one row model, `schemas` maps
public datasets' columns, `formats` detects how rows hold prompt and responses, `rules` turns them into token ids
(rules 1-3) and `prompts` does so for online prompts; `batches` (rule 4, the labels), `packing` and `layouts` turn
token ids into batches and say how a model runs on each layout; `summary` and `loaders` describe and serve the
prepared splits, `checks` stops a run on bad settings or data; `datamodule` holds them together as
`PreferenceDataModule`. It may import `utils` only.
"""

from dpo_lightning.data.datamodule import PreferenceDataModule

__all__ = ["PreferenceDataModule"]
