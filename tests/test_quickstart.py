"""The offline quickstart, shortened: `dpo-lightning fit --config configs/quickstart.yaml`, run from elsewhere.

It must learn (held-out reward accuracy from 0.5 at step 0 to at least 0.9), log to CSV, and leave a
Lightning checkpoint and a Hugging Face folder that `from_pretrained` loads. Only committed assets.
"""

import csv
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning import DPOModule
from dpo_lightning.cli.main import cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_learns_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: the config's asset paths come from the package
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_steps=100",
                f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    run = Path(cli.trainer.log_dir)
    with open(run / "metrics.csv") as f:
        val = [(int(r["step"]), float(r["val/rewards/accuracies"])) for r in csv.DictReader(f)
               if r["val/rewards/accuracies"]]
    assert val[0] == (0, 0.5)  # before training: policy == reference, every pair a tie
    assert len(val) == 1 + 100 // 25 and val[-1][1] >= 0.9  # a validation every 25 steps

    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    reloaded = DPOModule.load_from_checkpoint(checkpoint, weights_only=True)
    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model")
    for name, weight in cli.model.policy.state_dict().items():
        torch.testing.assert_close(reloaded.policy.state_dict()[name], weight, rtol=0, atol=0)
        torch.testing.assert_close(exported.state_dict()[name], weight, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(run / "hf_model")("sort cab:")["input_ids"] == cli.datamodule.tokenizer(
        "sort cab:")["input_ids"]


def test_quickstart_packed_trains_the_same_weights_as_padded(tmp_path, monkeypatch):
    # 25 steps and a validation through the CLI: prefix sharing and packing change the batches' layout,
    # not the training.
    monkeypatch.chdir(ROOT)
    runs = {}
    for layout, flags in (("padded", ["--data.prefix_sharing=false"]), ("packed", ["--data.prefix_sharing=true", "--data.packing=true",
                                                      "--data.packing_max_tokens=128"])):
        runs[layout] = cli_main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps=25",
                                 f"--trainer.default_root_dir={tmp_path / layout}", "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                                 "--trainer.enable_progress_bar=false", *flags])
    padded, packed = runs["padded"], runs["packed"]
    assert packed.trainer.callback_metrics["train/pairs_per_row"] > 3  # pairs of ~26 tokens in rows of 128
    for name, value in padded.trainer.callback_metrics.items():
        torch.testing.assert_close(packed.trainer.callback_metrics[name], value, rtol=1e-5, atol=1e-6)
    for name, weight in padded.model.policy.state_dict().items():
        torch.testing.assert_close(packed.model.policy.state_dict()[name], weight, rtol=1e-5, atol=1e-6)
