"""The fault the distributed failure test injects: a learner that fails in process 1 only."""

import torch.distributed as dist

from abmll.learners import Reptile


class ReptileFailingOnRank1(Reptile):
    def train_meta_batch(self, episodes, total):
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("injected failure in process 1")
        return super().train_meta_batch(episodes, total)
