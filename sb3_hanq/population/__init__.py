"""Many offline agents (seeds x hyperparameters) trained as one batched computation (HANQ paper §4, §11)."""

from sb3_hanq.population.run import train_population
from sb3_hanq.population.trainer import (
    ALGORITHMS,
    GROUP_PARAMS,
    MINIBATCH_STREAMS,
    Member,
    PopulationTrainer,
    make_members,
)

__all__ = [
    "ALGORITHMS",
    "GROUP_PARAMS",
    "MINIBATCH_STREAMS",
    "Member",
    "PopulationTrainer",
    "make_members",
    "train_population",
]
