"""TRL's argument names and defaults, as `from-trl` (tools/migrate.py) reads them: what each becomes here, what is
the same as ours, what has no equivalent and why, and the defaults TRL applies when a key is absent.

The defaults are TRL 1.x's (`trl/trainer/base_config.py`, `dpo_config.py`, `model_config.py`) over transformers'
`TrainingArguments`; from-trl does not import TRL, which need not be installed.
"""

# TRL name -> our "section.key", the value unchanged.
RENAMES = {
    # DPOConfig (1.x and 0.2x), and the `trl dpo` script's ModelConfig / ScriptArguments
    "beta": "model.beta", "loss_weights": "model.loss_weights", "label_smoothing": "model.label_smoothing",
    "rpo_alpha": "model.rpo_alpha", "reference_free": "model.reference_free",
    "router_aux_loss_coef": "model.router_aux_loss_coef",
    "f_divergence_type": "model.f_divergence_type", "f_alpha_divergence_coef": "model.f_alpha_divergence_coef",
    "discopop_tau": "model.discopop_tau", "disable_dropout": "model.disable_dropout",
    "precompute_ref_log_probs": "model.precompute_ref_log_probs",
    "precompute_ref_batch_size": "model.precompute_ref_batch_size", "model_name_or_path": "model.model_name_or_path",
    "ref_model_name_or_path": "model.ref_model_name_or_path", "trust_remote_code": "model.trust_remote_code",
    "torch_dtype": "model.torch_dtype", "dtype": "model.torch_dtype",
    "max_length": "data.max_length", "max_prompt_length": "data.max_prompt_length",
    "truncation_mode": "data.truncation_mode", "dataset_name": "data.dataset", "dataset_config": "data.dataset_config",
    "dataset_train_split": "data.split", "dataset_test_split": "data.eval_split",
    # TrainingArguments
    "learning_rate": "model.learning_rate", "weight_decay": "model.weight_decay",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "per_device_train_batch_size": "data.batch_size", "per_device_eval_batch_size": "data.eval_batch_size",
    "dataloader_num_workers": "data.num_workers",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "max_grad_norm": "trainer.gradient_clip_val", "output_dir": "trainer.default_root_dir",
    # TRL's data_seed defaults to its seed, as our data.seed defaults to seed_everything's (the data order).
    "seed": "seed_everything", "data_seed": "data.seed",
}
# TRL 1.x's new names for our losses (TRL 0.x called aot_unpaired aot_pair, as we do).
LOSS_RENAMES = {"aot_unpaired": "aot_pair"}
# Values that need no key because they are what we do anyway.
SAME_AS_OURS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "label_pad_token_id": -100,
                "is_encoder_decoder": False, "sync_ref_model": False, "use_weighting": False, "padding_free": False,
                "ld_alpha": None, "tf32": None, "gradient_checkpointing_kwargs": None, "lr_scheduler_kwargs": None,
                "save_total_limit": None, "load_best_model_at_end": False, "use_liger_kernel": False,
                "torch_compile": False, "deepspeed": None, "fsdp": None, "neftune_noise_alpha": None,
                "label_smoothing_factor": 0.0, "use_peft": False, "tools": None, "model_adapter_name": None,
                "ref_adapter_name": None, "force_use_ref_model": False, "model_init_kwargs": None,
                "ref_model_init_kwargs": None, "precompute_ref_log_probs": False, "precompute_ref_batch_size": None,
                "push_to_hub": False, "hub_model_id": None, "hub_strategy": "every_save", "hub_private_repo": None,
                "hub_always_push": False, "hub_revision": None, "lora_target_parameters": None,
                "lora_modules_to_save": None, "lora_task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False}
