from abmll.learners.abmll import ABMLL
from abmll.learners.base import Episode, Learner
from abmll.learners.baselines import Pretrained, RegularLoRA, Reptile, StructuredLoRA

__all__ = ["ABMLL", "Episode", "Learner", "Pretrained", "RegularLoRA", "Reptile", "StructuredLoRA"]
