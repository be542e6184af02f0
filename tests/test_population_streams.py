"""Population trainer: where the members' minibatch indices come from (``minibatch_stream``).

With ``"member"`` (the default) a member's minibatches depend on the run's ``seed`` and its own seed only, so the
same member draws the same minibatches in any population, and a checkpoint resumes the stream exactly, also at a
block boundary. ``"population"`` (one stream per run, the behaviour before the option) is kept for the runs saved
with it, and a saved run keeps its stream when resumed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch as th

from sb3_hanq.population import MINIBATCH_STREAMS, PopulationTrainer, make_members, train_population
from sb3_hanq.population.__main__ import main as cli_main
from sb3_hanq.population.run import checkpoint_path
from sb3_hanq.population.trainer import STREAM_BLOCK

ENV = "DiscretePendulum-v1"
N = 64  # dataset size per seed


def trainer_for(seeds, learning_rate, algo="dqn", **kwargs):
    members = make_members(algo, seeds, learning_rate=learning_rate)
    return PopulationTrainer(ENV, members, batch_size=16, n_samples=N, device="cpu", **kwargs)


def stream(trainer: PopulationTrainer, steps: int) -> dict[tuple[int, float], th.Tensor]:
    """The indices each member draws over the next ``steps`` steps (without training), keyed by (seed, lr)."""
    drawn: dict[int, list[th.Tensor]] = {k: [] for k in range(len(trainer.members))}
    for _ in range(steps):
        trainer.num_steps += 1
        for group in trainer.groups:
            for row, k in zip(trainer.minibatch_indices(group), group.indices):
                drawn[k].append(row.clone())
    return {(m.seed, m.learning_rate): th.stack(drawn[k]) for k, m in enumerate(trainer.members)}


def test_a_members_minibatches_do_not_depend_on_the_population():
    steps = 2 * STREAM_BLOCK + 17  # across two block boundaries
    big = stream(trainer_for([0, 1, 2], [1e-3, 3e-3]), steps)
    alone = stream(trainer_for([2], [3e-3]), steps)
    assert th.equal(big[(2, 3e-3)], alone[(2, 3e-3)])
    assert th.equal(big[(2, 1e-3)], big[(2, 3e-3)])  # one seed, two configurations: paired minibatches
    assert not th.equal(big[(0, 1e-3)], big[(1, 1e-3)])  # other seeds, other minibatches
    other_run = stream(trainer_for([2], [3e-3], seed=1), steps)
    assert not th.equal(other_run[(2, 3e-3)], alone[(2, 3e-3)])  # the run's seed still picks the stream
    # the one shared stream of the runs before the option makes a member's minibatches depend on the others
    big = stream(trainer_for([0, 1, 2], [1e-3, 3e-3], minibatch_stream="population"), steps)
    alone = stream(trainer_for([2], [3e-3], minibatch_stream="population"), steps)
    assert not th.equal(big[(2, 3e-3)], alone[(2, 3e-3)])


def test_member_indices_are_uniform_over_the_dataset():
    indices = stream(trainer_for([0], [1e-3]), 4 * STREAM_BLOCK)[(0, 1e-3)]
    assert indices.shape == (4 * STREAM_BLOCK, 16)
    assert int(indices.min()) >= 0 and int(indices.max()) < N
    counts = th.bincount(indices.flatten(), minlength=N).double()
    expected = indices.numel() / N  # 250 per row; a row outside 5 standard deviations is a plumbing error
    assert float((counts - expected).abs().max()) < 5 * np.sqrt(expected * (1 - 1 / N))


@pytest.mark.parametrize("split", [STREAM_BLOCK, STREAM_BLOCK + 37, 5])
def test_state_dict_resumes_the_stream_exactly(split):
    steps = 2 * STREAM_BLOCK + 40
    full = stream(trainer_for([0, 3], [1e-3]), steps)
    first = trainer_for([0, 3], [1e-3])
    head = stream(first, split)
    state = first.state_dict()
    second = trainer_for([0, 3], [1e-3])  # a fresh trainer, as after a restart
    second.load_state_dict(state)
    tail = stream(second, steps - split)
    for key, indices in full.items():
        assert th.equal(th.cat([head[key], tail[key]]), indices), key


def test_a_state_saved_with_another_stream_is_refused():
    state = trainer_for([0], [1e-3], minibatch_stream="population").state_dict()
    del state["minibatch_stream"]  # (as checkpoints written before the option)
    trainer_for([0], [1e-3], minibatch_stream="population").load_state_dict(state)
    with pytest.raises(ValueError, match="minibatch_stream='population'"):
        trainer_for([0], [1e-3]).load_state_dict(state)


def test_a_member_trains_alike_in_any_population():
    """The same member (seed 1, lr 3e-3) trained in two populations: same data, weights and minibatches, so the
    same weights after 50 steps (to float rounding: the batched matmuls see other member counts)."""
    big, alone = trainer_for([0, 1], [1e-3, 3e-3]), trainer_for([1], [3e-3])
    initial = {name: value.clone() for name, value in alone.groups[0].member_params(0).items()}
    big.train_steps(50)
    alone.train_steps(50)
    k = next(k for k, m in enumerate(big.members) if (m.seed, m.learning_rate) == (1, 3e-3))
    group = next(g for g in big.groups if k in g.indices)
    got = group.member_params(group.indices.index(k))
    expected = alone.groups[0].member_params(0)
    for name, value in got.items():
        assert th.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name
    assert any(not th.allclose(expected[name], value, atol=1e-4) for name, value in initial.items())  # it trained


RUN = dict(algo="dqn", env_id=ENV, seeds=[0], gradient_steps=6, eval_freq=3, eval_episodes=1, n_samples=N, verbose=0)


def test_runs_record_their_stream_and_keep_it(tmp_path, monkeypatch):
    out = tmp_path / "new.json"
    assert train_population(**RUN, out=out)["config"]["minibatch_stream"] == "member"
    with pytest.raises(ValueError, match="minibatch_stream: 'member' \\(saved\\) vs 'population' \\(now\\)"):
        train_population(**RUN, out=out, minibatch_stream="population")

    # a results file from before the option: returned as it is, its stream read as "population"
    old = tmp_path / "old.json"
    saved = train_population(**RUN, out=old, minibatch_stream="population")
    del saved["config"]["minibatch_stream"]
    old.write_text(json.dumps(saved))
    assert train_population(**RUN, out=old)["members"] == saved["members"]
    with pytest.raises(ValueError, match="minibatch_stream: 'population' \\(saved\\) vs 'member' \\(now\\)"):
        train_population(**RUN, out=old, minibatch_stream="member")

    # a checkpoint from before the option resumes with the run's own stream and ends where the run would have
    import sb3_hanq.population.run as run_module

    class Killed(Exception):
        pass

    original = run_module.PopulationTrainer.record

    def record_then_die(self):
        scores = original(self)
        if self.num_steps == 6:  # after the checkpoint of step 3
            raise Killed
        return scores

    cut = tmp_path / "cut.json"
    monkeypatch.setattr(run_module.PopulationTrainer, "record", record_then_die)
    with pytest.raises(Killed):
        train_population(**RUN, out=cut, learning_rate=[1e-2], minibatch_stream="population")
    monkeypatch.setattr(run_module.PopulationTrainer, "record", original)
    state = th.load(checkpoint_path(cut), weights_only=False)
    del state["config"]["minibatch_stream"], state["trainer"]["minibatch_stream"]
    th.save(state, checkpoint_path(cut))
    resumed = train_population(**RUN, out=cut, learning_rate=[1e-2])
    whole = train_population(**RUN, out=tmp_path / "whole.json", learning_rate=[1e-2], minibatch_stream="population")
    assert resumed["config"]["minibatch_stream"] == "population"
    assert [m["scores"] for m in resumed["members"]] == [m["scores"] for m in whole["members"]]


def test_bad_stream_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"minibatch_stream='members'.*\('member', 'population'\)"):
        trainer_for([0], [1e-3], minibatch_stream="members")
    with pytest.raises(ValueError, match="minibatch_stream='shared'"):
        train_population(**RUN, minibatch_stream="shared")
    argv = ["--algo", "dqn", "--env", ENV, "--seeds", "1", "--gradient-steps", "2", "--eval-freq", "2"]
    with pytest.raises(SystemExit):
        cli_main(argv + ["--minibatch-stream", "shared"])
    err = capsys.readouterr().err
    assert "--minibatch-stream" in err and all(stream in err for stream in MINIBATCH_STREAMS)
