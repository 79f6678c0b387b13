"""`GreedyReward`: the mean reward of the policy's greedy completions of every validation prompt, at every validation
(`val/reward/greedy`: the quickstart's solve rate). Generation is `utils.generation`'s, as online DPO's."""

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from dpo_lightning.online.rewards import Rewards
from dpo_lightning.utils.generation import complete, generation_config, sharded, stop_ids, texts, unsharded


class GreedyReward(L.Callback):
    """At every validation (the sanity check's too), the mean reward of the policy's greedy completions of
    every validation prompt, logged as `val/<name>` (default `val/reward/greedy`; the quickstart's solve rate).

    Under DDP each rank completes every `world_size`-th prompt and one all-reduce sums the scores; under FSDP2
    each rank does so with the whole weights gathered for the generation (`utils.generation.unsharded`).

    Args:
        reward_funcs: the reward(s), as `model.online.reward_funcs` names them (`rewards.py`).
        reward_weights: one weight per reward; default 1 each.
        max_new_tokens: tokens generated per completion at most.
        batch_size: prompts per `generate` call.
        name: the metric's name after `val/`.
    """

    def __init__(self, reward_funcs: str | list[str], reward_weights: list[float] | None = None,
                 max_new_tokens: int = 32, batch_size: int = 256, name: str = "reward/greedy"):
        self.rewards = Rewards(reward_funcs, reward_weights, "GreedyReward.reward_funcs")
        self.max_new_tokens, self.batch_size, self.name = max_new_tokens, batch_size, name

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        refusal = sharded(trainer, "GreedyReward", every_rank=True)
        if refusal:
            rank_zero_warn(f"{refusal}: skipped", category=UserWarning)
            return
        datamodule = trainer.datamodule
        if getattr(datamodule, "val_data", None) is None:
            return
        prompts = list(datamodule.val_data["prompt_input_ids"])[trainer.global_rank::trainer.world_size]
        total = torch.zeros(2, dtype=torch.float64, device=pl_module.device)  # (score sum, count)
        tokenizer = datamodule.tokenizer
        stops = stop_ids(pl_module.policy, tokenizer)
        config = generation_config(tokenizer, stops, self.max_new_tokens)
        with unsharded(pl_module.policy):  # every rank, even one without prompts: gathering is collective
            completions = sum((complete(pl_module.policy, prompts[i:i + self.batch_size], config, pl_module.device)
                               for i in range(0, len(prompts), self.batch_size)), [])
        if prompts:
            where = f"at the validation of step {trainer.global_step}"
            scores = self.rewards.to(pl_module.device)(*texts(tokenizer, prompts, completions, stops), where)
            total += torch.tensor([scores.sum().item(), len(scores)], dtype=torch.float64, device=total.device)
        total = trainer.strategy.reduce(total, reduce_op="sum")
        pl_module.log(f"val/{self.name}", (total[0] / total[1]).float())