# Known TRL names with no equivalent here, and why.
NO_EQUIVALENT = {
    "max_target_length": "TRL 0.2x, encoder-decoder models only; dpo_lightning trains causal LMs",
    "max_completion_length": "responses are cut to max_length minus the prompt (data/rules.py rule 3), not to their own limit",
    "sync_ref_model": "TR-DPO reference syncing is not implemented",
    "ref_model_mixup_alpha": "TR-DPO reference syncing is not implemented",
    "ref_model_sync_steps": "TR-DPO reference syncing is not implemented",
    "use_weighting": "WPO weighting is not implemented", "ld_alpha": "LD-DPO is not implemented",
    "padding_free": "set data.prefix_sharing and data.packing true: no padding inside rows, each prompt run once",
    "tools": "set data.chat_template_kwargs: {tools: [...]} for every row (a tools column sets them per row)",
    "is_encoder_decoder": "encoder-decoder models are not supported",
    "save_total_limit": "Lightning keeps top-k checkpoints only by a monitored metric; set a ModelCheckpoint",
    "load_best_model_at_end": "add a ModelCheckpoint(monitor=...) and load its best_model_path",
    "metric_for_best_model": "add a ModelCheckpoint(monitor=...)",
    "tf32": "call torch.set_float32_matmul_precision('high') instead",
    **{key: f"set model.peft_config: {{{option}: ...}} (peft's LoraConfig)" for key, option in (
        ("lora_target_parameters", "target_parameters"), ("lora_modules_to_save", "modules_to_save"),
        ("use_rslora", "use_rslora"), ("use_dora", "use_dora"))},
    "lora_task_type": "dpo_lightning trains causal LMs (CAUSAL_LM)",
    "push_to_hub": "a run does not push: upload the exported hf_model folder with huggingface_hub.upload_folder",
    **{key: "see push_to_hub" for key in ("hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push",
                                          "hub_revision", "hub_token")},
}
# TRL's defaults of the options only some losses take (f_alpha_divergence_coef: 1.0 in 0.2x, 0.5 in 1.x). Such an
# option, where the chosen loss does not take it, is TRL's default it ignores (same as ours), or a setting that
# loss cannot honour here (not carried over): never a key that fit would refuse as set for a loss that ignores it.
TRL_LOSS_DEFAULTS = {"label_smoothing": (0.0,), "f_divergence_type": ("reverse_kl",),
                     "f_alpha_divergence_coef": (1.0, 0.5), "discopop_tau": (0.05,)}
# Keys that configure what our data module, Lightning or the export do on their own.
NOT_NEEDED = {"remove_unused_columns": "the data module keeps only the columns it uses",
              "do_train": "the subcommand (fit) says it", "do_eval": "eval_strategy says it",
              "overwrite_output_dir": "each run writes a new version_N", "logging_strategy": "logging_steps says it",
              "disable_tqdm": "cosmetic: use trainer.enable_progress_bar", "logging_first_step": "cosmetic"}
# What TRL does when these are absent, where it differs from ours: transformers' TrainingArguments defaults, and
# TRL's own over them (logging_steps 10 for 500, gradient checkpointing on; bf16 on unless fp16 is set, and the
# eval batch of 8 where the train batch is not 8, are decided in `migrate.trl_defaults`).
TRL_DEFAULTS = {"lr_scheduler_type": "linear", "max_grad_norm": 1.0, "num_train_epochs": 3.0, "eval_strategy": "no",
                "logging_steps": 10, "gradient_checkpointing": True}
# The `trl dpo` script's ModelConfig LoRA defaults, used where use_peft is set (ours: alpha 16, dropout 0).
LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
# transformers' `optim` names; the 8-bit ones are bitsandbytes' classes, as transformers uses them (paged
# AdamW falls back to unpaged on CPU, with bitsandbytes' warning).
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
              "rmsprop": "rmsprop", "adamw_8bit": {"class_path": "bitsandbytes.optim.AdamW8bit"},
              "adamw_bnb_8bit": {"class_path": "bitsandbytes.optim.AdamW8bit"},
              "paged_adamw_8bit": {"class_path": "bitsandbytes.optim.PagedAdamW8bit"},
              "paged_adamw_32bit": {"class_path": "bitsandbytes.optim.PagedAdamW32bit"}}
LOGGERS = {"tensorboard": "lightning.pytorch.loggers.TensorBoardLogger", "wandb": "lightning.pytorch.loggers.WandbLogger",
           "mlflow": "lightning.pytorch.loggers.MLFlowLogger"}
