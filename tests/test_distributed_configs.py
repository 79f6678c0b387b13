"""The multi-GPU configs (ddp, fsdp, fsdp2, deepspeed_zero2, deepspeed_zero3): what test_cli.py's parse check does not see.

Each names a strategy Lightning knows (DeepSpeed's presets are registered even where DeepSpeed is not
installed, as here), runs on every GPU in bf16-mixed, and keeps its preemption checkpoint in the same
fixed folder as `last.ckpt`, where configs/slurm.sh looks for both. The FSDP config's policies are
built, not just parsed. Nothing is trained and nothing is downloaded.
"""

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

from dpo_lightning.cli.main import cli_main
from dpo_lightning.training.distributed import DecoderLayers
from test_cli import ROOT

STRATEGIES = {"ddp.yaml": "ddp", "fsdp.yaml": "lightning.pytorch.strategies.FSDPStrategy",
              "fsdp2.yaml": "lightning.pytorch.strategies.ModelParallelStrategy",
              "deepspeed_zero2.yaml": "deepspeed_stage_2", "deepspeed_zero3.yaml": "deepspeed_stage_3"}


def printed_config(name: str, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(ROOT / "configs" / name), "--print_config"])
    assert exit_.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_config_runs_its_strategy_on_every_gpu_and_checkpoints_where_slurm_sh_looks(name, capsys):
    trainer = printed_config(name, capsys)["trainer"]
    strategy = trainer["strategy"]
    assert (strategy if isinstance(strategy, str) else strategy["class_path"]) == STRATEGIES[name]
    assert isinstance(strategy, dict) or strategy in StrategyRegistry
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("gpu", "auto", "bf16-mixed")
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in trainer["callbacks"]}
    assert callbacks["ModelCheckpoint"]["save_last"]
    assert callbacks["PreemptionCheckpoint"]["dirpath"] == callbacks["ModelCheckpoint"]["dirpath"]


def test_fsdp_config_wraps_and_checkpoints_by_decoder_layer():
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    config = yaml.safe_load((ROOT / "configs" / "fsdp.yaml").read_text())
    strategy = parser.instantiate(parser.parse_object({"strategy": config["trainer"]["strategy"]})).strategy
    assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderLayers)
    assert isinstance(strategy._activation_checkpointing_kwargs["auto_wrap_policy"], DecoderLayers)
    assert strategy.kwargs["use_orig_params"]  # the root unit mixes trainable and frozen (reference) weights
