"""Cost of the divergence snapshot (``restored_on_divergence``) against one gradient step, default networks.

    .venv/bin/python benchmarks/snapshot_cost.py

Per algorithm: the time of ``TrainingSnapshot.take()`` and of ``train(1, 256)`` (which includes one take),
20 interleaved repetitions, one torch thread, Pendulum-v1 with 300 random transitions in the buffer.
"""

from __future__ import annotations

import time

import torch as th

from sb3_hanq import CrossQWN, PreQN
from sb3_hanq.common.utils import cached_snapshot


def main(repeats: int = 20) -> None:
    th.set_num_threads(1)
    for cls in (CrossQWN, PreQN):
        model = cls("MlpPolicy", "Pendulum-v1", learning_starts=10**6, seed=0, device="cpu")
        model.learn(300)
        model.train(1, 256)  # optimiser state exists, the snapshot's storage is allocated
        snapshot = model._training_snapshot
        assert snapshot is cached_snapshot(model, snapshot.modules, snapshot.optimizers, snapshot.extra)
        take = step = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            snapshot.take()
            t1 = time.perf_counter()
            model.train(1, 256)
            take, step = take + t1 - t0, step + time.perf_counter() - t1
        print(
            f"{cls.__name__}: take {take / repeats * 1e3:.2f} ms, train(1) {step / repeats * 1e3:.2f} ms, "
            f"ratio {take / step:.3f}"
        )


if __name__ == "__main__":
    main()
