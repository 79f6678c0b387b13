"""The floor: what more than one wing needs, decided once.

Paths (`locate`), the console filters (`quiet`), atomic writes (`atomic`), the tokenizer default and pad = eos
(`tokenizers`), a Hugging Face model's parts and eval mode (`hf`), generation (`generation`) and the step
arithmetic of gradient accumulation (`steps`). These modules import nothing else from `dpo_lightning`
(`generation` and `tokenizers` take `locate` and `hf`); every wing above may import them.
"""
