"""Online DPO: its settings (`config`: `OnlineConfig`), the component that samples each batch's pairs and a reward
ranks them (`sampler`: `Online`), the rewards themselves (`rewards`: import paths, reward models, the quickstart's
sort task), and the validation solve rate (`greedy`: `GreedyReward`). It may import `data` and `utils`; the training
step (`training.module`) composes it.
"""

from dpo_lightning.online.config import OnlineConfig
from dpo_lightning.online.greedy import GreedyReward
from dpo_lightning.online.sampler import Online, Sampled

__all__ = ["GreedyReward", "Online", "OnlineConfig", "Sampled"]
