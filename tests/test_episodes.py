"""Episode sets: determinism, structure, sharding across ranks, the episode file, bad settings."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mmfsar.data.episodes import EpisodeSampler, EpisodeSet, EpisodeSettings, episode_problems
from mmfsar.errors import ConfigError, DataError
from mmfsar.data.meta import DatasetFolder

# 7 classes with 6..12 clips each: clip "c{class}_{k}"; class names sorted != insertion order
SIZES = {"walk": 6, "jump": 9, "wave": 12, "push": 7, "kick": 8, "bend": 10, "clap": 6}
CLIPS = [(f"{name}_{k:02d}", name) for name, n in SIZES.items() for k in range(n)]


def sampler(**kw) -> EpisodeSampler:
    s = EpisodeSettings(**{"n_way": 5, "k_shot": 2, "n_query": 3, "episodes": 40, "seed": 7, **kw})
    return EpisodeSampler([c for c, _ in CLIPS], [k for _, k in CLIPS], s)


def test_same_seed_same_episodes_and_hash_other_seed_differs():
    a, b = sampler().sample(), sampler().sample()
    assert torch.equal(a.tensor, b.tensor) and torch.equal(a.classes, b.classes)
    assert a.hash == b.hash and len(a.hash) == 64
    c = sampler(seed=8).sample()
    assert c.hash != a.hash and not torch.equal(c.tensor, a.tensor)


def test_episodes_do_not_depend_on_the_order_clips_are_listed():
    shuffled = CLIPS[:]
    random.Random(0).shuffle(shuffled)
    s = EpisodeSettings(n_way=5, k_shot=2, n_query=3, episodes=40, seed=7)
    other = EpisodeSampler([c for c, _ in shuffled], [k for _, k in shuffled], s).sample()
    assert other.hash == sampler().sample().hash


def test_an_episode_is_the_same_alone_or_in_a_larger_set():
    small, large = sampler(episodes=3).sample(), sampler(episodes=50).sample()
    assert torch.equal(small.tensor, large.tensor[:3]) and torch.equal(small.classes, large.classes[:3])
    cls, clips = sampler(episodes=50).episode(37)
    assert torch.equal(torch.from_numpy(clips), large.tensor[37])
    assert torch.equal(torch.from_numpy(cls), large.classes[37])


def test_episode_structure():
    s = sampler()
    eps = s.sample()
    E, N, K, Q = 40, 5, 2, 3
    assert eps.tensor.shape == (E, N, K + Q) and eps.classes.shape == (E, N)
    assert eps.support.shape == (E, N, K) and eps.query.shape == (E, N, Q)
    assert eps.class_names == sorted(SIZES)  # classes sorted by name
    assert eps.clip_ids == sorted(c for c, _ in CLIPS)
    class_of = dict(CLIPS)
    used_classes = set()
    for e in range(E):
        names = [eps.class_names[c] for c in eps.classes[e].tolist()]
        assert len(set(names)) == N  # n_way distinct classes
        used_classes.update(names)
        support = set(eps.support[e].flatten().tolist())
        query = set(eps.query[e].flatten().tolist())
        assert len(support) == N * K and len(query) == N * Q  # no clip twice
        assert not support & query  # support / query disjoint
        for way, name in enumerate(names):
            assert [class_of[eps.clip_ids[i]] for i in eps.tensor[e, way].tolist()] == [name] * (K + Q)
    assert used_classes == set(SIZES)  # 40 episodes reach every class
    # different episodes are different draws
    assert len({tuple(eps.tensor[e].flatten().tolist()) for e in range(E)}) == E


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("episodes", [40, 11])
def test_shards_over_ranks_cover_every_episode_once(world_size, episodes):
    eps = sampler(episodes=episodes).sample()
    shards = [eps.shard(r, world_size) for r in range(world_size)]
    merged = torch.cat(shards)
    assert sorted(merged.tolist()) == list(range(episodes))  # union = all, no overlap
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1  # balanced
    assert shards[0].tolist()[:2] == ([0, world_size] if episodes > world_size else [0])
    with pytest.raises(ValueError):
        eps.shard(world_size, world_size)


def test_save_load_round_trip_keeps_the_hash(tmp_path):
    eps = sampler().sample()
    path = tmp_path / "sub" / "episodes.json"
    digest = eps.save(path)
    assert digest == eps.hash and path.is_file() and not path.with_suffix(".json.tmp").exists()
    back = EpisodeSet.load(path)
    assert back.hash == eps.hash and torch.equal(back.tensor, eps.tensor)
    assert back.settings == eps.settings and back.clip_ids == eps.clip_ids and back.class_names == eps.class_names
    assert json.loads(path.read_text())["sha256"] == digest


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["episodes"][3][1].__setitem__(0, d["episodes"][3][1][0] + 1),  # one clip changed
        lambda d: d["clip_ids"].reverse(),  # clips renamed
        lambda d: d["settings"].__setitem__("seed", 1),  # settings edited
    ],
    ids=["clip", "clip_ids", "settings"],
)
def test_a_tampered_episode_file_is_rejected(tmp_path, edit):
    path = tmp_path / "episodes.json"
    sampler().sample().save(path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"episodes\.json: content does not match its sha256"):
        EpisodeSet.load(path)


def test_episode_file_errors(tmp_path):
    with pytest.raises(DataError, match="episode file not found"):
        EpisodeSet.load(tmp_path / "none.json")
    (tmp_path / "trunc.json").write_text('{"format": 1, "settings": {')
    with pytest.raises(DataError, match=r"trunc\.json is not valid JSON"):
        EpisodeSet.load(tmp_path / "trunc.json")
    (tmp_path / "v9.json").write_text('{"format": 9}')
    with pytest.raises(DataError, match="unsupported format 9"):
        EpisodeSet.load(tmp_path / "v9.json")


def test_check_clips_maps_positions_and_names_missing_clips():
    eps = sampler().sample()
    order = eps.clip_ids[::-1]
    pos = eps.check_clips(order)
    assert [order[i] for i in pos.tolist()] == eps.clip_ids
    with pytest.raises(DataError, match=r"1 clips of the episode file are not in the evaluated split, e\.g\. \['wave_03'\]"):
        eps.check_clips([c for c in eps.clip_ids if c != "wave_03"])


def test_a_class_too_small_is_an_error_naming_it():
    # k_shot + n_query = 7: walk and clap have 6 clips
    with pytest.raises(DataError) as err:
        sampler(k_shot=2, n_query=5)
    msg = str(err.value)
    assert "class 'clap' has 6 clips, fewer than k_shot + n_query = 2 + 5 = 7" in msg
    assert "class 'walk' has 6 clips" in msg
    assert "'push'" not in msg  # 7 clips is enough
    sampler(k_shot=1, n_query=5)  # 6 is enough


def test_n_way_larger_than_the_classes_is_an_error():
    with pytest.raises(DataError, match=r"fewshot.n_way=8 but the split has only 7 classes with at least"):
        sampler(n_way=8)
    eps = sampler(n_way=7, episodes=5).sample()
    assert all(sorted(eps.classes[e].tolist()) == list(range(7)) for e in range(5))


@pytest.mark.parametrize("key", ["n_way", "k_shot", "n_query", "episodes"])
def test_non_positive_settings_are_errors(key):
    with pytest.raises(ConfigError, match=rf"fewshot.{key} must be >= 1, got 0"):
        sampler(**{key: 0})


def test_episode_problems_lists_every_problem():
    s = EpisodeSettings(n_way=5, k_shot=1, n_query=4)
    assert episode_problems({"a": 5, "b": 9}, s) == [
        "fewshot.n_way=5 but the split has only 2 classes with at least fewshot.k_shot + fewshot.n_query = 5 clips (2 classes in all)"
    ]
    # a class without enough clips is not usable, and the key of the settings is named
    assert episode_problems({"a": 5, "b": 2}, EpisodeSettings(n_way=2, k_shot=1, n_query=4), "data.val_episodes") == [
        "data.val_episodes.n_way=2 but the split has only 1 classes with at least data.val_episodes.k_shot + "
        "data.val_episodes.n_query = 5 clips (2 classes in all)",
        "class 'b' has 2 clips, fewer than k_shot + n_query = 1 + 4 = 5",
    ]
    problems = episode_problems({"a": 4, "b": 9, "c": 0}, EpisodeSettings(n_way=3, k_shot=1, n_query=4))
    assert problems == [
        "fewshot.n_way=3 but the split has only 1 classes with at least fewshot.k_shot + fewshot.n_query = 5 clips (3 classes in all)",
        "class 'a' has 4 clips, fewer than k_shot + n_query = 1 + 4 = 5",
        "class 'c' has 0 clips, fewer than k_shot + n_query = 1 + 4 = 5",
    ]


def test_episodes_over_the_novel_classes_of_a_generated_dataset(episode_dataset):
    """5-way 1-shot 5-query over the 5 novel classes (6 clips each) of the target domain."""
    folder = DatasetFolder.open(episode_dataset)
    recs = folder.select(splits=["novel"], domains=["target"])
    assert len(recs) == 30
    s = EpisodeSettings(n_way=5, k_shot=1, n_query=5, episodes=20, seed=0)
    eps = EpisodeSampler([r.clip_id for r in recs], [r.label_name for r in recs], s).sample()
    assert eps.class_names == sorted(folder.meta.classes_of("novel"))
    split_of = {r.clip_id: (r.split, r.domain, r.label_name) for r in recs}
    for e in range(len(eps)):
        for way in range(5):
            infos = {split_of[eps.clip_ids[i]] for i in eps.tensor[e, way].tolist()}
            assert infos == {("novel", "target", eps.class_names[int(eps.classes[e, way])])}
        # every clip of the class is used: 6 = 1 + 5
        assert np.unique(eps.tensor[e].numpy()).size == 30
    with pytest.raises(DataError, match=r"fewer than k_shot \+ n_query = 1 \+ 6 = 7"):
        EpisodeSampler([r.clip_id for r in recs], [r.label_name for r in recs], EpisodeSettings(n_way=5, k_shot=1, n_query=6))
